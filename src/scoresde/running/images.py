"""Folders of images read with Pillow, in memory or lazily through a DataLoader with workers.

A folder holds either images, or one sub-folder of images per class (labels 0..K-1 in the sorted
order of the sub-folder names). Files ending in .png, .jpg, .jpeg, .bmp, .tif, .tiff or .webp
(any case) are read; hidden files and files with other endings are skipped. Every file's header is
read at the start, so an unreadable file, an empty folder, an unsupported mode or (without
`image_size`) two images of different sizes are refused with a message naming the file; a file
whose header reads but whose pixels do not is named when it is first decoded.

Channels: `channels=0` gives 1 when every image is greyscale (modes 1, L, LA) and 3 otherwise;
1 or 3 convert every image (colour to grey by ITU-R 601-2 luma). Alpha is dropped, palette
images count as colour, and 16-bit or float images are refused. `image_size=s` resizes the
shorter side to s (bicubic) and centre-crops s x s. Pixel values v in 0..255 become v / 127.5 - 1.
"""
from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Sampler
from torch.utils.data import Dataset as TorchDataset

from ..core.errors import InvalidValueError
from ..core.validate import integer, one_of

__all__ = ["IMAGE_SUFFIXES", "ImageFolder", "LazyImages"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
GREY_MODES = ("1", "L", "LA")
COLOUR_MODES = ("P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
# what Pillow raises on a file it cannot read (UnidentifiedImageError and truncation are OSErrors)
PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
CHUNK = 256  # at most about this many images per worker task (each task's result passes through shared memory)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def _listing(path: Path) -> tuple[list[Path], list[int] | None, tuple[str, ...]]:
    """The image files, their class labels (None without class sub-folders) and the class names."""
    if not path.is_dir():
        raise InvalidValueError(f"image folder {str(path)!r} does not exist")
    kinds = ", ".join(IMAGE_SUFFIXES)
    images = _images_in(path)
    classes = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if images and classes:
        raise InvalidValueError(f"folder {str(path)!r} holds both images ({images[0].name}) and sub-folders "
                         f"({classes[0].name}): put every image in a class sub-folder, or use no sub-folders")
    if not classes:
        if not images:
            raise InvalidValueError(f"folder {str(path)!r} holds no images ({kinds})")
        return images, None, ()
    files, labels = [], []
    for k, folder in enumerate(classes):
        found = _images_in(folder)
        if not found:
            raise InvalidValueError(f"class folder {str(folder)!r} holds no images ({kinds})")
        files += found
        labels += [k] * len(found)
    return files, labels, tuple(p.name for p in classes)


def _header(file: Path) -> tuple[str, tuple[int, int]]:
    """(mode, (width, height)) of an image file, read without decoding its pixels."""
    try:
        with Image.open(file) as im:
            mode, size = im.mode, im.size
    except PIL_ERRORS as err:
        raise InvalidValueError(f"cannot read image {str(file)!r}: {err}") from None
    if mode not in GREY_MODES + COLOUR_MODES:
        raise InvalidValueError(f"image {str(file)!r} has mode {mode} (16-bit or float); only 8-bit grey or colour "
                         f"images are read: convert it to 8 bits")
    return mode, size


def _fit(im: Image.Image, s: int) -> Image.Image:
    """Resize the shorter side to s (bicubic), then crop the central s x s square."""
    w, h = im.size
    nw, nh = max(s, round(w * s / min(w, h))), max(s, round(h * s / min(w, h)))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - s) // 2, (nh - s) // 2
    return im.crop((left, top, left + s, top + s))


class ImageFolder(TorchDataset):
    """The images of a folder (module docstring); `folder[i]` decodes image i to (C, H, W) in [-1, 1].

    Attributes: files, labels (an int64 tensor, or None without class sub-folders), classes (the
    sub-folder names, label k = classes[k]), shape (C, H, W)."""

    def __init__(self, path: str | Path, image_size: int = 0, channels: int = 0):
        self.image_size = integer("image_size", image_size, 0)
        one_of("channels", channels, (0, 1, 3))
        self.path = Path(path)
        self.files, labels, self.classes = _listing(self.path)
        self.labels = None if labels is None else torch.tensor(labels, dtype=torch.int64)
        headers = [_header(f) for f in self.files]
        if not image_size:
            sizes: dict[tuple[int, int], Path] = {}
            for f, (_, size) in zip(self.files, headers):
                sizes.setdefault(size, f)
            if len(sizes) > 1:
                (s0, f0), (s1, f1) = list(sizes.items())[:2]
                raise InvalidValueError(f"images differ in size: {f0.name} is {s0[0]}x{s0[1]}, {f1.name} is "
                                 f"{s1[0]}x{s1[1]} (width x height); set image_size to resize and centre-crop them")
        self.channels = channels or (1 if all(mode in GREY_MODES for mode, _ in headers) else 3)
        w, h = (image_size, image_size) if image_size else headers[0][1]
        self.shape = (self.channels, h, w)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def nbytes(self) -> int:
        """Bytes of all images decoded as float32."""
        return len(self) * int(np.prod(self.shape)) * 4

    def __getitem__(self, i: int) -> Tensor:
        file = self.files[i]
        try:
            with Image.open(file) as im:
                im = im.convert("L" if self.channels == 1 else "RGB")
        except PIL_ERRORS as err:
            raise InvalidValueError(f"cannot read image {str(file)!r}: {err}") from None
        if self.image_size:
            im = _fit(im, self.image_size)
        x = torch.from_numpy(np.array(im, dtype=np.float32)) / 127.5 - 1
        return x[None] if self.channels == 1 else x.permute(2, 0, 1).contiguous()


def _ignore_stop_signals(_worker_id: int) -> None:
    """In a worker: leave SIGINT / SIGTERM to the main process, which saves the run and stops the workers
    (a terminal's Ctrl-C reaches the whole process group)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _Reader(TorchDataset):
    """A folder's images for DataLoader workers: a decoding error comes back as its message, not a traceback."""

    def __init__(self, folder: ImageFolder):
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int) -> Tensor | str:
        try:
            return self.folder[i]
        except ValueError as err:
            return str(err)


