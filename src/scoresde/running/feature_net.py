"""The digits feature network, trained once on scikit-learn's digits and cached as safetensors."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..evaluation.features import Classifier, accuracy, train_classifier
from .data import load_digits

__all__ = ["digits_feature_net"]


def digits_feature_net(cache: str | Path = "runs/features", pad_to: int = 0, seed: int = 0) -> tuple[Classifier, float]:
    """The digits feature network and its held-out accuracy; trained on the first 80% of a fixed
    permutation of scikit-learn's digits on first use, then loaded from `cache`."""
    path = Path(cache) / f"digits{pad_to or 8}_classifier.safetensors"
    x, y = load_digits(pad_to)
    model = Classifier(channels=1, n_classes=10)
    if path.exists():
        model.load_state_dict(load_file(path))
        meta = json.loads(path.with_suffix(".json").read_text())
        return model.eval(), float(meta["held_out_accuracy"])
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x.shape[0], generator=g)
    n_train = int(0.8 * x.shape[0])
    tr, te = perm[:n_train], perm[n_train:]
    model = train_classifier(x[tr], y[tr], generator=g)
    acc = accuracy(model, x[te], y[te])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(model.state_dict(), str(tmp))
    tmp.replace(path)
    path.with_suffix(".json").write_text(json.dumps({"held_out_accuracy": acc, "seed": seed, "n_train": n_train}))
    return model, acc
