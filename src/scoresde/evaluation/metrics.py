"""Distances between a sampler's output and its target (DESIGN 7.1).

Conventions: every `w2*` function returns the Wasserstein-2 distance itself, not its
square; `frechet_distance` returns the squared distance (the FID convention). Point
clouds are arrays of shape (n, d) (torch or numpy, evaluated in float64). Estimates
that carry Monte Carlo error return an `Estimate` with `.value` and `.stderr`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import ot
import torch
from torch import Tensor

from ..core.errors import InvalidValueError
from ..core.targets import GaussianMixture
from ..core.validate import integer, moments
from .features import (  # FID-style features without downloads (issue 12)
    image_features,
    knn_precision_recall,
)

__all__ = [
    "Estimate", "TVGrid", "w2_gaussian", "w2", "w2_floor", "sliced_w2", "mmd2", "tv", "tv_grid",
    "kl_gaussian", "frechet_distance", "frechet_distance_infinity", "image_features", "knn_precision_recall",
    "available_memory", "check_mmd2_memory", "mmd2_fourier",
]

W2_BYTES_PER_PAIR = 48  # the cost matrix, the plan and the network simplex's arcs of POT's emd, float64

ArrayLike = Tensor | np.ndarray
F64 = torch.float64


@dataclass(frozen=True)
class Estimate:
    """A Monte Carlo estimate and its standard error."""

    value: float
    stderr: float

    def __float__(self) -> float:
        return float(self.value)


def _points(x: ArrayLike, name: str, dim: int | None = None, min_n: int = 1) -> np.ndarray:
    """`x` as a float64 array of shape (n, d), validated."""
    if not isinstance(x, (Tensor, np.ndarray)):
        raise InvalidValueError(f"{name} must be a torch tensor or numpy array of shape (n, d), got {type(x).__name__}")
    a = x.detach().cpu().numpy() if isinstance(x, Tensor) else x
    if not np.issubdtype(a.dtype, np.floating):
        raise InvalidValueError(f"{name} must have a floating dtype, got {a.dtype}")
    if a.ndim != 2:
        raise InvalidValueError(f"{name} must have shape (n, d), got {a.shape}")
    if a.shape[0] < min_n:
        raise InvalidValueError(f"{name} must hold at least {min_n} points, got {a.shape[0]}")
    if dim is not None and a.shape[1] != dim:
        raise InvalidValueError(f"{name} must have dimension {dim}, got {a.shape[1]}")
    if not np.isfinite(a).all():
        raise InvalidValueError(f"{name} must be finite")
    return a.astype(np.float64, copy=False)


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory() -> int | None:
    """Bytes that can be allocated now: MemAvailable of /proc/meminfo (else os.sysconf's available pages),
    capped by a cgroup v2 memory limit; None where none of these can be read."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            avail = next((int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:")), None)
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    return min(avail, limit - used) if limit is not None and used is not None else avail


def _require_memory(what: str, needed: Callable[[int], int], n: int) -> None:
    """InvalidValueError naming n, the memory `needed(n)` (increasing in n) and the memory available, with
    the largest n that fits; nothing where the available memory is unknown."""
    avail = available_memory()
    if avail is None or needed(n) <= avail:
        return
    lo, hi = 0, n  # the largest k <= n with needed(k) <= avail
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if needed(mid) <= avail else (lo, mid - 1)
    raise InvalidValueError(f"{what} of n={n} points needs about {_size(needed(n))} of memory, {_size(avail)} is "
                            f"available: the largest n that fits is {lo}")


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def check_mmd2_memory(n: int, m: int | None = None, n_bandwidths: int = 3) -> None:
    """Refuse (InvalidValueError) an `mmd2` of n points against m target points (None: a GaussianMixture)
    whose kernel matrices would not fit in the available memory; the message gives the largest n that fits.
    Peak: (2 h + 1) float64 matrices of a kernel being built (h bandwidths) beside the kernels already built."""
    k = 2 * n_bandwidths + 1

    def needed(n: int) -> int:
        if m is None:
            return 8 * n * n * max(k, 4)  # Kxx, then H and H^2 beside it
        return 8 * max(k * n * n, n * n + k * m * m, n * n + m * m + k * n * m)

    _require_memory("mmd2", needed, n)


