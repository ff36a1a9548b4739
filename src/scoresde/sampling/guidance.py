"""Controllable generation as score wrappers that every sampler accepts (DESIGN section 12).

- classifier-free guidance (Ho & Salimans 2207.12598): s = (1 + w) s(x, t, y) - w s(x, t, None);
- classifier guidance (Dhariwal & Nichol 2105.05233; Song et al. 2011.13456 sec. 5):
  s = s(x, t) + scale grad_x log p_t(y | x) with a noise-conditional classifier;
- inpainting: the score of p_t(x | x_0 on the mask = y). Two ways:
  "tweedie" adds grad_x log p(y | x_t), with x_0 | x_t approximated by the Gaussian of Tweedie's
  first two moments, E[x_0 | x_t] = (x + sigma^2 s) / alpha and Cov[x_0 | x_t] = (sigma^2 / alpha)
  d E[x_0 | x_t] / dx (Boys et al. 2310.06721). That is Doob's h-transform of the reverse process,
  exact when the data are Gaussian; the covariance solve uses conjugate gradients with
  vector-Jacobian products of the score (its Jacobian is a Hessian, so symmetric), truncated at
  cg_iters. A weight w multiplies the added term: the score of p_t(x) p(y | x_t)^w, the Gaussian's
  covariance divided by w, which steers harder where that Gaussian is too broad (multimodal data at
  high noise) and is exact only at w = 1.
  "replace" (Song et al. 2011.13456 app. I.2) evaluates the joint score with the known pixels
  replaced by a forward-noised copy alpha y + sigma z: one score call per step, but biased even for
  Gaussian data.
  "smc" is not a score wrapper but its own sampler (`twisted.twisted_inpaint`): particles steered by a
  Tweedie twisting function and importance-weighted, exact for any data as the particles grow.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from ..core.errors import InvalidValueError
from ..core.sde import LinearSDE, ScoreFn, batch_dot, expand_like
from ..core.validate import integer, number
from .common import mask_like

__all__ = ["classifier_free", "classifier_guidance", "inpaint_score", "inpaint", "INPAINT_METHODS", "SMC_OPTIONS", "CG_ITERS"]

CondScoreFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]
INPAINT_METHODS = ("tweedie", "replace", "smc")
SMC_OPTIONS = ("particles", "sigma_y", "ess_min")  # the options of method "smc" (`twisted.twisted_inpaint`)
# CG iterations of the Tweedie solve per score call. A truncation on purpose: on the MNIST VP model (EM, NFE 100,
# held-out digits 0-49) the lower half's class was recovered 0.70 of the time at 1 and at 5 iterations but 0.42 at
# 15, where the solve trusts the learned covariance's smallest eigenvalues and the guidance blows up.
CG_ITERS = 5


def classifier_free(score_fn: CondScoreFn, y: Tensor, w: float) -> ScoreFn:
    """(1 + w) s(x, t, y) - w s(x, t, None); `score_fn(x, t, None)` is the unconditional score."""
    if w == 0:
        return lambda x, t: score_fn(x, t, y)
    return lambda x, t: (1 + w) * score_fn(x, t, y) - w * score_fn(x, t, None)


def classifier_guidance(score_fn: ScoreFn, log_probs_fn: Callable[[Tensor, Tensor], Tensor], y: Tensor,
                        scale: float = 1.0) -> ScoreFn:
    """s(x, t) + scale grad_x log p_t(y | x); `log_probs_fn(x, t)` returns (batch, classes) log-probabilities."""

    def guided(x: Tensor, t: Tensor) -> Tensor:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            log_py = log_probs_fn(xg, t).gather(1, y[:, None]).sum()
            (grad,) = torch.autograd.grad(log_py, xg)
        return score_fn(x, t) + scale * grad

    return guided


def _cg(matvec: Callable[[Tensor], Tensor], b: Tensor, iters: int, tol: float) -> Tensor:
    """Batched conjugate gradients for A q = b, A symmetric positive definite per sample; truncated (Steihaug) for
    a learned score, whose Jacobian need not be: a sample stops at the first direction of non-positive curvature
    p^T A p <= 0 and keeps the iterate reached so far (0 if it is the first), as it does once its residual is
    below tol times the first."""
    q = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rs = batch_dot(r, r)
    stop = tol**2 * rs
    active = rs > stop
    for _ in range(iters):
        Ap = matvec(p)
        pAp = batch_dot(p, Ap)
        active = active & (pAp > 0)
        if not active.any():
            break
        a = torch.where(active, rs / torch.where(active, pAp, 1.0), 0.0)
        q = q + expand_like(a, b) * p
        r = r - expand_like(a, b) * Ap
        rs_new = batch_dot(r, r)
        active = active & (rs_new > stop)
        p = r + expand_like(torch.where(active, rs_new / torch.where(active, rs, 1.0), 0.0), b) * p
        rs = rs_new
    return q


def inpaint_score(sde: LinearSDE, score_fn: ScoreFn, known: Tensor, mask: Tensor, *, method: str = "tweedie",
                  cg_iters: int = CG_ITERS, cg_tol: float = 1e-6, weight: float = 1.0,
                  generator: torch.Generator | None = None) -> ScoreFn:
    """The score of p_t(x | x_0[mask] = known[mask]) for the samplers; mask is 1 on known pixels; `cg_iters`:
    vector-Jacobian products per call of the truncated CG solve (exact for Gaussian data once it converges).
    "tweedie" with `weight` w: grad log p_t(x) + w grad log p(y | x_t), the score of p_t(x) p(y | x_t)^w, i.e.
    Cov[x_0 | x_t] divided by w; w = 1 is the h-transform (module docstring)."""
    integer("cg_iters", cg_iters)
    if method not in INPAINT_METHODS:
        raise InvalidValueError(f"method must be one of {', '.join(INPAINT_METHODS)}, got {method!r}")
    number("weight", weight, 0.0)
    if method == "replace" and weight != 1:
        raise InvalidValueError(f"weight applies to method 'tweedie' only (replace has no likelihood term), got {weight}")
    m = mask_like(known, mask)

    def replace(x: Tensor, t: Tensor) -> Tensor:
        a, s = expand_like(sde.alpha(t), x), expand_like(sde.sigma(t), x)
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return score_fn(m * (a * known + s * z) + (1 - m) * x, t)

    def tweedie(x: Tensor, t: Tensor) -> Tensor:
        a, s = expand_like(sde.alpha(t), x), expand_like(sde.sigma(t), x)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            score = score_fn(xg, t)
            # the score's Jacobian is a Hessian, hence symmetric: vector-Jacobian products serve as J w
            jac = lambda w: torch.autograd.grad(score, xg, w, retain_graph=True)[0]
            x0 = (x + s**2 * score.detach()) / a
            cov_v = lambda w: m * (s**2 / a) * (w + s**2 * jac(w)) / a  # Cov[x0 | x_t] on the mask
            q = _cg(cov_v, m * (known - x0), cg_iters, cg_tol)
            # grad_x of -(1/2) r^T Cov^{-1} r, r = known - x0_hat: (d x0_hat / dx)^T q
            return (score + weight * (q + s**2 * jac(q)) / a).detach()

    return tweedie if method == "tweedie" else replace


def inpaint(sde: LinearSDE, score_fn: ScoreFn, known: Tensor, mask: Tensor, *, method: str = "tweedie",
            sampler: str = "em", nfe: int = 200, cg_iters: int | None = None, weight: float = 1.0,
            generator: torch.Generator | None = None, **options) -> Tensor:
    """Fill the pixels outside `mask` with any sampler of `sampling.METHODS`; known pixels are kept. method:
    "tweedie" (default; exact for Gaussian data once the CG converges, its error shrinks with nfe; each step
    costs up to cg_iters vector-Jacobian products, CG_ITERS by default; `weight`: `inpaint_score`), "replace"
    (one score call per step, but biased at any nfe) or "smc" (`twisted.twisted_inpaint`, sampler "em" or
    "ei", options particles, sigma_y, ess_min; `weight` is its twisting weight); module docstring. The sampler
    runs on its fixed grid (or options' ts): an automatic schedule is searched for an unconditional score."""
    from .methods import sample_on_grid
    from .twisted import twisted_inpaint

    if cg_iters is not None and method != "tweedie":
        raise InvalidValueError(f"cg_iters applies to method 'tweedie' only, got method {method!r}")
    if method == "smc":
        unknown = sorted(set(options) - set(SMC_OPTIONS))
        if unknown:
            raise InvalidValueError(f"inpaint method 'smc' takes no option {', '.join(map(repr, unknown))}; its "
                                    f"options: {', '.join(SMC_OPTIONS)}")
        return twisted_inpaint(sde, score_fn, known, mask, sampler=sampler, nfe=nfe, weight=weight,
                               generator=generator, **options)
    cond = inpaint_score(sde, score_fn, known, mask, method=method, cg_iters=CG_ITERS if cg_iters is None else cg_iters,
                         weight=weight, generator=generator)
    x = sample_on_grid(sde, cond, tuple(known.shape), method=sampler, nfe=nfe, generator=generator,
                       dtype=known.dtype, **options)
    m = mask.to(known.dtype)
    return m * known + (1 - m) * x


def label_guided(model: nn.Module, label: int | Tensor, n: int, guidance: float = 0.0) -> ScoreFn:
    """Classifier-free guided score (1 + w) s(x, t, y) - w s(x, t) of a class-conditional model for n
    samples of class `label` (an int, or n labels); classes 0..net.n_classes - 1 (the null label is none)."""
    n_classes = int(getattr(getattr(model, "net", model), "n_classes", 0))
    if not n_classes:
        raise InvalidValueError("this run's network is unconditional: train it with net_args.n_classes to use --label")
    device = next(model.parameters()).device
    if isinstance(label, Tensor):
        y = label.to(device=device, dtype=torch.long)
    elif isinstance(label, int) and not isinstance(label, bool):
        y = torch.full((n,), label, dtype=torch.long, device=device)
    else:
        raise InvalidValueError(f"label must be an integer or a tensor of n integers, got {label!r}")
    if y.shape != (n,) or bool(((y < 0) | (y >= n_classes)).any()):
        raise InvalidValueError(f"label must hold {n} integers in [0, {n_classes - 1}], got {label!r}")
    if not guidance >= 0:
        raise InvalidValueError(f"guidance must be >= 0, got {guidance}")
    return classifier_free(model, y, guidance)
