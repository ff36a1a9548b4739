"""FID-style features: classifiers trained on digits and MNIST, Frechet distance floors, KID, k-NN precision/recall."""
import json

import numpy as np
import pytest
import torch

from scoresde.core.errors import DamagedFileError, InvalidValueError
from scoresde.evaluation.features import (
    class_total_variation,
    image_features,
    kid,
    knn_precision_recall,
    random_shift,
    train_classifier,
)
from scoresde.evaluation.metrics import frechet_distance, frechet_distance_infinity
from scoresde.running.data import load_digits
from scoresde.running.feature_net import FEATURE_NETS, digits_feature_net, feature_net
from scoresde.running.mnist import load_mnist, mnist_split


@pytest.fixture(scope="module")
def digits_net(tmp_path_factory):
    return digits_feature_net(tmp_path_factory.mktemp("features"))


def test_classifier_accuracy_and_cache(digits_net, tmp_path_factory):
    model, acc = digits_net
    assert acc > 0.9
    x, _ = load_digits()
    cache = tmp_path_factory.getbasetemp()
    path = next(cache.rglob("digits8_classifier.safetensors"))
    again, acc2 = digits_feature_net(path.parent)
    assert acc2 == acc
    torch.testing.assert_close(image_features(x[:10], again), image_features(x[:10], model))


