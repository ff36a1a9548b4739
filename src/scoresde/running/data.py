"""Training data: built-in toy sets and analytic mixtures, scikit-learn's 8x8 digits, user arrays
(.npy/.npz) and folders of PNG images (DESIGN section 8).

Everything is checked before any training step: empty sets, wrong ranks, NaN/inf and images of
different sizes are refused with a message naming the problem. Vectors are (n, d); images are
(n, C, H, W) (an (n, H, W) array is read as one channel). Built-in images are scaled to [-1, 1];
user arrays are used as given.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..core.targets import TOY_DATASETS, GaussianMixture, grid, random_mixture, ring

__all__ = ["Dataset", "validate", "load_dataset", "load_digits", "load_array", "load_png_folder", "builtin_names"]

_MIXTURES = {"ring": ring, "grid": grid}
_MIXTURE_DIM = re.compile(r"^mixture(\d+)$")


@dataclass(frozen=True)
class Dataset:
    """Train and held-out test points, optional integer labels, and the exact law when it is known."""

    train: Tensor
    test: Tensor
    name: str
    train_labels: Tensor | None = None
    test_labels: Tensor | None = None
    mixture: GaussianMixture | None = None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])

    @property
    def is_image(self) -> bool:
        return self.train.dim() == 4


def builtin_names() -> list[str]:
    return sorted(TOY_DATASETS) + sorted(_MIXTURES) + ["mixture<d> (e.g. mixture16)", "digits"]


def validate(x: np.ndarray | Tensor, name: str = "data") -> Tensor:
    """`x` as a float32 tensor of shape (n, d) or (n, C, H, W); refuse anything else with a ValueError."""
    arr = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool) \
            or np.iscomplexobj(arr):
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim not in (2, 4):
        raise ValueError(f"{name} must have shape (n, d) for vectors or (n, H, W) / (n, C, H, W) for images, "
                         f"got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    bad = ~np.isfinite(arr.astype(np.float64, copy=False))
    if bad.any():
        rows = np.flatnonzero(bad.reshape(arr.shape[0], -1).any(1))
        raise ValueError(f"{name} contains {int(bad.sum())} NaN/inf value(s) in {rows.size} sample(s), "
                         f"first at sample {int(rows[0])}")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def load_digits(pad_to: int = 0) -> tuple[Tensor, Tensor]:
    """scikit-learn's 1797 8x8 digits as (n, 1, 8, 8) in [-1, 1] (pixel / 8 - 1), and labels;
    `pad_to` > 8 pads with the background value -1 to (pad_to, pad_to)."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.from_numpy(d.images.astype(np.float32)) / 8.0 - 1.0
    x = x[:, None]
    if pad_to:
        if pad_to < 8:
            raise ValueError(f"pad_to must be 0 or >= 8 for the 8x8 digits, got {pad_to}")
        lo = (pad_to - 8) // 2
        x = torch.nn.functional.pad(x, (lo, pad_to - 8 - lo, lo, pad_to - 8 - lo), value=-1.0)
    return x, torch.from_numpy(d.target.astype(np.int64))


def load_array(path: str | Path) -> tuple[Tensor, Tensor | None]:
    """Data (and labels) from .npy, or .npz with arrays `x` (or `data`, or the only array) and
    optionally `y` / `labels`."""
    path = Path(path)
    if path.suffix == ".npy":
        return validate(np.load(path, allow_pickle=False), str(path)), None
    if path.suffix != ".npz":
        raise ValueError(f"data file must end in .npy or .npz, got {str(path)!r}")
    with np.load(path, allow_pickle=False) as z:
        keys = list(z.keys())
        key = next((k for k in ("x", "data") if k in keys), keys[0] if len(keys) == 1 else None)
        if key is None:
            raise ValueError(f"{path}: cannot tell which array is the data among {keys}; name it 'x'")
        x = validate(z[key], f"{path}[{key}]")
        label_key = next((k for k in ("y", "labels") if k in keys), None)
        labels = None
        if label_key is not None:
            labels = torch.from_numpy(np.asarray(z[label_key]).astype(np.int64))
            if labels.shape != (x.shape[0],):
                raise ValueError(f"{path}: labels {label_key!r} must have shape ({x.shape[0]},), got {tuple(labels.shape)}")
    return x, labels


def load_png_folder(path: str | Path) -> Tensor:
    """Every *.png in a folder as (n, C, H, W) in [-1, 1]; grey (C = 1) or RGB (alpha dropped)."""
    import matplotlib.image as mpimg

    path = Path(path)
    files = sorted(path.glob("*.png"))
    if not files:
        raise ValueError(f"folder {str(path)!r} holds no .png files")
    images = []
    for f in files:
        img = np.asarray(mpimg.imread(f), dtype=np.float32)
        img = img[None] if img.ndim == 2 else img[..., :3].transpose(2, 0, 1)
        if images and img.shape != images[0].shape:
            raise ValueError(f"images must all have one size: {files[0].name} is {images[0].shape} (C, H, W), "
                             f"{f.name} is {img.shape}")
        images.append(img)
    return validate(2 * np.stack(images) - 1, str(path))


def _split(x: Tensor, labels: Tensor | None, n_test: int, generator: torch.Generator):
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 samples to hold some out, got {n}")
    k = max(1, min(n_test, n // 5))
    perm = torch.randperm(n, generator=generator)
    te, tr = perm[:k], perm[k:]
    pick = (lambda idx: labels[idx]) if labels is not None else (lambda idx: None)
    return x[tr], x[te], pick(tr), pick(te)


def load_dataset(source: str, *, n_train: int = 20000, n_test: int = 2000, seed: int = 0, pad_to: int = 0) -> Dataset:
    """Built-in names (see `builtin_names`) draw n_train + n_test fresh points with the seed; finite
    sets (digits, files, folders) hold out min(n_test, n / 5) points chosen with the seed."""
    g = torch.Generator().manual_seed(seed)
    m = _MIXTURE_DIM.match(source)
    if source in TOY_DATASETS:
        x = TOY_DATASETS[source](n_train + n_test, generator=g).float()
        return Dataset(validate(x[:n_train], source), validate(x[n_train:], source), source)
    if source in _MIXTURES or m:
        mix = _MIXTURES[source]() if source in _MIXTURES else random_mixture(dim=int(m.group(1)), seed=0)
        x = mix.sample(n_train + n_test, generator=g).float()
        return Dataset(x[:n_train], x[n_train:], source, mixture=mix)
    if pad_to and source != "digits":
        raise ValueError("pad_to applies to the built-in digits only")
    name = source
    if source == "digits":
        x, labels = load_digits(pad_to)
    else:
        path = Path(source)
        name = path.name
        if path.is_dir():
            x, labels = load_png_folder(path), None
        elif path.is_file():
            x, labels = load_array(path)
        else:
            raise ValueError(f"unknown data {source!r}: not a file or folder, and not a built-in name; "
                             f"valid names: {', '.join(builtin_names())}")
    tr, te, ltr, lte = _split(x, labels, n_test, g)
    return Dataset(tr, te, name, ltr, lte)


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
