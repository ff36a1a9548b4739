"""Inpainting the lower half of held-out MNIST digits with a finished VP run (issue 20's goal: the completed
digit is classified as its true class at least 90% of the time).

Class recovery (the feature network's class of the completion against the true label) of the Tweedie
h-transform (`sampling.guidance`, "tweedie", at each CG truncation of --cg), of its weighted form (the score
of p_t(x) p(y | x_t)^w at each --weights w: the Gaussian approximation of x_0 | x_t is too broad for digits,
whose class the known half nearly fixes), of replacement ("replace") and of twisted SMC ("smc",
`sampling.twisted`: --particles particles per digit at each twisting weight of --smc-weights, exact for the
model as the particles grow), all with Euler-Maruyama, beside three references that need no score model:
- the upper half alone (lower half black);
- the nearest training digit's lower half (nearest on the upper half);
- a classifier of the upper half alone (trained on the training digits' upper halves, temperature fitted on
  the last 500 of them): its accuracy, and its mean probability of the true class. An exact posterior sampler
  followed by an exact classifier recovers the class with probability E sum_y p(y | upper)^2 (the completion's
  class is drawn from p(y | upper)); for a calibrated classifier q, E q(true | upper) = E sum_y q_y^2 is at
  most that (q is a coarsening of p: Jensen). So the mean probability is a lower estimate of what exact
  inpainting scores (up to the calibration of q), and the Bayes accuracy E max_y p(y | upper), at least the
  classifier's accuracy, is an upper bound on it.

Held-out protocol: the settings (sampler, NFE, CG truncation, the weights swept) were chosen on held-out
digits 0-99; the report uses digits --offset onwards (default 100-299).

    python -m benchmarks inpainting --run runs/imaging_mnist_4k/VP
Outputs in benchmarks/results/inpainting/: inpainting_<run>.json, inpainting_<run>.png.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks import common
from scoresde.core.devices import device_generator
from scoresde.core.errors import ScoresdeError
from scoresde.core.sde import LinearSDE
from scoresde.evaluation.features import train_classifier
from scoresde.running.data import Dataset
from scoresde.running.feature_net import FEATURE_NETS, FeatureEvaluator
from scoresde.running.plots import save_grid
from scoresde.running.progress import counting_calls
from scoresde.sampling.guidance import inpaint

NAME = "inpainting"
NFE = {"tweedie": 100, "replace": 200, "smc": 100}  # Euler-Maruyama steps of each method
DEFAULT_RUN = Path("runs/imaging_mnist_4k/VP")  # the 4000-step run of RESULTS.md (imaging --steps 4000)
OFFSET = 100  # held-out digits 0-99 chose the settings
CG = (1,)  # CG truncations of the Tweedie solve (vector-Jacobian products per step), each at weight 1
WEIGHTS = (1.0, 4.0, 8.0, 16.0)  # likelihood weights of the Tweedie method, at the first CG truncation
PARTICLES, SMC_WEIGHTS = (8,), (1.0,)  # twisted SMC: particles per digit, twisting weights
METHODS = ("tweedie", "replace", "smc")
CHUNK = 400  # images (digits x particles) per sampler call, to bound the memory of the gradients
MNIST_CLASSIFIER = FEATURE_NETS["mnist"][2]
QUICK = dict(n=4, nfe_scale=0.05, weights=[1.0, 4.0])


def lower_half_mask(size: int) -> Tensor:
    mask = torch.ones(1, size, size)
    mask[..., size // 2:, :] = 0
    return mask


def upper_half_reference(train: Tensor, labels: Tensor, known: Tensor, truth: Tensor, classifier_args: dict,
                         calibrate: int = 500) -> dict[str, float]:
    """The known-half classifier of the module docstring: its held-out accuracy and its mean (temperature-
    calibrated) probability of the true class."""
    g = torch.Generator().manual_seed(0)
    fit, cal = slice(0, len(train) - calibrate), slice(len(train) - calibrate, None)
    net = train_classifier(train[fit], labels[fit], generator=g, steps=1000, **classifier_args)
    with torch.no_grad():
        logits_cal, logits = net(train[cal]), net(known)
    temps = torch.linspace(0.5, 5.0, 46)
    temp = temps[torch.stack([F.cross_entropy(logits_cal / t, labels[cal]) for t in temps]).argmin()]
    p = (logits / temp).softmax(1)
    return {"accuracy_known_half_classifier": float((p.argmax(1) == truth).float().mean()),
            "mean_probability_of_true_class": float(p.gather(1, truth[:, None]).mean()),
            "known_half_classifier_temperature": float(temp)}


def evaluate(sde: LinearSDE, model: torch.nn.Module, data: Dataset, classify, n: int, offset: int = OFFSET,
             cg: tuple[int, ...] = CG, weights: tuple[float, ...] = WEIGHTS, nfe_scale: float = 1.0,
             classifier_args: dict = MNIST_CLASSIFIER, methods: tuple[str, ...] = METHODS,
             particles: tuple[int, ...] = PARTICLES, smc_weights: tuple[float, ...] = SMC_WEIGHTS
             ) -> tuple[dict, list[Tensor], list[str]]:
    """Class recovery of the lower half of held-out digits offset .. offset + n: the references and every
    method; returns (results, grid rows of 16, their labels). The samplers run where `model` (a module) is, their
    noise from a generator there seeded by the CPU's; the references and the classifier on the CPU."""
    device = next(model.parameters()).device
    known, truth = data.test[offset:offset + n], data.test_labels[offset:offset + n]
    mask = lower_half_mask(known.shape[-1])
    accuracy = lambda x: float((classify(x) == truth).float().mean())
    mask_on_device = mask.to(device)
    upper = mask * known - (1 - mask)
    near = torch.cdist((mask * known).flatten(1), (mask * data.train).flatten(1)).argmin(1)
    res = {"n": known.shape[0], "offset": offset, "sampler": "em", "accuracy_original": accuracy(known),
           "accuracy_upper_half_only": accuracy(upper),
           "accuracy_nearest_neighbour": accuracy(mask * known + (1 - mask) * data.train[near]),
           **upper_half_reference(mask * data.train - (1 - mask), data.train_labels, upper, truth, classifier_args)}
    print(json.dumps(res), flush=True)
    grid, labels = [upper[:16]], ["known half"]
    variants = ([("tweedie", {"cg_iters": c}, 1.0) for c in cg] + [("tweedie", {"cg_iters": cg[0]}, w)
                                                                    for w in weights if w != 1]
                + [("replace", {}, 1.0)] + [("smc", {"particles": k}, w) for k in particles for w in smc_weights])
    for how, opts, weight in (v for v in variants if v[0] in methods):
        nfe = max(2, round(NFE[how] * nfe_scale))
        label = " ".join([how, *(f"{k.split('_')[0]}={v}" for k, v in opts.items())]
                         + [f"w={weight:g}"] * (how != "replace"))
        chunk = max(1, CHUNK // opts.get("particles", 1))
        tic = time.perf_counter()
        with counting_calls(model, f"inpaint {label}", nfe * -(-len(known) // chunk)):
            g = device_generator(torch.Generator().manual_seed(3), device)
            x = torch.cat([inpaint(sde, model, part.to(device), mask_on_device, method=how, sampler="em", nfe=nfe,
                                   weight=weight, generator=g, **opts).cpu() for part in known.split(chunk)])
        res[label] = {"nfe": nfe, **opts, "weight": weight, "accuracy": accuracy(x),
                      "sample_s": time.perf_counter() - tic}
        print(json.dumps({label: res[label]}), flush=True)
        grid.append(x[:16]), labels.append(f"inpainted ({label})")
    grid.append(known[:16]), labels.append("original")
    return res, grid, labels


def add_arguments(ap) -> None:
    ap.add_argument("--run", type=Path, default=None,
                    help="a finished VP run on mnist (default runs/imaging_mnist_4k/VP; --quick: a 3-step one)")
    ap.add_argument("--n", type=int, default=200, help="held-out digits inpainted")
    ap.add_argument("--offset", type=int, default=OFFSET, help="first held-out digit (0-99 chose the settings)")
    ap.add_argument("--cg", type=int, nargs="+", default=list(CG), help="CG truncations of the Tweedie method")
    ap.add_argument("--weights", type=float, nargs="+", default=list(WEIGHTS),
                    help="likelihood weights of the Tweedie method (at the first --cg)")
    ap.add_argument("--nfe-scale", type=float, default=1.0, help="scale the NFE of every method (quick runs)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="inpainting methods run")
    ap.add_argument("--particles", type=int, nargs="+", default=list(PARTICLES), help="smc: particles per digit")
    ap.add_argument("--smc-weights", type=float, nargs="+", default=list(SMC_WEIGHTS), help="smc: twisting weights")
    common.add_device(ap, "the run's model samples")


def tiny_run(folder: Path) -> Path:
    """A 3-step MNIST VP run (the U-Net of configs/mnist_vp.yaml, narrower) for --quick: a smoke test of the
    code path, not a result."""
    from scoresde.running.config import Config
    from scoresde.running.data import load_dataset
    from scoresde.running.train import Trainer

    if (folder / "VP" / "checkpoint.safetensors").exists():
        return folder / "VP"
    cfg = Config(data="mnist", sde="vp", net="unet", net_args={"base": 8, "mults": [1, 2]}, parametrization="eps",
                 steps=3, batch_size=8, eval_every=0, checkpoint_every=3, progress=False, out=str(folder), name="VP")
    Trainer(cfg, data=load_dataset("mnist")).run()
    return folder / "VP"


def run(args):
    from scoresde.running.runs import load_run

    dev = common.device(args)  # refused before any work where it is not available
    if args.run is None:
        args.run = tiny_run(common.scratch_dir(NAME, "runs")) if common.quick() else DEFAULT_RUN
    try:
        run_ = load_run(args.run, device=dev)
    except ScoresdeError as err:
        raise SystemExit(f"--run: {err} (train one: make bench-mnist, or python -m benchmarks imaging --data mnist "
                         f"--runs DIR, then pass DIR/VP)") from None
    if run_.data_name != "mnist":
        raise SystemExit(f"--run must be a run on mnist, {str(args.run)!r} was trained on {run_.data_name!r}")
    ev = FeatureEvaluator("mnist", 20)
    res, grid, labels = evaluate(run_.sde, run_.model, run_.data, ev.classify, args.n, args.offset,
                                 tuple(args.cg), tuple(args.weights), args.nfe_scale, methods=tuple(args.methods),
                                 particles=tuple(args.particles), smc_weights=tuple(args.smc_weights))
    tag = f"{args.run.parent.name}_{args.run.name}".lower()
    fig = common.record_png(save_grid(grid, common.out_dir(NAME) / f"inpainting_{tag}.png", labels))
    common.write_json(NAME, {"run": str(args.run), "step": run_.step, **res, "figure": fig.name},
                      file=f"inpainting_{tag}.json")
