"""Training weightings of the denoising loss on images: the eps loss (sigma2), Min-SNR-5 and EDM's objective.

One VP score model per `--weightings` entry, trained as the imaging benchmark trains its VP model (same U-Net,
steps, batch, optimiser, EMA, precision; `imaging.base_config`), then each of `--samplers` at each of `--nfes`
drawn on sample seed `--seed` and scored with the download-free FID-style distance, its extrapolation to
infinitely many samples (FID_inf, per seed and on all seeds' samples pooled) and KID
(`running.feature_net.FeatureEvaluator`), and the class frequencies by the feature network with their total
variation to the data's (per seed and pooled). The weightings are those of `learning.losses` ("edm" pairs with EDM's
parametrization and its own lognormal noise levels: entry "edm" trains parametrization edm with importance=True).
Run it once on a choice seed to pick, and again on another seed to report.

    python -m benchmarks weightings --data mnist --steps 1250 --seeds 1 --threads 2

`--twin` adds the imaging benchmark's diffusers twin, trained on the same budget, sampled on the same seeds;
`--twin-backbone scoresde` puts scoresde's UNet in the twin's loop (network against the rest of the training).

Outputs: benchmarks/results/weightings/weightings_<data>_<steps>steps_seed<seeds><tag>[_twin|_twin_scoresde_unet]
.{json,md} and _samples.png.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import save

from benchmarks import common, imaging
from scoresde.evaluation.metrics import frechet_distance_infinity
from scoresde.running.feature_net import FeatureEvaluator
from scoresde.running.build import draw_samples
from scoresde.running.files import atomic_write
from scoresde.running.plots import save_grid

NAME = "weightings"
SPECS = {  # weighting entry -> the VP family's config keys
    "sigma2": dict(sde="vp"),
    "min_snr": dict(sde="vp", loss_args={"weighting": "min_snr"}),
    "edm": dict(sde="vp", parametrization="edm", loss_args={"weighting": "edm", "importance": True}),
}
QUICK = dict(data="digits", steps=3, n=40, nfes=[5], samplers=["dpm2m"], seeds=[1, 2], twin=[])
TWIN_ALGORITHMS = ("sde-dpmsolver++", "dpmsolver++")


def add_arguments(ap) -> None:
    ap.add_argument("--data", choices=sorted(imaging.DATA), default="mnist")
    ap.add_argument("--steps", type=int, default=1250, help="training steps of every model")
    ap.add_argument("--weightings", nargs="*", choices=list(SPECS), default=list(SPECS),
                    help="the scoresde runs to train (none: only the twin, with --twin and --data mnist)")
    ap.add_argument("--samplers", nargs="+", default=["dpm2m_sde", "dpm2m"])
    ap.add_argument("--sampler-options", type=json.loads, default={}, metavar="JSON",
                    help='options of every scoresde sampler, e.g. \'{"grid": "uniform"}\' (named in the rows)')
    ap.add_argument("--nfes", type=int, nargs="+", default=[20, 50])
    ap.add_argument("--n", type=int, default=500, help="samples per row")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1], help="sample seeds (choose on some, report on others)")
    ap.add_argument("--twin", nargs="*", default=None, choices=TWIN_ALGORITHMS, metavar="ALGORITHM",
                    help="also train the imaging benchmark's diffusers twin (same budget) and sample it with "
                         "DPMSolverMultistepScheduler of these algorithm types (default: sde-dpmsolver++)")
    ap.add_argument("--twin-backbone", choices=("diffusers", "scoresde"), default="diffusers",
                    help="the twin's network: diffusers' UNet2DModel, or scoresde's UNet in the twin's discrete-time loop "
                         "(`imaging.DDPMBackbone`)")
    ap.add_argument("--net-args", type=json.loads, default={}, metavar="JSON",
                    help='network keys of scoresde\'s UNet laid over the imaging config\'s, e.g. \'{"zero_init": false}\' '
                         '(use with --tag): the scoresde runs\' and, with --twin-backbone scoresde, the twin\'s')
    ap.add_argument("--config-args", type=json.loads, default={}, metavar="JSON",
                    help='run config keys laid over each weighting\'s, e.g. \'{"sigma_data": 1.0}\' (use with --tag): the '
                         "scoresde runs' only")
    ap.add_argument("--train-seed", type=int, default=0,
                    help="seed of the networks' initialisation and data order (ours and the twin's)")
    ap.add_argument("--tag", default="", help="suffix of the run names and output files")
    ap.add_argument("--threads", type=int, default=1)
    common.add_device(ap)
    ap.add_argument("--runs", type=Path, default=None, help="run folder parent (default runs/weightings_<data>_<steps>)")
    ap.add_argument("--resume", action="store_true", help="reuse (or continue) the runs already in --runs")
    ap.add_argument("--keep", action="store_true",
                    help="save each row's samples (all seeds, fp16) as --runs/samples_<tag>.safetensors and the twin's "
                         "EMA weights as --runs/twin_<tag>.safetensors, for later study")


def tag(args) -> str:
    twin = "" if args.twin is None else "_twin" if args.twin_backbone == "diffusers" else "_twin_scoresde_unet"
    return f"{args.data}_{args.steps}steps_seed{'-'.join(map(str, args.seeds))}{args.tag}{twin}"


run_tag = tag


def run_spec(args, weighting: str) -> dict:
    """The VP family's config keys of one `--weightings` entry, with --config-args and --net-args laid over them."""
    return {**SPECS[weighting], **args.config_args, "net_args": args.net_args}


