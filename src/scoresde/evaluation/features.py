"""FID-style evaluation without downloads (DESIGN 7.1; issues 12 and 20).

A small CNN classifier is trained on the data set itself (`running.feature_net`: the 8x8 digits,
MNIST); its penultimate activations are the features for the Frechet distance
(`metrics.frechet_distance`), the kernel distance `kid` (Binkowski et al. 1801.01401) and k-NN
precision and recall (Kynkaanniemi et al. 1904.06991). The classifier is trained once, saved as
safetensors with its held-out accuracy in the metadata, and reloaded afterwards. With
`time_conditional=True` the same network takes a noise level and serves as the noise-conditional
classifier of classifier guidance.

These numbers are measured on this small classifier's 64 features, not on Inception-v3's 2048:
they are NOT comparable with published FID or KID values, only with each other (same data set,
same feature network, same n) and with their floor, the value two sets of real images score.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..core.errors import InvalidValueError
from ..learning.networks import SinusoidalEmbedding

__all__ = ["Classifier", "class_total_variation", "image_features", "kid", "knn_precision_recall", "random_shift",
           "train_classifier"]


class Classifier(nn.Module):
    """conv(3x3) x3 with stride-2 downsampling, average pooling to pool x pool, a feature layer and a
    linear head. pool = 1 (global pooling) suits 8x8 digits; at 28x28 it loses where the strokes are
    (84% held-out accuracy on MNIST, measured), pool = 7 keeps the 7x7 map (98.8%)."""

    def __init__(self, channels: int = 1, n_classes: int = 10, width: int = 32, feature_dim: int = 64,
                 time_conditional: bool = False, pool: int = 1):
        super().__init__()
        if not isinstance(pool, int) or pool < 1:
            raise InvalidValueError(f"pool must be an integer >= 1, got {pool!r}")
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(pool), nn.Flatten(), nn.Linear(2 * width * pool * pool, feature_dim))
        self.time = nn.Sequential(SinusoidalEmbedding(32), nn.Linear(32, feature_dim)) if time_conditional else None
        self.head = nn.Linear(feature_dim, n_classes)

    def features(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        h = self.body(x)
        if self.time is not None:
            if c is None:
                raise InvalidValueError("a time-conditional classifier needs the conditioning c of shape (batch,)")
            h = h + self.time(c)
        return F.silu(h)

    def forward(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        """Class logits."""
        return self.head(self.features(x, c))


def random_shift(x: Tensor, max_shift: float, generator: torch.Generator | None = None,
                 background: float = -1.0) -> Tensor:
    """Each image (n, C, H, W) translated by its own offset, uniform in [-max_shift, max_shift] pixels along
    each axis (bilinear interpolation); pixels moved in from outside take the value `background`."""
    n, _, h, w = x.shape
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = (torch.rand(n, 2, generator=generator) * 2 - 1) * max_shift * 2 / torch.tensor([w, h])
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x - background, grid, align_corners=False) + background  # zero padding = background


def train_classifier(x: Tensor, y: Tensor, *, steps: int = 600, batch_size: int = 128, lr: float = 2e-3,
                     shift: float = 0.0, noise_fn=None, generator: torch.Generator | None = None,
                     **kwargs) -> Classifier:
    """Cross-entropy training with AdamW; `kwargs` go to `Classifier`. `shift` > 0 augments each batch with
    `random_shift(batch, shift)` (background -1). `noise_fn(x, generator) -> (x_noisy, c)` (optional)
    corrupts each batch and returns the conditioning, for a noise-conditional classifier. With a `generator`
    the initial weights are drawn from it too, so the result does not depend on the global RNG."""
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise InvalidValueError(f"x and y must be non-empty with the same length, got {x.shape[0]} and {y.shape[0]}")
    if shift < 0:
        raise InvalidValueError(f"shift must be >= 0 pixels, got {shift}")
    with torch.random.fork_rng(devices=[], enabled=generator is not None):
        if generator is not None:
            torch.manual_seed(int(torch.randint(2 ** 62, (), generator=generator)))
        model = Classifier(channels=x.shape[1], n_classes=int(y.max()) + 1, time_conditional=noise_fn is not None,
                           **kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=generator)
        xb = random_shift(x[idx], shift, generator) if shift else x[idx]
        xb, c = noise_fn(xb, generator) if noise_fn is not None else (xb, None)
        loss = F.cross_entropy(model(xb, c), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: Classifier, x: Tensor, y: Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


@torch.no_grad()
def image_features(x: Tensor, model: Classifier, batch_size: int = 512) -> Tensor:
    """Penultimate-layer features (n, feature_dim) of images (n, C, H, W)."""
    if x.dim() != 4:
        raise InvalidValueError(f"images must have shape (n, C, H, W), got {tuple(x.shape)}")
    return torch.cat([model.features(x[i:i + batch_size].float()) for i in range(0, x.shape[0], batch_size)])


def kid(real: Tensor | np.ndarray, fake: Tensor | np.ndarray, blocks: int = 10, seed: int = 0) -> tuple[float, float]:
    """Kernel distance KID (Binkowski et al. 1801.01401) between two feature sets (n, d) and (m, d): the
    unbiased MMD^2 with the cubic polynomial kernel k(a, b) = (a.b / d + 1)^3 on `blocks` independent pairs
    of subsets (both sets shuffled with `seed`, then cut into `blocks` disjoint blocks; leftovers unused).
    Returns (mean, standard error = sd / sqrt(blocks)). The mean is unbiased (it can be below 0; its
    expectation is 0 when both sets come from one law) and, the blocks being disjoint, so is the error;
    the paper's subsets of 1000 drawn 100 times overlap, which makes their spread no standard error."""
    real, fake = (np.asarray(a, dtype=np.float64) for a in (real, fake))
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise InvalidValueError(f"real and fake must be (n, d) with the same d, got {real.shape} and {fake.shape}")
    if not isinstance(blocks, int) or blocks < 2:
        raise InvalidValueError(f"blocks must be an integer >= 2 (for a standard error), got {blocks!r}")
    if min(len(real), len(fake)) < 2 * blocks:
        raise InvalidValueError(f"each set needs at least 2 points per block: {blocks} blocks, sizes {len(real)} and "
                                f"{len(fake)}")
    rng = np.random.default_rng(seed)
    d = real.shape[1]
    vals = []
    for a, b in zip(np.array_split(rng.permutation(real)[:len(real) // blocks * blocks], blocks),
                    np.array_split(rng.permutation(fake)[:len(fake) // blocks * blocks], blocks)):
        kaa, kbb, kab = ((u @ v.T / d + 1) ** 3 for u, v in ((a, a), (b, b), (a, b)))
        n, m = len(a), len(b)
        vals.append((kaa.sum() - np.trace(kaa)) / (n * (n - 1)) + (kbb.sum() - np.trace(kbb)) / (m * (m - 1))
                    - 2 * kab.mean())
    return float(np.mean(vals)), float(np.std(vals, ddof=1) / np.sqrt(blocks))


def class_total_variation(real: Tensor, fake: Tensor, n_classes: int) -> float:
    """Total variation (1/2) sum_y |p(y) - q(y)| between the class frequencies of two label sets (integer
    classes in [0, n_classes)). With the feature classifier's labels on both sides its errors largely cancel.
    Two samples (sizes n, m) of one law with K equally frequent classes score sqrt((K - 1) (1/n + 1/m) / (2 pi))
    on average (the normal approximation of E|p_hat - q_hat| per class): that, not 0, is the floor."""
    if real.dim() != 1 or fake.dim() != 1 or not len(real) or not len(fake):
        raise InvalidValueError(f"real and fake must be non-empty 1-D label sets, got shapes {tuple(real.shape)} and "
                                f"{tuple(fake.shape)}")
    p, q = (torch.bincount(y, minlength=n_classes).double() / len(y) for y in (real, fake))
    if len(p) != n_classes or len(q) != n_classes or min(int(real.min()), int(fake.min())) < 0:
        raise InvalidValueError(f"labels must lie in [0, {n_classes}), got [{min(int(real.min()), int(fake.min()))}, "
                                f"{max(int(real.max()), int(fake.max()))}]")
    return 0.5 * float((p - q).abs().sum())


def _kth_nn_radius(a: np.ndarray, k: int) -> np.ndarray:
    d = np.sqrt(((a[:, None, :] - a[None, :, :]) ** 2).sum(-1))
    return np.sort(d, axis=1)[:, k]  # column 0 is the point itself


def _coverage(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> float:
    d = np.sqrt(((points[:, None, :] - centres[None, :, :]) ** 2).sum(-1))
    return float((d <= radii[None, :]).any(1).mean())


def knn_precision_recall(real: Tensor | np.ndarray, fake: Tensor | np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (1904.06991): each set's manifold is the union of balls reaching
    each point's k-th nearest neighbour; precision = share of fake points in the real manifold,
    recall = share of real points in the fake manifold."""
    real, fake = (np.asarray(a, dtype=np.float64) for a in (real, fake))
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise InvalidValueError(f"real and fake must be (n, d) with the same d, got {real.shape} and {fake.shape}")
    if min(len(real), len(fake)) <= k:
        raise InvalidValueError(f"k must be smaller than both set sizes, got k={k}, sizes {len(real)} and {len(fake)}")
    return (_coverage(fake, real, _kth_nn_radius(real, k)), _coverage(real, fake, _kth_nn_radius(fake, k)))