def _sqrtm_psd(C: np.ndarray) -> np.ndarray:
    lam, U = np.linalg.eigh(C)
    return (U * np.sqrt(np.clip(lam, 0.0, None))) @ U.T


def w2_gaussian(m1: ArrayLike, C1: ArrayLike, m2: ArrayLike, C2: ArrayLike) -> float:
    """W2 (not squared) between N(m1, C1) and N(m2, C2):
    W2^2 = |m1 - m2|^2 + tr(C1 + C2 - 2 (C2^{1/2} C1 C2^{1/2})^{1/2}) (DESIGN 7.1)."""
    m1, C1 = moments("first Gaussian", m1, C1)
    m2, C2 = moments("second Gaussian", m2, C2, m1.shape[0])
    s2 = _sqrtm_psd(C2)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(s2 @ C1 @ s2), 0.0, None)).sum()
    w2sq = float(((m1 - m2) ** 2).sum() + np.trace(C1) + np.trace(C2) - 2 * cross)
    return math.sqrt(max(w2sq, 0.0))


def kl_gaussian(m1: ArrayLike, C1: ArrayLike, m2: ArrayLike, C2: ArrayLike) -> float:
    """KL(N(m1, C1) || N(m2, C2)) = (tr(C2^{-1} C1) + dm^T C2^{-1} dm - d + log det C2 - log det C1) / 2."""
    m1, C1 = moments("first Gaussian", m1, C1)
    m2, C2 = moments("second Gaussian", m2, C2, m1.shape[0])
    L2 = np.linalg.cholesky(C2)
    L1 = np.linalg.cholesky(C1)
    A = np.linalg.solve(L2, L1)
    dm = np.linalg.solve(L2, m2 - m1)
    logdet = 2 * (np.log(np.diag(L2)).sum() - np.log(np.diag(L1)).sum())
    return float(0.5 * ((A**2).sum() + (dm**2).sum() - m1.shape[0] + logdet))


def w2(x: ArrayLike, y: ArrayLike) -> float:
    """Exact W2 (not squared) between the empirical measures of x (n, d) and y (m, d), uniform
    weights, by the network simplex (POT `ot.emd2`). Biased upward on finite samples: report it
    with `w2_floor`."""
    x = _points(x, "x")
    y = _points(y, "y", x.shape[1])
    m = y.shape[0]
    _require_memory(f"w2 against m={m} points", lambda n: W2_BYTES_PER_PAIR * n * m, x.shape[0])
    a = np.full(x.shape[0], 1.0 / x.shape[0])
    b = np.full(y.shape[0], 1.0 / y.shape[0])
    cost = ot.dist(x, y, metric="sqeuclidean")
    return math.sqrt(max(float(ot.emd2(a, b, cost, numItermax=max(100_000, 50 * cost.size))), 0.0))


def w2_floor(sample_reference: Callable[[int], ArrayLike], n: int, repeats: int = 3) -> Estimate:
    """The finite-sample floor of `w2`: W2 between two independent n-point draws of the reference
    (`sample_reference(n) -> (n, d)`), averaged over `repeats` pairs; an exact sampler scores this."""
    integer("n", n, 2)
    integer("repeats", repeats, 1)
    vals = np.array([w2(sample_reference(n), sample_reference(n)) for _ in range(repeats)])
    se = float(vals.std(ddof=1) / math.sqrt(repeats)) if repeats > 1 else float("nan")
    return Estimate(float(vals.mean()), se)


