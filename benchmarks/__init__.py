"""The benchmarks of scoresde, run through one harness: ``python -m benchmarks NAME [--quick] [options]``.

``python -m benchmarks --list`` lists them; ``make bench-NAME`` runs one through the heavy-run lock.
Each benchmark is a module with ``add_arguments(parser)``, ``run(args)`` and ``QUICK`` (the option
defaults of its ``--quick`` smoke run); shared helpers (output folder, environment record, plotting)
live in ``benchmarks.common``. Results and the commands that produced them: ``benchmarks/RESULTS.md``.
"""

# harness name -> module (the output folder is benchmarks/results/<name>/)
BENCHMARKS = {
    "likelihood": "likelihood",
    "likelihood-tolerance": "likelihood_tolerance",
    "score-matching": "score_matching_cost",
    "estimation": "estimation_studies",
    "train": "train_throughput",
    "imaging": "imaging",
    "inpainting": "inpainting",
    "weightings": "weightings",
    "twin-swap": "twin_swap",
    "seed-spread": "seed_spread",
    "samplers": "samplers",
    "search-size": "search_size",
    "bounds": "bounds_studies",
    "consistency": "consistency",
    "alignment": "alignment",
    "gpu": "gpu",
    "stochastic": "stochastic",
    "reliability": "reliability",
}
