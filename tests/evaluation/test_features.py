"""FID-style features: a classifier trained on digits, Frechet distance floors, k-NN precision/recall."""
import numpy as np
import pytest
import torch

from scoresde.evaluation.features import image_features, knn_precision_recall
from scoresde.evaluation.metrics import frechet_distance
from scoresde.running.data import load_digits
from scoresde.running.feature_net import digits_feature_net


@pytest.fixture(scope="module")
def feature_net(tmp_path_factory):
    return digits_feature_net(tmp_path_factory.mktemp("features"))


def test_classifier_accuracy_and_cache(feature_net, tmp_path_factory):
    model, acc = feature_net
    assert acc > 0.9
    x, _ = load_digits()
    cache = tmp_path_factory.getbasetemp()
    path = next(cache.rglob("digits8_classifier.safetensors"))
    again, acc2 = digits_feature_net(path.parent)
    assert acc2 == acc
    torch.testing.assert_close(image_features(x[:10], again), image_features(x[:10], model))


def test_frechet_distance_floor_noise_and_order(feature_net, gen):
    model, _ = feature_net
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
