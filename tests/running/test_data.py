import numpy as np
import pytest
import torch

from scoresde.core.errors import DamagedFileError, MissingFileError
from scoresde.core.targets import two_moons
from scoresde.running.data import (
    Dataset,
    content_hash,
    data_record,
    load_array,
    load_dataset,
    load_digits,
    load_mask,
    validate,
)
from scoresde.running.images import LazyImages


def test_toy_sets_are_seeded_draws_of_the_targets():
    d = load_dataset("moons", n_train=300, n_test=50, seed=3)
    assert d.train.shape == (300, 2) and d.test.shape == (50, 2) and d.train.dtype == torch.float32
    x = two_moons(350, generator=torch.Generator().manual_seed(3)).float()
    assert torch.equal(torch.cat([d.train, d.test]), x)
    assert not torch.equal(load_dataset("moons", n_train=300, n_test=50, seed=4).train, d.train)
    for name in ("checkerboard", "swiss_roll", "rings"):
        assert load_dataset(name, n_train=10, n_test=5).train.shape == (10, 2)


def test_analytic_mixtures_carry_their_law():
    d = load_dataset("mixture16", n_train=100, n_test=20)
    assert d.train.shape == (100, 16) and d.mixture is not None and d.mixture.dim == 16
    assert load_dataset("ring", n_train=10, n_test=5).mixture.means.shape == (8, 2)


def test_digits_scaled_split_and_padded():
    x, y = load_digits()
    assert x.shape == (1797, 1, 8, 8) and y.shape == (1797,)
    assert x.min() == -1 and x.max() == 1  # pixel values 0..16 -> [-1, 1]
    d = load_dataset("digits", n_test=200, seed=0)
    assert d.is_image and d.test.shape == (200, 1, 8, 8) and d.train.shape == (1597, 1, 8, 8)
    assert d.train_labels.shape == (1597,)
    # held-out and training images are disjoint rows of the original array
    rows = {tuple(r) for r in x.flatten(1).tolist()}
    assert all(tuple(r) in rows for r in d.test.flatten(1).tolist())
    p = load_dataset("digits", n_test=200, seed=0, pad_to=16)
    assert p.train.shape == (1597, 1, 16, 16)
    assert torch.equal(p.train[:, :, 4:12, 4:12], d.train) and (p.train[:, :, :4] == -1).all()
    with pytest.raises(ValueError, match="pad_to must be 0 or >= 8"):
        load_digits(pad_to=6)
    with pytest.raises(ValueError, match="pad_to applies to the built-in digits and mnist only"):
        load_dataset("x.npy", pad_to=16)