def test_feature_net_depends_on_its_seed_only(digits_net, tmp_path):
    """The cache's weights depend neither on the global RNG nor on the caller's thread count (which changes
    float rounding), and the caller's count comes back."""
    model, _ = digits_net  # trained on the suite's one thread
    threads = torch.get_num_threads()
    torch.manual_seed(12345)
    torch.set_num_threads(2)
    try:
        again, _ = digits_feature_net(tmp_path)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_frechet_distance_floor_noise_and_order(digits_net, gen):
    model, _ = digits_net
    x, _ = load_digits()
    perm = torch.randperm(x.shape[0], generator=gen)
    a, b = perm[: x.shape[0] // 2], perm[x.shape[0] // 2:]
    fa, fb = image_features(x[a], model), image_features(x[b], model)
    floor = frechet_distance(fa, fb)
    noise = image_features(torch.rand(len(b), 1, 8, 8, generator=gen) * 2 - 1, model)
    assert frechet_distance(fa, noise) > 20 * floor
    shuffled = fb[torch.randperm(len(fb), generator=gen)]
    assert frechet_distance(fa, shuffled) == pytest.approx(floor, rel=1e-6)


def test_knn_precision_recall_against_brute_force(gen):
    real = torch.randn(60, 3, generator=gen).numpy()
    fake = (torch.randn(50, 3, generator=gen) * 1.5 + 0.5).numpy()
    p, r = knn_precision_recall(real, fake, k=3)

    def radius(s, i):
        return sorted(np.linalg.norm(s - s[i], axis=1))[3]

    p_ref = np.mean([any(np.linalg.norm(f - real[j]) <= radius(real, j) for j in range(60)) for f in fake])
    r_ref = np.mean([any(np.linalg.norm(q - fake[j]) <= radius(fake, j) for j in range(50)) for q in real])
    assert (p, r) == (pytest.approx(p_ref), pytest.approx(r_ref))
    assert knn_precision_recall(real, real + 100, k=3) == (0.0, 0.0)
    assert knn_precision_recall(real, real, k=3) == (1.0, 1.0)
    with pytest.raises(ValueError, match="k must be smaller"):
        knn_precision_recall(real[:3], fake, k=3)


@pytest.fixture(scope="module")
def mnist_net():
    """The MNIST feature network's recipe at 300 steps instead of 1000 (about 11 s; 98.4% held out)."""
    x, y = load_mnist()
    tr, _ = mnist_split()
    _, _, net_args, train_args = FEATURE_NETS["mnist"]
    return train_classifier(x[tr], y[tr], **net_args, **{**train_args, "steps": 300},
                            generator=torch.Generator().manual_seed(0))


@pytest.mark.slow  # trains the full MNIST feature network: about 35-45 s on one thread
def test_mnist_feature_net_reaches_98_percent_and_is_cached(tmp_path):
    model, acc = feature_net("mnist", tmp_path)
    assert acc >= 0.98
    meta = json.loads((tmp_path / "mnist28_classifier.json").read_text())
    assert meta["held_out_accuracy"] == acc and (meta["n_train"], meta["n_held_out"]) == (4500, 500)
    x, y = load_mnist()
    _, te = mnist_split()
    assert float((model(x[te]).argmax(1) == y[te]).float().mean()) == acc  # accuracy on exactly the held-out 500
    again, acc2 = feature_net("mnist", tmp_path)
    assert acc2 == acc
    torch.testing.assert_close(image_features(x[:10], again), image_features(x[:10], model))


def test_feature_net_refuses_unknown_data_and_damaged_cache(tmp_path):
    with pytest.raises(InvalidValueError, match="digits, mnist; got 'cifar'"):
        feature_net("cifar", tmp_path)
    (tmp_path / "mnist28_classifier.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DamagedFileError, match="mnist28_classifier.safetensors.*delete both files"):
        feature_net("mnist", tmp_path)


def test_mnist_frechet_distance_near_floor_for_real_far_for_noise_and_shuffled_pixels(mnist_net, gen):
    """Reference: 4,000 training digits. Floor: the other 500 training digits. The 500 held-out digits (same
    law) score near the floor; uniform noise and held-out digits with their pixels permuted score far above.
    The floor is the small-sample bias: extrapolated to infinitely many digits the 1,000 real ones score near 0."""
    x, _ = load_mnist()
    tr, te = mnist_split()
    ref = image_features(x[tr[:4000]], mnist_net)
    floor = frechet_distance(ref, image_features(x[tr[4000:]], mnist_net))
    held = frechet_distance(ref, image_features(x[te], mnist_net))
    assert 0.5 * floor < held < 2 * floor
    noise = frechet_distance(ref, image_features(torch.rand(500, 1, 28, 28, generator=gen) * 2 - 1, mnist_net))
    perm = torch.randperm(28 * 28, generator=gen)
    shuffled = frechet_distance(ref, image_features(x[te].flatten(1)[:, perm].view(-1, 1, 28, 28), mnist_net))
    assert min(noise, shuffled) > 50 * floor
    real = torch.cat([image_features(x[tr[4000:]], mnist_net), image_features(x[te], mnist_net)])
    assert abs(frechet_distance_infinity(real, ref)) < 0.3 * frechet_distance(real, ref)  # the floor is mostly bias


def test_class_total_variation_by_hand_and_its_floor_for_one_law(gen):
    """By hand: (1/2, 1/2) against (3/4, 1/4) is 1/4, disjoint classes 1. Two samples of one balanced 10-class
    law (500 and 4,500 labels) average the normal approximation sqrt(9 (1/500 + 1/4500) / (2 pi)) within 3 %."""
    assert class_total_variation(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 0, 1]), 2) == pytest.approx(0.25)
    assert class_total_variation(torch.tensor([0, 1]), torch.tensor([2, 2, 3]), 4) == pytest.approx(1.0)
    tv = [class_total_variation(torch.randint(10, (4500,), generator=gen), torch.randint(10, (500,), generator=gen), 10)
          for _ in range(400)]
    assert np.mean(tv) == pytest.approx(np.sqrt(9 * (1 / 500 + 1 / 4500) / (2 * np.pi)), rel=0.03)
    with pytest.raises(InvalidValueError, match=r"labels must lie in \[0, 3\), got \[0, 3\]"):
        class_total_variation(torch.tensor([0, 3]), torch.tensor([1]), 3)
    with pytest.raises(InvalidValueError, match="non-empty 1-D label sets"):
        class_total_variation(torch.tensor([0, 1]), torch.tensor([], dtype=torch.long), 3)


