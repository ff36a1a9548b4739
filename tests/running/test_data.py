import numpy as np
import pytest
import torch

from scoresde.core.targets import two_moons
from scoresde.running.data import load_array, load_dataset, load_digits, validate


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
    with pytest.raises(ValueError, match="pad_to applies to the built-in digits only"):
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