def _w2_1d_sq(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Exact squared W2 between sorted 1-D empirical measures, batched: xs (P, n), ys (P, m).
    Integrates |F^{-1}(q) - G^{-1}(q)|^2 over the merged quantile breakpoints."""
    n, m = xs.shape[1], ys.shape[1]
    q = np.union1d(np.arange(1, n + 1) / n, np.arange(1, m + 1) / m)
    widths = np.diff(np.concatenate([[0.0], q]))
    mid = q - widths / 2
    ix = np.minimum((mid * n).astype(np.int64), n - 1)
    iy = np.minimum((mid * m).astype(np.int64), m - 1)
    return ((xs[:, ix] - ys[:, iy]) ** 2 * widths).sum(1)


def sliced_w2(x: ArrayLike, y: ArrayLike, n_projections: int = 128, generator: torch.Generator | None = None,
              directions: ArrayLike | None = None) -> float:
    """Sliced W2 (not squared): sqrt(mean over random unit directions theta of W2^2(theta.x, theta.y)),
    each 1-D term exact (sorted quantiles). `directions` (P, d) overrides the random ones."""
    x = _points(x, "x")
    y = _points(y, "y", x.shape[1])
    if directions is None:
        integer("n_projections", n_projections, 1)
        theta = torch.randn(n_projections, x.shape[1], generator=generator, dtype=torch.float64).numpy()
    else:
        theta = _points(directions, "directions", x.shape[1])
    theta = theta / np.linalg.norm(theta, axis=1, keepdims=True)
    xs, ys = np.sort(theta @ x.T, axis=1), np.sort(theta @ y.T, axis=1)
    return math.sqrt(max(float(_w2_1d_sq(xs, ys).mean()), 0.0))


def _sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.clip((a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2 * a @ b.T, 0.0, None)


def _gauss_kernel(a: np.ndarray, b: np.ndarray, bandwidths: np.ndarray) -> np.ndarray:
    d2 = _sqdist(a, b)
    return np.exp(-d2[None] / (2 * bandwidths[:, None, None] ** 2)).sum(0)


def _gauss_pdf(diff: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """N(diff; 0, cov) for diff of shape (n, d)."""
    L = np.linalg.cholesky(cov)
    z = np.linalg.solve(L, diff.T)
    return np.exp(-0.5 * (z**2).sum(0) - np.log(np.diag(L)).sum() - 0.5 * cov.shape[0] * math.log(2 * math.pi))


def _mixture_kernel_means(x: np.ndarray, target: GaussianMixture, bandwidths: np.ndarray) -> tuple[np.ndarray, float]:
    """E_{y~p} k(x, y) per point and E_{y,y'~p} k(y, y') in closed form for k = sum_h exp(-|.|^2 / 2h^2):
    int N(y; mu, S) exp(-|x - y|^2 / 2h^2) dy = (2 pi h^2)^{d/2} N(x; mu, S + h^2 I)."""
    w, mu, S = (v.numpy() for v in (target.weights, target.means, target.covariances))
    d = mu.shape[1]
    mean_k, mean_kk = np.zeros(x.shape[0]), 0.0
    for h in bandwidths:
        c = (2 * math.pi * h**2) ** (d / 2)
        for k in range(len(w)):
            mean_k += w[k] * c * _gauss_pdf(x - mu[k], S[k] + h**2 * np.eye(d))
            for j in range(len(w)):
                mean_kk += w[k] * w[j] * c * float(_gauss_pdf((mu[k] - mu[j])[None], S[k] + S[j] + h**2 * np.eye(d))[0])
    return mean_k, float(mean_kk)


def _row_means_offdiag(K: np.ndarray) -> np.ndarray:
    return (K.sum(1) - np.diag(K)) / (K.shape[0] - 1)


def _offdiag_mean(K: np.ndarray) -> float:
    n = K.shape[0]
    return float((K.sum() - np.trace(K)) / (n * (n - 1)))


def _bandwidths(bandwidths: Sequence[float] | None, scale: float) -> np.ndarray:
    """The kernel's bandwidths: as given (validated), else {0.5, 1, 2} sqrt(scale), scale = trace Cov(target)."""
    if bandwidths is None:
        return math.sqrt(scale) * np.array([0.5, 1.0, 2.0])
    h = np.asarray(bandwidths, dtype=np.float64).ravel()
    if h.size == 0 or not np.isfinite(h).all() or (h <= 0).any():
        raise InvalidValueError(f"bandwidths must be finite and > 0, got {bandwidths}")
    return h


def mmd2(x: ArrayLike, target: GaussianMixture | ArrayLike, bandwidths: Sequence[float] | None = None) -> Estimate:
    """Unbiased squared MMD with the kernel k = sum_h exp(-|x - y|^2 / (2 h^2)) (DESIGN 7.1).

    Against a `GaussianMixture` the terms E_p k(x, .) and E_{p,p} k are closed-form Gaussian
    integrals and only the generated pairs form a U-statistic, so an exact sampler scores 0 in
    expectation; against samples (m, d) the usual two-sample U-statistic. Default bandwidths
    {0.5, 1, 2} * sqrt(trace Cov(target)) depend on the target only (no bias from x). Standard
    error: against a mixture, the exact U-statistic variance with estimated zeta1, zeta2; against
    samples, the first-order (Hoeffding) projection from row means, which includes the row means'
    own noise and so errs on the large side (by at most sqrt(2) when the MMD is 0).
    """
    x = _points(x, "x", min_n=2)
    n, d = x.shape
    if isinstance(target, GaussianMixture):
        if target.dim != d:
            raise InvalidValueError(f"target has dimension {target.dim}, x has {d}")
        scale = float(torch.trace(target.covariance()))
    else:
        target = _points(target, "target", d, min_n=2)
        scale = float(np.trace(np.atleast_2d(np.cov(target.T))))
    h = _bandwidths(bandwidths, scale)
    check_mmd2_memory(n, None if isinstance(target, GaussianMixture) else target.shape[0], h.size)
    Kxx = _gauss_kernel(x, x, h)
    if isinstance(target, GaussianMixture):
        mean_k, mean_kk = _mixture_kernel_means(x, target, h)
        value = _offdiag_mean(Kxx) - 2 * mean_k.mean() + mean_kk
        # U-statistic with kernel H_ij = k(x_i, x_j) - m_i - m_j + E_pp k: Var U = (4 (n - 2) zeta1 + 2 zeta2) / (n (n - 1)),
        # zeta1 = Var E[H | x_i] (estimated from row means, less their own noise), zeta2 = Var H.
        H = Kxx - mean_k[:, None] - mean_k[None, :] + mean_kk
        zeta2 = _offdiag_mean(H**2) - value**2
        zeta1 = max((_row_means_offdiag(H).var(ddof=1) - zeta2 / (n - 1)) / (1 - 1 / (n - 1)), 0.0)
        var = (4 * (n - 2) * zeta1 + 2 * zeta2) / (n * (n - 1))
    else:
        m = target.shape[0]
        Kyy = _gauss_kernel(target, target, h)
        Kxy = _gauss_kernel(x, target, h)
        value = _offdiag_mean(Kxx) + _offdiag_mean(Kyy) - 2 * Kxy.mean()
        hx = _row_means_offdiag(Kxx) - Kxy.mean(1)
        hy = _row_means_offdiag(Kyy) - Kxy.mean(0)
        var = 4 * hx.var(ddof=1) / n + 4 * hy.var(ddof=1) / m
    return Estimate(float(value), math.sqrt(max(float(var), 0.0)))


def _mixture_cf(target: GaussianMixture, omega: Tensor) -> tuple[Tensor, Tensor]:
    """Real and imaginary parts of the characteristic function E e^{i omega.y}, y ~ target, at rows of omega:
    sum_k w_k exp(i omega.mu_k - omega^T Sigma_k omega / 2)."""
    w, mu, S = (v.to(omega.dtype) for v in (target.weights, target.means, target.covariances))
    amp = w * torch.exp(-0.5 * torch.einsum("md,kde,me->mk", omega, S, omega))
    phase = omega @ mu.T
    return (amp * phase.cos()).sum(1), (amp * phase.sin()).sum(1)


def mmd2_fourier(x: ArrayLike, target: GaussianMixture, bandwidths: Sequence[float] | None = None,
                 n_frequencies: int = 1024, generator: torch.Generator | None = None, rows: int = 20000,
                 block: int = 4096) -> Estimate:
    """`mmd2(x, target, bandwidths)` for large n, in O(n x frequencies) time and O(block x frequencies) memory.

    Bochner: exp(-|x - y|^2 / 2h^2) = E cos(omega.(x - y)), omega ~ N(0, I / h^2), so the squared MMD is
    E_omega |phi_q(omega) - phi_p(omega)|^2 with phi the characteristic functions. Per frequency the term
    |phi_p|^2 - 2 Re(conj(phi_p) mean_j e^{i omega.x_j}) + (|sum_j e^{i omega.x_j}|^2 - n) / (n (n - 1)) is
    unbiased (phi_p in closed form for the mixture), and so is its mean over `n_frequencies` draws per
    bandwidth: an exact sampler scores 0 in expectation. Standard error: the spread over frequencies,
    plus the U-statistic variance of the random-feature kernel (4 (n - 2) zeta1 + 2 zeta2) / (n (n - 1))
    with zeta1 from the exact row means of `rows` points and zeta2 from pairs among them.
    Projections in float32, sums in float64.
    """
    x = _points(x, "x", min_n=2)
    n, d = x.shape
    if not isinstance(target, GaussianMixture):
        raise InvalidValueError(f"target must be a GaussianMixture, got {type(target).__name__}")
    if target.dim != d:
        raise InvalidValueError(f"target has dimension {target.dim}, x has {d}")
    h = _bandwidths(bandwidths, float(torch.trace(target.covariance())))
    M = integer("n_frequencies", n_frequencies, 2)
    r = min(integer("rows", rows, 2), n) // 2 * 2
    block = integer("block", block)
    xt = torch.from_numpy(x).float()
    sub = xt[torch.randperm(n, generator=generator)[:r]]
    value, var_freq = 0.0, 0.0
    row_h, pair_h = torch.zeros(r, dtype=F64), torch.zeros(r // 2, dtype=F64)  # H's row means and pair values
    for hh in h:
        omega = torch.randn(M, d, generator=generator, dtype=F64) / hh
        pr, pi = _mixture_cf(target, omega)
        om = omega.float().T
        C, S = torch.zeros(M, dtype=F64), torch.zeros(M, dtype=F64)
        for i in range(0, n, block):
            proj = xt[i:i + block] @ om
            C += proj.cos().sum(0, dtype=F64)
            S += proj.sin().sum(0, dtype=F64)
        term = pr**2 + pi**2 - 2 * (pr * C + pi * S) / n + (C**2 + S**2 - n) / (n * (n - 1))
        value += float(term.mean())
        var_freq += float(term.var()) / M
        proj = sub @ om
        c, s = proj.cos().double(), proj.sin().double()
        m = (c @ pr + s @ pi) / M  # E_p k(x, .) of the random-feature kernel, per row
        mean_pp = float((pr**2 + pi**2).mean())
        # sum_{j != i} H_ij / (n - 1); sum_j m_j is n times the rows' mean (a constant: it does not enter zeta1)
        row_h += ((c @ C + s @ S) / M - 1 - (n * m.mean() - m)) / (n - 1) - m + mean_pp
        k_pair = ((c[0::2] * c[1::2]).sum(1) + (s[0::2] * s[1::2]).sum(1)) / M
        pair_h += k_pair - m[0::2] - m[1::2] + mean_pp
    zeta2 = float((pair_h**2).mean()) - value**2
    zeta1 = max(float(row_h.var()) - zeta2 / (n - 1), 0.0)
    var = var_freq + (4 * (n - 2) * zeta1 + 2 * zeta2) / (n * (n - 1))
    return Estimate(value, math.sqrt(max(var, 0.0)))


def tv(log_p: Callable[[Tensor], Tensor], log_q: Callable[[Tensor], Tensor], x: Tensor) -> Estimate:
    """TV(p, q) = E_{x~p}[(1 - q(x)/p(x))_+] by Monte Carlo over x ~ p (DESIGN 7.1).

    `log_p(x)`, `log_q(x)` return per-sample log-densities (n,); valid in any dimension."""
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[0] < 2:
        raise InvalidValueError("x must be a tensor of shape (n, ...) with n >= 2 samples from p")
    lp, lq = log_p(x), log_q(x)
    for name, v in (("log_p", lp), ("log_q", lq)):
        if not isinstance(v, Tensor) or v.shape != (x.shape[0],):
            raise InvalidValueError(f"{name}(x) must return a tensor of shape ({x.shape[0]},)")
    if not torch.isfinite(lp).all():
        raise InvalidValueError("log_p(x) must be finite on samples from p")
    r = (-torch.expm1(lq.double() - lp.double())).clamp(min=0.0)
    return Estimate(float(r.mean()), float(r.std() / math.sqrt(r.numel())))


@dataclass(frozen=True)
class TVGrid:
    """Histogram TV estimate. `floor` is the expected value for an exact sampler (the upward bias
    of the histogram noise, (1/2) sum_i sqrt(2 q_i (1 - q_i) / (pi n)) to first order); binning
    biases the other way: the TV of binned laws is <= the TV of the densities."""

    value: float
    floor: float
    cell_size: tuple[float, ...]

    def __float__(self) -> float:
        return float(self.value)


def tv_grid(x: ArrayLike, log_q: Callable[[Tensor], Tensor], bins: int = 64,
            bounds: Sequence[tuple[float, float]] | None = None, subcells: int = 4) -> TVGrid:
    """TV between the empirical law of x (n, 1) or (n, 2) and a density q on a regular grid:
    (1/2) sum_cells |n_i / n - Q_i| + (1/2)|n_out / n - Q_out|, where Q_i integrates q over the cell
    by a `subcells`^d midpoint rule, rescaled to total mass 1 where the rule overshoots (a density sharper
    than the cells), so the value stays in [0, 1]. `bounds` default: the samples' range widened by 10 percent."""
    x = _points(x, "x", min_n=2)
    n, d = x.shape
    if d not in (1, 2):
        raise InvalidValueError(f"tv_grid handles 1-D or 2-D samples, got dimension {d}")
    integer("bins", bins, 2)
    integer("subcells", subcells, 1)
    if bounds is None:
        lo, hi = x.min(0), x.max(0)
        pad = 0.1 * (hi - lo) + 1e-12
        bounds = list(zip(lo - pad, hi + pad))
    if len(bounds) != d or any(not b[0] < b[1] for b in bounds):
        raise InvalidValueError(f"bounds must be {d} pairs (low, high) with low < high, got {bounds}")
    edges = [np.linspace(lo, hi, bins + 1) for lo, hi in bounds]
    counts = np.histogramdd(x, bins=edges)[0] / n
    widths = [e[1] - e[0] for e in edges]
    fine = [np.linspace(lo, hi, bins * subcells + 1) for lo, hi in bounds]
    centres = [0.5 * (f[1:] + f[:-1]) for f in fine]
    mesh = np.stack(np.meshgrid(*centres, indexing="ij"), -1).reshape(-1, d)
    dens = torch.exp(log_q(torch.from_numpy(mesh))).double().numpy().reshape((bins * subcells,) * d)
    for axis in range(d):
        dens = dens.reshape(dens.shape[:axis] + (bins, subcells) + dens.shape[axis + 1:]).sum(axis + 1)
    Q = dens * np.prod(widths) / subcells**d
    Q = Q / max(Q.sum(), 1.0)
    q_out = 1.0 - Q.sum()
    p_out = 1.0 - counts.sum()
    value = 0.5 * (np.abs(counts - Q).sum() + abs(p_out - q_out))
    floor = 0.5 * np.sqrt(2 * Q * (1 - Q) / (math.pi * n)).sum()
    return TVGrid(float(value), float(floor), tuple(float(w) for w in widths))


def frechet_distance(feats_x: ArrayLike, feats_y: ArrayLike) -> float:
    """Squared Frechet distance (the FID formula) between Gaussians fitted to two feature sets:
    w2_gaussian(mean_x, cov_x, mean_y, cov_y)^2, unbiased (n - 1) covariances."""
    fx = _points(feats_x, "feats_x", min_n=2)
    fy = _points(feats_y, "feats_y", fx.shape[1], min_n=2)
    cx, cy = np.atleast_2d(np.cov(fx.T)), np.atleast_2d(np.cov(fy.T))
    return w2_gaussian(fx.mean(0), cx, fy.mean(0), cy) ** 2


def frechet_distance_infinity(feats_x: ArrayLike, feats_y: ArrayLike, sizes: int = 5, repeats: int = 8,
                              seed: int = 0) -> float:
    """FID_inf (Chong & Forsyth 1911.07023, Sec. 3): `frechet_distance` of feats_x to feats_y extrapolated to
    infinitely many x. The Frechet distance of N points is biased upwards by about k / N, with k set by the
    law of x (so two models at one N carry different biases); E[FD_N] = FD_inf + k / N + O(N^-2) is fitted by
    least squares on the mean over `repeats` random subsets (without replacement, each an i.i.d. sample of size
    N) at `sizes` values of N, equally spaced in 1 / N from n / 2 to n, and its intercept returned. The bias
    of feats_y's side is not removed: make it the larger set. Can be below 0 where the two laws are close."""
    fx = _points(feats_x, "feats_x", min_n=2)
    fy = _points(feats_y, "feats_y", fx.shape[1], min_n=2)
    integer("sizes", sizes, 2)
    integer("repeats", repeats, 1)
    n = fx.shape[0]
    if n // 2 <= fx.shape[1] + 1:
        raise InvalidValueError(f"feats_x needs more than 2 (d + 1) = {2 * (fx.shape[1] + 1)} points for subsets of "
                                f"n / 2 with a full-rank covariance, got {n}")
    rng = np.random.default_rng(seed)
    my, cy = fy.mean(0), np.atleast_2d(np.cov(fy.T))

    def fd(x: np.ndarray) -> float:
        return w2_gaussian(x.mean(0), np.atleast_2d(np.cov(x.T)), my, cy) ** 2

    ms = np.rint(1 / np.linspace(1 / n, 2 / n, sizes)).astype(int)
    fds = [np.mean([fd(fx[rng.choice(n, m, replace=False)]) for _ in range(repeats)]) if m < n else fd(fx) for m in ms]
    return float(np.polyfit(1 / ms, fds, 1)[1])


def w2_report(samples: Tensor, data,  repeats: int = 3, generator: torch.Generator | None = None) -> dict[str, float]:
    """W2 of n samples to the first n held-out points, beside its finite-sample floor: the W2 of n
    training points (drawn `repeats` times) to the same held-out points; a perfect sampler scores the floor.
    `data` holds `train` and `test` tensors (a `running.data.Dataset`)."""
    n = min(samples.shape[0], data.test.shape[0], data.train.shape[0])
    if n < 2:
        raise InvalidValueError(f"need at least 2 samples and held-out points, got {n}")
    test = data.test[:n].flatten(1)
    value = w2(samples[:n].flatten(1), test)
    picks = [torch.randperm(data.train.shape[0], generator=generator)[:n] for _ in range(repeats)]
    floors = [w2(data.train[idx].flatten(1), test) for idx in picks]
    floor = float(np.mean(floors))
    return {"w2": value, "w2_floor": floor, "w2_floor_sd": float(np.std(floors)), "w2_ratio": value / floor, "w2_n": n}