def test_mnist_class_frequencies_match_for_real_digits_and_not_for_one_class(mnist_net):
    """On the feature network's labels: the 500 held-out digits match the 4,000 training digits' class frequencies
    within three times the one-law floor; 500 training 3s score 1 - (share of 3s) = 0.9 up to the classifier's
    errors."""
    x, y = load_mnist()
    tr, te = mnist_split()
    label = lambda idx: mnist_net(x[idx]).argmax(1)
    ref = label(tr[:4000])
    assert class_total_variation(ref, label(te), 10) < 3 * np.sqrt(9 * (1 / 500 + 1 / 4000) / (2 * np.pi))
    threes = tr[y[tr] == 3][:500]
    assert abs(class_total_variation(ref, label(threes), 10) - (1 - float((ref == 3).double().mean()))) < 0.03


def mmd2_unbiased_brute_force(a: np.ndarray, b: np.ndarray) -> float:
    """The unbiased MMD^2 with k(u, v) = (u.v / d + 1)^3, term by term."""
    d = a.shape[1]
    k = lambda u, v: (float(u @ v) / d + 1) ** 3
    n, m = len(a), len(b)
    xx = sum(k(a[i], a[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(a[i], b[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def test_kid_averages_to_the_full_sample_unbiased_mmd2(gen):
    """Over random partitions into blocks, each block's U-statistic has the full sample's as its mean: the seed
    average of `kid` converges to the brute-force MMD^2_u of the whole sets."""
    a = torch.randn(40, 3, generator=gen).numpy()
    b = (torch.randn(30, 3, generator=gen) * 1.3 + 0.4).numpy()
    truth = mmd2_unbiased_brute_force(a, b)
    vals = np.array([kid(a, b, blocks=2, seed=s)[0] for s in range(400)])
    assert abs(vals.mean() - truth) < 4 * vals.std(ddof=1) / np.sqrt(len(vals))
    with pytest.raises(InvalidValueError, match="blocks must be an integer >= 2"):
        kid(a, b, blocks=1)
    with pytest.raises(InvalidValueError, match="at least 2 points per block"):
        kid(a[:5], b, blocks=3)
    with pytest.raises(InvalidValueError, match="same d"):
        kid(a, b[:, :2])


def test_kid_is_zero_within_its_standard_error_for_one_law_and_positive_for_two(gen):
    """Repeated draws of two 200-point samples of N(0, I_4): the mean KID is 0 within the standard error of that
    mean, and the reported standard error matches the spread of the draws. Shifting one sample's law by 0.5
    along one axis gives a KID many standard errors above 0."""
    draws = [kid(torch.randn(200, 4, generator=gen), torch.randn(200, 4, generator=gen)) for _ in range(200)]
    vals, ses = np.array(draws).T
    assert abs(vals.mean()) < 3 * vals.std(ddof=1) / np.sqrt(len(vals))
    assert 0.7 < np.sqrt((ses ** 2).mean()) / vals.std(ddof=1) < 1.4
    shift = torch.zeros(4)
    shift[0] = 0.5
    value, se = kid(torch.randn(2000, 4, generator=gen), torch.randn(2000, 4, generator=gen) + shift)
    assert value > 5 * se > 0


def test_random_shift_translates_by_whole_pixels_and_fills_background(gen):
    x = torch.full((64, 1, 9, 9), -1.0)
    x[:, :, 4, 4] = 1.0  # one bright pixel in the centre
    out = random_shift(x, 1.0, gen)
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    mass = (out + 1).sum((1, 2, 3))
    torch.testing.assert_close(mass, torch.full((64,), 2.0))  # bilinear moves stay inside: the mass is kept
    rows, cols = torch.arange(9.0)[:, None], torch.arange(9.0)[None, :]
    centre_r = ((out + 1)[:, 0] * rows).sum((1, 2)) / mass
    centre_c = ((out + 1)[:, 0] * cols).sum((1, 2)) / mass
    assert ((centre_r - 4).abs() <= 1 + 1e-5).all() and ((centre_c - 4).abs() <= 1 + 1e-5).all()
    assert (centre_r - 4).abs().max() > 0.5  # it does move
    torch.testing.assert_close(random_shift(x, 0.0, gen), x)
    with pytest.raises(InvalidValueError, match="shift must be >= 0"):
        train_classifier(x, torch.zeros(64, dtype=torch.long), shift=-1.0)