def run(args) -> None:
    torch.set_num_threads(args.threads)
    common.device(args)  # refused here, before any work, where it is not available
    args.runs = args.runs or common.scratch_dir(NAME, f"runs/weightings_{args.data}_{args.steps}")
    if not args.weightings and (args.twin is None or args.data != "mnist"):
        raise SystemExit("--weightings may be empty only with --twin and --data mnist (then only the twin is trained)")
    ev = FeatureEvaluator(args.data, args.n, common.REPO / "runs" / "features")
    rows, grid, labels, pooled, kept = [], [], [], {}, {}

    def score(model: str, sampler: str, nfe: int, seed: int, draw, sec: float) -> None:
        tic = time.perf_counter()
        x = draw()
        if args.keep:
            kept.setdefault((model, sampler, nfe), []).append(x.float().clamp(-1, 1))
        f = ev.features(x)
        pooled.setdefault((model, sampler, nfe), []).append(f)
        m = {k: v for k, v in ev.metrics(f).items() if not isinstance(v, list)}
        rows.append({"model": model, "sampler": sampler, "nfe": nfe, "seed": seed, **m,
                     "class_freq": ev.class_frequencies(f), "train_s": sec, "sample_s": time.perf_counter() - tic})
        print(json.dumps(rows[-1]), flush=True)
        if nfe == args.nfes[0] and seed == args.seeds[0]:
            grid.append(x[:16])
            labels.append(f"{model} {sampler} {nfe}")

    for w in args.weightings:
        tr, sec = imaging.train(args, f"VP_{w}{args.tag}", run_spec(args, w))
        model, shape = tr.ema.copy().eval().requires_grad_(False), (args.n,) + tr.data.sample_shape
        for method in args.samplers:
            label = common.sampler_label(method, args.sampler_options)
            for nfe in args.nfes:
                for seed in args.seeds:
                    score(w + args.tag, label, nfe, seed, lambda: draw_samples(
                        tr.sde, model, shape, method, nfe, generator=torch.Generator().manual_seed(seed),
                        device=tr.device, **args.sampler_options)[0].cpu(), sec)
    if args.twin is not None:
        from diffusers import DPMSolverMultistepScheduler

        train_x = tr.data.train if args.weightings else imaging.dataset(args).train
        unet, sched, sec = imaging.diffusers_baseline(args, train_x, args.twin_backbone)
        if args.keep:
            atomic_write(args.runs / f"twin_{tag(args)}.safetensors",
                         save({k: v.contiguous() for k, v in unet.state_dict().items()}))  # channels_last convs
        twin = "diffusers twin" if args.twin_backbone == "diffusers" else "diffusers loop, scoresde U-Net"
        for algorithm in args.twin or ["sde-dpmsolver++"]:
            for nfe in args.nfes:
                for seed in args.seeds:
                    score(twin, algorithm, nfe, seed, lambda: imaging.diffusers_sample(
                        unet, DPMSolverMultistepScheduler, {**sched.config, "algorithm_type": algorithm}, nfe, args.n,
                        seed, imaging.run_precision(args)), sec)
    fig = common.record_png(save_grid(grid, common.out_dir(NAME) / f"weightings_{tag(args)}_samples.png", labels))
    if args.keep:
        atomic_write(args.runs / f"samples_{tag(args)}.safetensors", save({
            " / ".join(map(str, k)): torch.cat(x).half().contiguous() for k, x in kept.items()}))
    pooled_inf = {" / ".join(map(str, k)): frechet_distance_infinity(torch.cat(f), ev.ref) for k, f in pooled.items()
                  if sum(map(len, f)) // 2 > ev.ref.shape[1] + 1}
    pooled_classes = {" / ".join(map(str, k)): {"class_tv": ev.class_tv(torch.cat(f)),
                                                "class_freq": ev.class_frequencies(torch.cat(f))}
                      for k, f in pooled.items()}
    result = {"data": args.data, "steps": args.steps, "seeds": args.seeds, "n": ev.n, "floor": ev.floor_metrics,
              "device": str(common.device(args)), "precision": imaging.run_precision(args),
              "rows": rows, "fid_inf_pooled": pooled_inf, "classes_pooled": pooled_classes,
              "reference_class_freq": ev.class_frequencies(ev.ref),
              "figure": str(fig.relative_to(common.REPO)) if fig.is_relative_to(common.REPO) else str(fig)}
    common.write_json(NAME, result, file=f"weightings_{tag(args)}.json")
    floor_inf = f", FID_inf {ev.floor_metrics['fid_inf']:.1f}" if "fid_inf" in ev.floor_metrics else ""
    lines = [f"{args.data}, VP, {args.steps} steps ({result['device']}, {result['precision']}); sample seeds "
             f"{args.seeds}, n = {ev.n}; floor FID-style {ev.floor:.1f}{floor_inf}. FID_inf: FID-style extrapolated "
             "to infinitely many samples, per seed and on all seeds' samples pooled\n",
             "| model | sampler | NFE | FID-style per seed | mean +- sd | FID_inf per seed | mean +- sd "
             "| FID_inf pooled | KID per seed (se) | class TV pooled |",
             "|---|---|---:|---|---:|---|---:|---:|---|---:|"]

    def spread(cell: list[dict], key: str) -> str:
        v = torch.tensor([r[key] for r in cell if key in r], dtype=torch.float64)
        if not len(v):
            return "- | -"
        sd = f"{float(v.std()):.1f}" if len(v) > 1 else "-"
        return f"{' / '.join(f'{x:.1f}' for x in v.tolist())} | {float(v.mean()):.1f} +- {sd}"

    for key in dict.fromkeys((r["model"], r["sampler"], r["nfe"]) for r in rows):
        cell = [r for r in rows if (r["model"], r["sampler"], r["nfe"]) == key]
        kid = " / ".join(f"{r['kid']:.0f} ({r['kid_se']:.0f})" for r in cell)
        pool = pooled_inf.get(" / ".join(map(str, key)))
        lines.append(f"| {' | '.join(map(str, key))} | {spread(cell, 'fid')} | {spread(cell, 'fid_inf')} | "
                     f"{'-' if pool is None else f'{pool:.1f}'} | {kid} | "
                     f"{pooled_classes[' / '.join(map(str, key))]['class_tv']:.3f} |")
    common.write_text(NAME, f"weightings_{tag(args)}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