def _stack(items: list[Tensor | str]) -> Tensor | str:
    errors = [x for x in items if isinstance(x, str)]
    return errors[0] if errors else torch.stack(items)


class _Batches(Sampler):
    """Yields the index lists set in `batches` at the time it is iterated (one DataLoader 'epoch' per read)."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class LazyImages:
    """Images `rows` of an ImageFolder, read when indexed: a stand-in for an (n, C, H, W) float32 tensor.

    `view[idx]` (an int, slice or index tensor) decodes those images, in chunks shared among `workers`
    persistent DataLoader worker processes (0: in this process), and returns them on `device`. `prefetch(idx)` starts
    that read in the background; the next `view[idx]` with the same indices collects it."""

    def __init__(self, folder: ImageFolder, rows: Tensor, workers: int = 2, device: torch.device | str = "cpu"):
        self.folder, self.rows = folder, rows
        self.workers = integer("data_workers", workers, 0)
        self.device = torch.device(device)
        self.dtype = torch.float32
        self.shape = torch.Size((len(rows),) + folder.shape)
        self._sampler = _Batches()
        self._loader: DataLoader | None = None
        self._pending: tuple[Tensor, object, int] | None = None  # (rows, DataLoader iterator, number of chunks)

    def __len__(self) -> int:
        return self.shape[0]

    def dim(self) -> int:
        return 4

    def to(self, device: torch.device | str) -> LazyImages:
        """The same images, returned on `device` when read."""
        return LazyImages(self.folder, self.rows, self.workers, device)

    def _rows(self, key) -> Tensor:
        return self.rows[key.cpu() if isinstance(key, Tensor) else key]

    def prefetch(self, key) -> None:
        """Start decoding images `key` in the workers (nothing to do without workers)."""
        rows = self._rows(key)
        if self.workers and rows.dim() == 1 and len(rows):
            if self._loader is None:
                self._loader = DataLoader(_Reader(self.folder), batch_sampler=self._sampler, num_workers=self.workers,
                                          collate_fn=_stack, persistent_workers=True,
                                          worker_init_fn=_ignore_stop_signals)
            n_chunks = min(len(rows), max(self.workers, -(-len(rows) // CHUNK)))
            chunks = [c.tolist() for c in rows.tensor_split(n_chunks)]
            self._sampler.batches = chunks
            self._pending = (rows, iter(self._loader), len(chunks))

    def __getitem__(self, key) -> Tensor:
        rows = self._rows(key)
        if rows.dim() == 0:
            return self.folder[int(rows)].to(self.device)
        if not len(rows):
            return torch.empty((0,) + self.shape[1:], device=self.device)
        if not self.workers:
            return torch.stack([self.folder[i] for i in rows.tolist()]).to(self.device)
        if self._pending is None or not torch.equal(self._pending[0], rows):
            self.prefetch(key)
        _, it, n_chunks = self._pending
        self._pending = None
        parts = [next(it) for _ in range(n_chunks)]
        error = next((p for p in parts if isinstance(p, str)), None)
        if error is not None:
            raise InvalidValueError(error)
        return torch.cat(parts).to(self.device)
