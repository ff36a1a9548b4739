"""The feature networks of the FID-style metrics (`evaluation.features`), one per built-in image set, trained
once on that set's training part and cached as safetensors, with a json beside it that records the held-out
accuracy (issues 12 and 20).

- "digits": scikit-learn's 8x8 digits; trained on the first 80% of a fixed permutation, tested on the rest.
- "mnist": the 5,000 MNIST digits of `running.mnist`; trained on its 4,500 training digits (random shifts of
  up to 2 pixels), tested on its 500 held-out digits (seed 0: 98.8-99.0% in about 35 s).

Training runs on one CPU thread whatever the caller's count, since thread counts change the float rounding.
The weights still differ between CPUs and library versions, and FID-style values with them: one retraining
moved a model's FID-style on MNIST by 20% (benchmarks/RESULTS.md, session 17). Compare numbers made with one
cached network only.

Features of a network trained on 4,500 digits are not Inception features: FID-style numbers made with them
are comparable only with each other and with their floor, never with published FIDs.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import Tensor

from ..core.errors import DamagedFileError, InvalidValueError
from ..evaluation.features import (Classifier, accuracy, class_total_variation, image_features, kid,
                                   knn_precision_recall, train_classifier)
from ..evaluation.metrics import frechet_distance, frechet_distance_infinity
from .data import load_digits
from .files import atomic_write
from .mnist import load_mnist, mnist_split

__all__ = ["FEATURE_NETS", "FeatureEvaluator", "digits_feature_net", "feature_net", "real_sets"]

Split = tuple[Tensor, Tensor, Tensor, Tensor]  # x, labels, training rows, held-out rows


def _digits(pad_to: int, generator: torch.Generator) -> Split:
    x, y = load_digits(pad_to)
    perm = torch.randperm(x.shape[0], generator=generator)
    n_train = int(0.8 * x.shape[0])
    return x, y, perm[:n_train], perm[n_train:]


def _mnist(pad_to: int, generator: torch.Generator) -> Split:
    return (*load_mnist(pad_to), *mnist_split())


# data -> (images, labels and split; native size; Classifier keywords; train_classifier keywords)
FEATURE_NETS: dict[str, tuple[Callable[[int, torch.Generator], Split], int, dict[str, Any], dict[str, Any]]] = {
    "digits": (_digits, 8, {}, {}),
    "mnist": (_mnist, 28, {"width": 16, "pool": 7}, {"steps": 1000, "shift": 2.0}),
}


def feature_net(data: str = "digits", cache: str | Path = "runs/features", pad_to: int = 0,
                seed: int = 0) -> tuple[Classifier, float]:
    """The feature network of built-in image set `data` ("digits" | "mnist") at `pad_to` (0: native size) and
    its held-out accuracy: trained with `seed` on first use and saved as `cache/<data><size>_classifier.safetensors`
    (+ .json), then loaded from there."""
    if data not in FEATURE_NETS:
        raise InvalidValueError(f"feature networks exist for data {', '.join(sorted(FEATURE_NETS))}; got {data!r}")
    split, size, net_args, train_args = FEATURE_NETS[data]
    path = Path(cache) / f"{data}{pad_to or size}_classifier.safetensors"
    meta_path = path.with_suffix(".json")
    if path.exists():
        model = Classifier(channels=1, n_classes=10, **net_args)
        try:
            model.load_state_dict(load(path.read_bytes()))
            acc = float(json.loads(meta_path.read_text())["held_out_accuracy"])
        except (SafetensorError, RuntimeError, OSError, KeyError, ValueError) as err:
            raise DamagedFileError(f"cached feature network {str(path)!r} (or its .json) is unreadable or of another "
                                   f"architecture ({err}); delete both files to retrain it") from err
        return model.eval(), acc
    g = torch.Generator().manual_seed(seed)
    x, y, tr, te = split(pad_to, g)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = train_classifier(x[tr], y[tr], generator=g, **net_args, **train_args)
    finally:
        torch.set_num_threads(threads)
    acc = accuracy(model, x[te], y[te])
    # the .json first: a reader that finds the weights (another process training the same net) finds both
    atomic_write(meta_path, json.dumps({"data": data, "held_out_accuracy": acc, "n_train": len(tr),
                                        "n_held_out": len(te), "seed": seed, "classifier": net_args,
                                        "training": train_args}).encode())
    atomic_write(path, save(model.state_dict()))
    return model, acc


def digits_feature_net(cache: str | Path = "runs/features", pad_to: int = 0, seed: int = 0) -> tuple[Classifier, float]:
    """`feature_net("digits", ...)`, the name its earlier callers use."""
    return feature_net("digits", cache, pad_to, seed)


def real_sets(data: str, pad_to: int = 0) -> tuple[Tensor, Tensor]:
    """(reference, other) real images of built-in image set `data`: digits: the two halves of a fixed
    permutation; mnist: the 4,500 training digits and the 500 held-out ones (`running.mnist.mnist_split`)."""
    if data == "mnist":
        x, _ = load_mnist(pad_to)
        tr, te = mnist_split()
        return x[tr], x[te]
    x, _ = load_digits(pad_to)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(123))
    half = x.shape[0] // 2
    return x[perm[:half]], x[perm[half:]]


class FeatureEvaluator:
    """FID-style distance (Frechet distance of the feature network's features), KID (+- its standard error),
    k-NN precision and recall and the total variation of the class frequencies (the feature network's labels)
    of samples against the reference real images of `data` (`real_sets`); `floor` / `floor_metrics`: the same
    for n other real images, which the reference does not hold (what a perfect model scores at this n).
    Samples are clamped to [-1, 1]."""

    def __init__(self, data: str, n: int, cache: str | Path = "runs/features", pad_to: int = 0):
        self.net, self.acc = feature_net(data, cache, pad_to)
        ref, other = real_sets(data, pad_to)
        self.n = min(int(n), other.shape[0])
        self.ref = image_features(ref, self.net)
        self.ref_classes = self.classes(self.ref)
        self.floor_metrics = self.metrics(image_features(other[:self.n], self.net))
        self.floor = self.floor_metrics["fid"]
        self.floor_pr = (self.floor_metrics["precision"], self.floor_metrics["recall"])

    def metrics(self, f: Tensor) -> dict[str, float]:
        """The metrics of features f (n, d): fid, kid, kid_se, precision, recall, class_tv (TV between the class
        frequencies of the samples and of the reference, `class_total_variation`) and, where n > 2 (d + 1),
        fid_inf: the FID-style distance extrapolated to infinitely many samples (`frechet_distance_infinity`),
        free of the model-dependent small-n bias that fid carries."""
        p, r = knn_precision_recall(self.ref[:self.n], f)
        k, k_se = kid(self.ref, f)
        out = {"fid": frechet_distance(self.ref, f), "kid": k, "kid_se": k_se, "precision": p, "recall": r,
               "class_tv": self.class_tv(f)}
        if f.shape[0] // 2 > f.shape[1] + 1:
            out["fid_inf"] = frechet_distance_infinity(f, self.ref)
        return out

    def features(self, samples: Tensor) -> Tensor:
        """The feature network's features of samples (clamped to [-1, 1])."""
        return image_features(samples.float().clamp(-1, 1), self.net)

    def __call__(self, samples: Tensor) -> dict[str, float]:
        return self.metrics(self.features(samples))

    def classes(self, f: Tensor) -> Tensor:
        """The feature network's class of each sample, from its features f (n, d)."""
        with torch.no_grad():
            return self.net.head(f).argmax(1)

    def class_tv(self, f: Tensor) -> float:
        """Total variation between the class frequencies of the samples of features f (n, d) and of the reference."""
        return class_total_variation(self.ref_classes, self.classes(f), self.net.head.out_features)

    def class_frequencies(self, f: Tensor) -> list[float]:
        """The share of each class among the samples of features f (n, d), by the feature network."""
        return (torch.bincount(self.classes(f), minlength=self.net.head.out_features) / len(f)).tolist()

    def classify(self, samples: Tensor) -> Tensor:
        """The feature network's class of each sample."""
        return self.classes(self.features(samples))