def test_user_arrays(tmp_path):
    a = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float64)
    np.save(tmp_path / "a.npy", a)
    d = load_dataset(str(tmp_path / "a.npy"), n_test=5)
    assert d.test.shape == (5, 3) and d.train.shape == (45, 3)
    both = torch.cat([d.train, d.test]).numpy()
    np.testing.assert_allclose(np.sort(both, 0), np.sort(a.astype(np.float32), 0))
    np.savez(tmp_path / "b.npz", x=np.zeros((20, 4, 4)), y=np.arange(20))
    x, y = load_array(tmp_path / "b.npz")
    assert x.shape == (20, 1, 4, 4) and torch.equal(y, torch.arange(20))  # (n, H, W) -> one channel
    d = load_dataset(str(tmp_path / "b.npz"), n_test=100)
    assert d.test.shape[0] == 4  # at most a fifth is held out
    np.savez(tmp_path / "c.npz", u=np.zeros((3, 2)), v=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="cannot tell which array"):
        load_array(tmp_path / "c.npz")
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 2)), labels=np.arange(4))
    with pytest.raises(ValueError, match=r"labels 'labels' must have shape \(3,\)"):
        load_array(tmp_path / "d.npz")
    (tmp_path / "e.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match=r"must end in .npy or .npz"):
        load_array(tmp_path / "e.csv")


def test_bad_data_is_refused_before_training():
    x = np.zeros((10, 2))
    x[3, 1] = np.nan
    x[7, 0] = np.inf
    with pytest.raises(ValueError, match=r"2 NaN/inf value\(s\) in 2 sample\(s\), first at sample 3"):
        validate(x)
    with pytest.raises(ValueError, match="must have shape"):
        validate(np.zeros(5))
    with pytest.raises(ValueError, match="must have shape"):
        validate(np.zeros((2, 1, 3, 3, 3)))
    with pytest.raises(ValueError, match="is empty"):
        validate(np.zeros((0, 2)))
    with pytest.raises(ValueError, match="real numbers"):
        validate(np.array([["a", "b"]]))
    with pytest.raises(ValueError, match="unknown data 'moon'.*valid names: .*moons"):
        load_dataset("moon")


def test_a_single_sample_cannot_be_split(tmp_path):
    np.save(tmp_path / "one.npy", np.zeros((1, 2)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        load_dataset(str(tmp_path / "one.npy"))


def test_files_numpy_cannot_read_are_named_and_never_unpickled(tmp_path):
    """A text file named .npy, a pickle, a truncated .npy and a damaged .npz: DamagedFileError naming the file,
    with numpy's reason but not its advice to allow pickles; a pickled object is never run."""
    import pickle
    import zipfile

    (tmp_path / "text.npy").write_text("1,2\n3,4\n")
    marker = tmp_path / "unpickled"

    class Payload:  # unpickling it would create `marker`
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "pickle.npy").write_bytes(pickle.dumps(Payload()))
    np.save(tmp_path / "objects.npy", np.array([Payload()], dtype=object), allow_pickle=True)
    np.save(tmp_path / "short.npy", np.zeros((100, 3)))
    (tmp_path / "short.npy").write_bytes((tmp_path / "short.npy").read_bytes()[:300])
    for name in ("text.npy", "pickle.npy", "objects.npy", "short.npy"):
        with pytest.raises(DamagedFileError, match=rf"{name} is not a NumPy \.npy array file \(numpy: ") as err:
            load_array(tmp_path / name)
        assert "allow_pickle" not in str(err.value)
    with pytest.raises(DamagedFileError, match=r"objects.npy is not a NumPy .npy array file"):
        load_mask(tmp_path / "objects.npy", (1, 2, 2))
    np.savez(tmp_path / "z.npz", x=np.zeros((100, 3)))
    whole = (tmp_path / "z.npz").read_bytes()
    (tmp_path / "half.npz").write_bytes(whole[:len(whole) // 2])
    (tmp_path / "crc.npz").write_bytes(whole[:60] + bytes(60) + whole[120:])  # inside the stored array
    np.savez(tmp_path / "objects.npz", x=np.array([Payload()], dtype=object))
    for name in ("half.npz", "crc.npz", "objects.npz"):
        with pytest.raises(DamagedFileError, match=rf"{name} is not a NumPy \.npz archive file \(numpy: "):
            load_array(tmp_path / name)
    assert not marker.exists()
    assert zipfile.is_zipfile(tmp_path / "z.npz") and load_array(tmp_path / "z.npz")[0].shape == (100, 3)
    with pytest.raises(MissingFileError, match="gone.npy"):
        load_array(tmp_path / "gone.npy")


def test_content_hash_follows_the_content(tmp_path):
    """Equal points in other tensors hash equal; one changed value, another split or labels change the hash.
    An image folder hashes by its files and split, the same read lazily or in memory; rewriting one image
    changes it."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, generator=g)
    d = Dataset(x[:40], x[40:], "a")
    assert content_hash(Dataset(x[:40].clone(), x[40:].clone(), "b")) == content_hash(d)
    bumped = x.clone()
    bumped[7, 1] = torch.nextafter(bumped[7, 1], torch.tensor(10.0))
    assert content_hash(Dataset(bumped[:40], bumped[40:], "a")) != content_hash(d)
    assert content_hash(Dataset(x[:39], x[39:], "a")) != content_hash(d)
    assert content_hash(Dataset(x[:40], x[40:], "a", torch.zeros(40, dtype=torch.long),
                                torch.zeros(10, dtype=torch.long))) != content_hash(d)
    record = data_record(d, "api")
    assert record == {"name": "a", "source": "api", "shape": [3], "n_train": 40, "n_test": 10, "labels": False,
                      "sha256": content_hash(d)}
    for i in range(10):
        Image.fromarray(np.full((4, 4), 20 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    memory = load_dataset(str(tmp_path), n_test=2, workers=0)
    lazy = load_dataset(str(tmp_path), n_test=2, workers=0, memory_mb=0)
    assert isinstance(lazy.train, LazyImages) and isinstance(memory.train, torch.Tensor)
    assert content_hash(lazy) == content_hash(memory)
    assert content_hash(load_dataset(str(tmp_path), n_test=2, seed=1, workers=0)) != content_hash(memory)  # split
    Image.fromarray(np.full((4, 4), 255, dtype=np.uint8)).save(tmp_path / "3.png")
    assert content_hash(load_dataset(str(tmp_path), n_test=2, workers=0)) != content_hash(memory)


def test_a_dataset_from_python_is_checked_like_loaded_data():
    from scoresde.running.data import Dataset, check_dataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 3, generator=g, dtype=torch.float64)
    d = check_dataset(Dataset(x, x[:5], "mine", train_labels=torch.arange(20), test_labels=torch.arange(5)))
    assert d.train.dtype == torch.float32 and torch.equal(d.train, x.float()) and d.name == "mine"
    for bad, match in [(Dataset(x[:0], x, "e"), "train is empty"),
                       (Dataset(x, torch.randn(5, 4, generator=g), "s"), r"train samples have shape \(3,\), test"),
                       (Dataset(x, x.to(torch.complex64), "c"), "test must hold real numbers"),
                       (Dataset(x, x, "l", train_labels=torch.arange(3)), "train_labels must be a 1-D tensor of 20"),
                       (Dataset(x.clone().fill_(float("nan")), x, "n"), "NaN/inf"),
                       ((x, x), "must be a scoresde Dataset")]:
        with pytest.raises(ValueError, match=match):
            check_dataset(bad)


def test_values_beyond_float32_are_refused_not_turned_into_inf():
    from scoresde.running.data import validate

    with pytest.raises(ValueError, match=r"1 NaN/inf value\(s\) in 1 sample\(s\), first at sample 1 \(values beyond"):
        validate(np.array([[1.0, 2.0], [-1e39, 0.0]]))
