# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
INSTALLED := $(VENV)/.installed
TEST_WORKERS ?= 2
DEMO_WORKDIR ?= runs/pcdm_demo
FPDM_DEMO_WORKDIR ?= runs/fpdm_demo
CFLD_DEMO_WORKDIR ?= runs/cfld_demo
REPOSEDM_DEMO_WORKDIR ?= runs/reposedm_demo

.PHONY: install demo demo-fpdm demo-cfld demo-reposedm toy-demo test test-slow test-all clean

install: $(INSTALLED)

# torch is pinned first so that pyproject.toml's `torch>=` is already satisfied (no CUDA download); then the
# package in editable mode with the extras the tests and the demo use.
$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e ".[test,notebook,tfds-build]"
	touch $(INSTALLED)

# PCDMs end to end on synthetic people (three tiny stages, then the test pairs): demo_out/grid.png, metrics.json.
demo: $(INSTALLED)
	$(PY) demo.py --config=configs/pcdm_inpaint.py:demo --workdir=$(DEMO_WORKDIR) --output_dir=demo_out

# FPDM end to end on synthetic people (two tiny stages, then the test pairs): demo_out/fpdm/grid.png, metrics.json.
demo-fpdm: $(INSTALLED)
	$(PY) demo.py --config=configs/fpdm_diffusion.py:demo --workdir=$(FPDM_DEMO_WORKDIR) --output_dir=demo_out/fpdm

# CFLD end to end on synthetic people (one tiny stage, then the test pairs): demo_out/cfld/grid.png, metrics.json.
demo-cfld: $(INSTALLED)
	$(PY) demo.py --config=configs/cfld.py:demo --workdir=$(CFLD_DEMO_WORKDIR) --output_dir=demo_out/cfld

# RePoseDM and B1 (PIDM) on synthetic people: demo_out/reposedm/grid.png, metrics.json.
demo-reposedm: $(INSTALLED)
	$(PY) demo.py --config=configs/reposedm.py:demo --workdir=$(REPOSEDM_DEMO_WORKDIR) --output_dir=demo_out/reposedm

# Every sampler of the diffusion core on a 2-D Gaussian mixture with its exact denoiser (seconds).
toy-demo: $(INSTALLED)
	$(PY) demo.py --config=configs/toy_mixture.py --workdir=runs/toy_demo

# The suite in three selections: `test` all but the end-to-end tests marked slow (under 10 minutes on 2 cores),
# `test-slow` those alone, `test-all` both (what CI runs). worksteal: an idle worker takes tests queued on the busy one.
PYTEST := JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=10

test: $(INSTALLED)
	$(PYTEST) -m "not slow"

test-slow: $(INSTALLED)
	$(PYTEST) -m slow

test-all: $(INSTALLED)
	$(PYTEST)

clean:
	rm -rf $(VENV) runs .pytest_cache
