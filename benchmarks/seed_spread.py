"""FID_inf across training seeds: each configuration's values, mean and spread, and the difference of two means.

One trained model is one value: the FID_inf of its samples pooled over the sample seeds, read from the result
JSON of `weightings` or `twin-swap`. The first two groups are compared (first minus second) by Welch's t-test
(scipy.stats.ttest_ind, unequal variances) with its 95% interval over the models, since a training seed moves one
configuration by more than the differences being judged.

Every model is sampled on the same sample seeds, and a seed moves every model of one sampler alike (the same x_T
and noise). So each group's models x seeds table of per-seed FID_inf is fitted as model + seed + residual. The
residual is the sampling noise that tells one model from another. The seed effects are what this set of seeds adds
to a group's mean, which no number of training seeds removes; where two groups' effects differ, the set of seeds
moves their difference by about sd(effect difference) / sqrt(seeds), which is reported beside the interval.

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
    ap.add_argument("--group", action="append", nargs="+", metavar=("LABEL", "FILE"),
                    help="a configuration's label and its result files, one per training seed (repeat the option)")
    ap.add_argument("--tag", default="", help="suffix of the output files")


def pooled_fid_inf(entry: str) -> tuple[str, float, dict[int, float]]:
    """The one pooled FID_inf of a `weightings` or `twin-swap` result file (`FILE` or `FILE::KEY`), with the
    per-sample-seed FID_inf values it pools ({seed: value})."""
    file, _, key = entry.partition("::")
    path = Path(file) if Path(file).is_absolute() else common.REPO / file
    if not path.is_file():
        raise SystemExit(f"--group: no result file {file}")
    d = common.read_json(path)
    values = {k: (v, {r["seed"]: r["fid_inf"] for r in d.get("rows", [])
                      if f"{r['model']} / {r['sampler']} / {r['nfe']}" == k}) for k, v in d.get("fid_inf_pooled", {}).items()}
    values.update({f"{r['network']} / {r['sampler']}": (r["fid_inf_pooled"], dict(zip(r["seeds"], r["fid_inf"])))
                   for r in d.get("swap", []) if "fid_inf_pooled" in r})
    if key and key not in values:
        raise SystemExit(f"--group: {file} has no pooled FID_inf {key!r}; it has: {', '.join(values) or 'none'}")
    if not key and len(values) != 1:
        raise SystemExit(f"--group: {file} holds {len(values)} pooled FID_inf values ({', '.join(values) or 'none'}); "
                         "name one as FILE::KEY")
    pooled, per_seed = values[key] if key else next(iter(values.values()))
    return path.stem, float(pooled), {int(k): float(v) for k, v in per_seed.items()}


def seed_effects(table: np.ndarray) -> tuple[np.ndarray, float | None]:
    """Two-way additive fit of a models x sample seeds table: each seed's effect (its column mean less the grand
    mean) and the residual sd, on (models - 1)(seeds - 1) degrees of freedom (None with one model)."""
    m, k = table.shape
    effects = table.mean(0) - table.mean()
    if m < 2:
        return effects, None
    resid = table - table.mean(1, keepdims=True) - effects
    return effects, float(np.sqrt((resid**2).sum() / ((m - 1) * (k - 1))))


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
    seeds = sorted(set.intersection(*(set(r[2]) for rows in table.values() for r in rows)))
    if len(seeds) < 2:
        raise SystemExit(f"--group: the files share {len(seeds)} sample seed(s); their pooled values are not comparable")
    summary = {}
    for label, rows in table.items():
        if any(sorted(r[2]) != seeds for r in rows):
            raise SystemExit(f"--group {label}: every file must pool the same sample seeds ({seeds})")
        v = [r[1] for r in rows]
        effects, resid = seed_effects(np.array([[r[2][s] for s in seeds] for r in rows]))
        summary[label] = {"files": [r[0] for r in rows], "fid_inf": v, "mean": float(np.mean(v)),
                          "sd": float(np.std(v, ddof=1)) if len(v) > 1 else None,
                          "seed_effects": dict(zip(seeds, effects.tolist())),
                          "sampling_se": None if resid is None else float(resid / np.sqrt(len(seeds)))}
    (first, a), (second, b) = [(k, v["fid_inf"]) for k, v in list(summary.items())[:2]]
    gap = np.subtract(*[list(summary[g]["seed_effects"].values()) for g in (first, second)])
    comparison = {"first": first, "second": second, **welch(a, b),
                  "seed_set_se": float(np.std(gap, ddof=1) / np.sqrt(len(seeds)))}
    lines = [f"FID_inf of each model on sample seeds {seeds} pooled.\n",
             "| configuration | models | FID_inf per model (training seed order) | mean +- sd over models "
             "| sampling noise of one model (se, after the seeds' shared effect) | seed effects |",
             "|---|---:|---|---:|---:|---|"]
    for label, s in summary.items():
        sd, se = ("-" if x is None else f"{x:.1f}" for x in (s["sd"], s["sampling_se"]))
        lines.append(f"| {label} | {len(s['fid_inf'])} | {' / '.join(f'{v:.1f}' for v in s['fid_inf'])} | "
                     f"{s['mean']:.1f} +- {sd} | {se} | {' / '.join(f'{e:+.1f}' for e in s['seed_effects'].values())} |")
    c = comparison
    lines.append(f"\n{first} minus {second}: {c['difference']:+.1f} FID_inf, Welch 95% interval over the models "
                 f"[{c['low']:+.1f}, {c['high']:+.1f}] (df {c['df']:.1f}, p = {c['p']:.2f}). The two groups' seed "
                 f"effects differ by sd {np.std(gap, ddof=1):.1f} per seed: this set of {len(seeds)} seeds moves the "
                 f"difference by about +- {c['seed_set_se']:.1f} (se), which the interval does not count.")
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
