# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# benchmarks share the 2 cores: one heavy run at a time
HEAVY := flock /tmp/scoresde-heavy.lock $(PY)
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1

.PHONY: demo test docs test-slow clean demo-digits bench-score-matching bench-likelihood bench-train bench-bounds bench-imaging bench-samplers bench-consistency bench-alignment bench-estimation

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m scoresde.cli demo

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# the documentation site (docs/ + API reference from the docstrings), offline, warnings as errors
docs: $(STAMP)
	$(PY) -m mkdocs build --strict --site-dir build/site

bench-score-matching: $(STAMP)
	$(HEAVY) benchmarks/score_matching_cost.py

bench-likelihood: $(STAMP)
	$(HEAVY) benchmarks/likelihood.py

bench-train: $(STAMP)
	$(HEAVY) benchmarks/train_throughput.py

bench-bounds: $(STAMP)
	$(HEAVY) benchmarks/bounds_studies.py

bench-imaging: $(STAMP)
	$(HEAVY) benchmarks/imaging.py --budget bench

demo-digits: $(STAMP)
	$(HEAVY) benchmarks/imaging.py --budget demo

bench-samplers: $(STAMP)
	$(HEAVY) benchmarks/samplers.py

bench-consistency: $(STAMP)
	$(HEAVY) benchmarks/consistency.py

bench-alignment: $(STAMP)
	$(HEAVY) benchmarks/alignment.py

bench-estimation: $(STAMP)
	$(HEAVY) benchmarks/estimation_studies.py a b
	$(HEAVY) benchmarks/estimation_studies.py c d --data ring
	$(HEAVY) benchmarks/estimation_studies.py c d --data mixture16
	$(HEAVY) benchmarks/estimation_studies.py c d --reuse

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
