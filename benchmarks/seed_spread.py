"""FID_inf across training seeds: each configuration's values, mean and spread, and the difference of two means.

One trained model is one value: the FID_inf of its samples pooled over the sample seeds, read from the result
JSON of `weightings` or `twin-swap`; its sampling noise is the standard error of its per-seed values. The first two groups are compared (first minus second) by Welch's t-test
(scipy.stats.ttest_ind, unequal variances) with its 95% interval, since a training seed moves one configuration
by more than the differences being judged.

    python -m benchmarks seed-spread --group "our default" A.json B.json --group "diffusers twin" C.json D.json

A file that holds several pooled values takes a key: `FILE::KEY` (the key as its JSON names it).
Outputs: benchmarks/results/seed-spread/seed_spread<tag>.{json,md,png}
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import stats

from benchmarks import common

NAME = "seed-spread"
_RESULTS = "benchmarks/results"
QUICK = dict(group=[
    ["our default", f"{_RESULTS}/twin-swap/twin_swap_s28_seeds12-16_uniform.json",
     f"{_RESULTS}/twin-swap/twin_swap_s28_train1_seeds12-16_uniform.json"],
    ["diffusers twin", f"{_RESULTS}/twin-swap/twin_swap_s28_seeds12-16_twin.json",
     f"{_RESULTS}/twin-swap/twin_swap_s28_train1_seeds12-16_twin.json"]])


def add_arguments(ap) -> None:
    ap.add_argument("--group", action="append", nargs="+", metavar=("LABEL", "FILE"), required=False,
                    help="a configuration's label and its result files, one per training seed (repeat the option)")
    ap.add_argument("--tag", default="", help="suffix of the output files")


def pooled_fid_inf(entry: str) -> tuple[str, float, list[float]]:
    """The one pooled FID_inf of a `weightings` or `twin-swap` result file (`FILE` or `FILE::KEY`), with the
    per-sample-seed FID_inf values it pools."""
    file, _, key = entry.partition("::")
    path = Path(file) if Path(file).is_absolute() else common.REPO / file
    if not path.is_file():
        raise SystemExit(f"--group: no result file {file}")
    d = common.read_json(path)
    values = {k: (v, [r["fid_inf"] for r in d.get("rows", []) if f"{r['model']} / {r['sampler']} / {r['nfe']}" == k])
              for k, v in d.get("fid_inf_pooled", {}).items()}
    values.update({f"{r['network']} / {r['sampler']}": (r["fid_inf_pooled"], r["fid_inf"]) for r in d.get("swap", [])
                   if "fid_inf_pooled" in r})
    if key and key not in values:
        raise SystemExit(f"--group: {file} has no pooled FID_inf {key!r}; it has: {', '.join(values) or 'none'}")
    if not key and len(values) != 1:
        raise SystemExit(f"--group: {file} holds {len(values)} pooled FID_inf values ({', '.join(values) or 'none'}); "
                         "name one as FILE::KEY")
    pooled, per_seed = values[key] if key else next(iter(values.values()))
    return path.stem, float(pooled), [float(v) for v in per_seed]


def sample_noise(per_seed: list[float]) -> float | None:
    """The sampling noise of a pooled FID_inf, as the standard error of the mean of its per-seed values (the
    pooled value's variance falls as 1 / n like the mean's): what a training seed's spread is judged against."""
    return float(np.std(per_seed, ddof=1) / np.sqrt(len(per_seed))) if len(per_seed) > 1 else None


def welch(a: list[float], b: list[float]) -> dict:
    """mean(a) - mean(b), Welch's t-test and its 95% interval."""
    res = stats.ttest_ind(a, b, equal_var=False)
    ci = res.confidence_interval(0.95)
    return {"difference": float(np.mean(a) - np.mean(b)), "low": float(ci.low), "high": float(ci.high),
            "df": float(res.df), "p": float(res.pvalue)}


def run(args) -> None:
    groups = args.group or []
    if len(groups) < 2 or any(len(g) < 3 for g in groups[:2]):
        raise SystemExit("--group: give at least two groups, the first two with at least two files each "
                         "(--group LABEL FILE FILE ...)")
    table = {g[0]: [pooled_fid_inf(e) for e in g[1:]] for g in groups}
    summary = {}
    for label, rows in table.items():
        v, noise = [r[1] for r in rows], [n for n in (sample_noise(r[2]) for r in rows) if n is not None]
        summary[label] = {"files": [r[0] for r in rows], "fid_inf": v, "mean": float(np.mean(v)),
                          "sd": float(np.std(v, ddof=1)) if len(v) > 1 else None,
                          "sample_noise": float(np.sqrt(np.mean(np.square(noise)))) if noise else None}
    (first, a), (second, b) = [(k, v["fid_inf"]) for k, v in list(summary.items())[:2]]
    comparison = {"first": first, "second": second, **welch(a, b)}
    lines = ["| configuration | models | FID_inf per model (training seed order) | mean +- sd over models "
             "| sampling noise of one model (rms se) |", "|---|---:|---|---:|---:|"]
    for label, s in summary.items():
        sd, se = ("-" if x is None else f"{x:.1f}" for x in (s["sd"], s["sample_noise"]))
        lines.append(f"| {label} | {len(s['fid_inf'])} | {' / '.join(f'{v:.1f}' for v in s['fid_inf'])} | "
                     f"{s['mean']:.1f} +- {sd} | {se} |")
    c = comparison
    lines.append(f"\n{first} minus {second}: {c['difference']:+.1f} FID_inf, Welch 95% interval "
                 f"[{c['low']:+.1f}, {c['high']:+.1f}] (df {c['df']:.1f}, p = {c['p']:.2f})")
    common.write_json(NAME, {"groups": summary, "comparison": comparison}, file=f"seed_spread{args.tag}.json")
    common.write_text(NAME, f"seed_spread{args.tag}.md", "\n".join(lines))
    plt = common.plt()
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(summary), 3.2))
    for i, (label, s) in enumerate(summary.items()):
        ax.plot([i] * len(s["fid_inf"]), s["fid_inf"], "o", alpha=0.7)
        ax.errorbar(i + 0.15, s["mean"], yerr=s["sd"] or 0, fmt="_k", capsize=4, markersize=14)
    ax.set_xticks(range(len(summary)), list(summary), rotation=15)
    ax.set_xlim(-0.5, len(summary) - 0.5)
    ax.set_ylabel("FID_inf (pooled over sample seeds)")
    ax.set_title(f"{first} - {second}: {c['difference']:+.1f} [{c['low']:+.1f}, {c['high']:+.1f}]")
    common.save_figure(fig, NAME, f"seed_spread{args.tag}.png")
    print("\n".join(lines))
