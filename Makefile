# Quick start: `make demo` (train + measure on the embedded dataset), `make test`.
# Both create .venv on first use and install the package with the pinned constraints.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint format figures clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m landscape demo

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2

# The README's figures (from a full demo run) and the committed notebooks' outputs.
FIGURES := curves surfaces sgd_hessian_spectrum sam_hessian_spectrum
figures: $(VENV)/.installed
	$(PY) -m landscape demo --out runs/demo
	for f in $(FIGURES); do cp runs/demo/figures/$$f.png figures/; done
	cd notebooks && for nb in plotting.ipynb training_loop.ipynb study.ipynb; do \
		../$(PY) -c "import sys, nbformat, nbclient; nb = nbformat.read(sys.argv[1], 4); \
		nbclient.NotebookClient(nb, timeout=600).execute(); nbformat.write(nb, sys.argv[1])" $$nb; \
	done

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(VENV)/.installed
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
