"""FID-style evaluation without downloads (DESIGN 7.1; issue: imaging).

A small CNN classifier is trained on the data set itself; its penultimate activations are the
features for the Frechet distance (`metrics.frechet_distance`) and for k-NN precision and recall
(Kynkaanniemi et al. 1904.06991). The classifier is trained once, saved as safetensors with its
held-out accuracy in the metadata, and reloaded afterwards. With `time_conditional=True` the same
network takes a noise level and serves as the noise-conditional classifier of classifier guidance.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..core.errors import InvalidValueError
from ..learning.networks import SinusoidalEmbedding

__all__ = ["Classifier", "train_classifier", "image_features", "knn_precision_recall"]


class Classifier(nn.Module):
    """conv(3x3) x3 with stride-2 downsampling, global pooling, a feature layer and a linear head."""

    def __init__(self, channels: int = 1, n_classes: int = 10, width: int = 32, feature_dim: int = 64,
                 time_conditional: bool = False):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, feature_dim))
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


def train_classifier(x: Tensor, y: Tensor, *, steps: int = 600, batch_size: int = 128, lr: float = 2e-3,
                     noise_fn=None, generator: torch.Generator | None = None, **kwargs) -> Classifier:
    """Cross-entropy training with AdamW. `noise_fn(x, generator) -> (x_noisy, c)` (optional) corrupts
    each batch and returns the conditioning, for a noise-conditional classifier."""
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise InvalidValueError(f"x and y must be non-empty with the same length, got {x.shape[0]} and {y.shape[0]}")
    model = Classifier(channels=x.shape[1], n_classes=int(y.max()) + 1, time_conditional=noise_fn is not None, **kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=generator)
        xb, c = noise_fn(x[idx], generator) if noise_fn is not None else (x[idx], None)
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
