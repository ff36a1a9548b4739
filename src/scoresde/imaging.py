"""Image helpers for the CLI and the digits benchmark: masks from files, label-guided scores, sample grids."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .guidance import classifier_free
from .sde import ScoreFn

__all__ = ["load_mask", "label_guided", "save_grid"]


def load_mask(path: str | Path, sample_shape: tuple[int, ...]) -> Tensor:
    """A 0/1 mask (1 = known pixel) of one sample's shape (C, H, W) from .npy (nonzero = known) or
    PNG (brightness > 1/2 = known, colour averaged); an (H, W) mask applies to every channel."""
    path = Path(path)
    if path.suffix == ".npy":
        arr = np.load(path, allow_pickle=False).astype(np.float64)
        arr = arr != 0
    elif path.suffix == ".png":
        import matplotlib.image as mpimg

        img = np.asarray(mpimg.imread(path), dtype=np.float64)
        arr = (img[..., :3].mean(-1) if img.ndim == 3 else img) > 0.5
    else:
        raise ValueError(f"mask must be a .npy or .png file, got {str(path)!r}")
    mask = torch.from_numpy(np.ascontiguousarray(arr)).float()
    if tuple(mask.shape) == tuple(sample_shape[-2:]) and len(sample_shape) == 3:
        mask = mask.expand(sample_shape).clone()
    if tuple(mask.shape) != tuple(sample_shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)}; the run's samples have shape {tuple(sample_shape)} "
                         f"(an (H, W) mask is also accepted)")
    return mask


def label_guided(model: nn.Module, label: int | Tensor, n: int, guidance: float = 0.0) -> ScoreFn:
    """Classifier-free guided score (1 + w) s(x, t, y) - w s(x, t) of a class-conditional model for n
    samples of class `label` (an int, or n labels); classes 0..net.n_classes - 1 (the null label is none)."""
    n_classes = int(getattr(getattr(model, "net", model), "n_classes", 0))
    if not n_classes:
        raise ValueError("this run's network is unconditional: train it with net_args.n_classes to use --label")
    device = next(model.parameters()).device
    if isinstance(label, Tensor):
        y = label.to(device=device, dtype=torch.long)
    elif isinstance(label, int) and not isinstance(label, bool):
        y = torch.full((n,), label, dtype=torch.long, device=device)
    else:
        raise ValueError(f"label must be an integer or a tensor of n integers, got {label!r}")
    if y.shape != (n,) or bool(((y < 0) | (y >= n_classes)).any()):
        raise ValueError(f"label must hold {n} integers in [0, {n_classes - 1}], got {label!r}")
    if not guidance >= 0:
        raise ValueError(f"guidance must be >= 0, got {guidance}")
    return classifier_free(model, y, guidance)


def save_grid(rows: Sequence[Tensor], path: str | Path, labels: Sequence[str] = (), cols: int = 16,
              scale: float = 0.45) -> Path:
    """Images in [-1, 1] of shape (n, 1 or 3, H, W), one row of `cols` per entry of `rows`, with row labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(len(rows), 1, figsize=(cols * scale + 1.8, len(rows) * scale * 1.15 + 0.2), squeeze=False)
    for k, (ax, x) in enumerate(zip(axes[:, 0], rows)):
        x = x[:cols].detach().float().clamp(-1, 1).cpu()
        h, w = x.shape[-2:]
        strip = torch.zeros(x.shape[1], h, cols * (w + 1))  # grey separators
        for j, img in enumerate(x):
            strip[:, :, j * (w + 1):j * (w + 1) + w] = img
        ax.imshow(((strip + 1) / 2).permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        if k < len(labels):
            ax.set_ylabel(labels[k], rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
