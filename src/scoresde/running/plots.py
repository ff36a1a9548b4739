"""PNG plots of a run (matplotlib, Agg backend): loss curve, samples beside data, reverse trajectories.
Every figure is rendered to memory and written atomically (`files.atomic_write`)."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from .files import atomic_write  # noqa: E402

__all__ = ["image_grid", "plot_loss", "plot_samples", "plot_trajectories", "save_figure", "save_grid"]


def save_figure(fig, out: str | Path, tight: bool = True) -> Path:
    """Render `fig` (format from the suffix, default png) to memory, close it, write it atomically."""
    out = Path(out)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format=out.suffix[1:] or "png", dpi=110, bbox_inches="tight" if tight else None)
    finally:
        plt.close(fig)
    atomic_write(out, buf.getvalue())
    return out


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_loss(metrics_path: str | Path, out: str | Path) -> Path:
    """Training loss (and held-out loss where evaluated) against the step, log scale."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    held = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for pts, label, style in ((train, "train (running mean)", "-"), (held, "held-out (EMA)", "o-")):
        if pts:
            ax.plot(*zip(*pts), style, label=label, ms=3)
    values = [v for _, v in train + held]
    if values and min(values) > 0:
        ax.set_yscale("log")  # DSM-type losses are positive; implicit / sliced ones need not be
    ax.set(xlabel="step", ylabel="loss", title="training loss")
    ax.legend()
    return save_figure(fig, out)


def image_grid(x: Tensor | np.ndarray, ncols: int = 8) -> np.ndarray:
    """(n, C, H, W) in [-1, 1] -> one (rows * (H+1), ncols * (W+1), C) array in [0, 1]."""
    x = np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x, dtype=np.float32)
    n, c, h, w = x.shape
    rows = math.ceil(n / ncols)
    out = np.ones((rows * (h + 1), ncols * (w + 1), c), dtype=np.float32)
    for i in range(n):
        r, k = divmod(i, ncols)
        out[r * (h + 1):r * (h + 1) + h, k * (w + 1):k * (w + 1) + w] = x[i].transpose(1, 2, 0)
    return np.clip((out + 1) / 2, 0, 1)


def plot_samples(samples: Tensor, data: Tensor, out: str | Path, title: str = "") -> Path:
    """Samples beside data: scatter of the first two coordinates for vectors, image grids for images."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.3))
    for ax, x, name in ((axes[0], data, "data (held out)"), (axes[1], samples, "samples")):
        x = x.detach().cpu()
        if x.dim() == 4:
            img = image_grid(x[:64])
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            ax.axis("off")
        else:
            ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5)
            ax.set_aspect("equal")
        ax.set_title(f"{name} (n={x.shape[0]})")
    if data.dim() == 2:
        lo = data[:, :2].min(0).values.cpu() - 0.5
        hi = data[:, :2].max(0).values.cpu() + 0.5
        for ax in axes:
            ax.set_xlim(lo[0], hi[0])
            ax.set_ylim(lo[1], hi[1])
    if title:
        fig.suptitle(title)
    return save_figure(fig, out)


def plot_trajectories(traj: Tensor, data: Tensor, out: str | Path, n_paths: int = 8, points: int = 80) -> Path:
    """Reverse-time paths (grid points, n, d) of the first two coordinates, thinned to `points`
    times, with the data drawn over them."""
    traj = traj.detach().cpu()
    traj = traj[np.unique(np.linspace(0, traj.shape[0] - 1, points).round().astype(int))]
    fig, ax = plt.subplots(figsize=(4.6, 4.3))
    for i in range(min(n_paths, traj.shape[1])):
        ax.plot(traj[:, i, 0], traj[:, i, 1], lw=0.6, alpha=0.6)
        ax.plot(traj[0, i, 0], traj[0, i, 1], "k.", ms=4)
        ax.plot(traj[-1, i, 0], traj[-1, i, 1], "r.", ms=7, zorder=4)
    ax.scatter(data[:, 0].cpu(), data[:, 1].cpu(), s=1, alpha=0.4, c="black", zorder=3)
    ax.set_aspect("equal")
    ax.set_title("reverse SDE paths (black dot: x_T, red: x_0)")
    return save_figure(fig, out)


def save_grid(rows: Sequence[Tensor], path: str | Path, labels: Sequence[str] = (), cols: int = 16,
              scale: float = 0.45) -> Path:
    """Images in [-1, 1] of shape (n, 1 or 3, H, W), one row of `cols` per entry of `rows`, with row labels."""
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
    return save_figure(fig, path, tight=False)
