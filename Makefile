# Quickstart: `make train` (main job) and `make test`; both install what they need first.
PYTHON      ?= python3
VENV        ?= .venv
# Choose another torch build with e.g. `make install TORCH_SPEC="torch==2.13.0 --index-url URL"`.
TORCH_SPEC  ?= torch==2.13.0
CONFIG      ?= configs/jaychou.yaml
ARGS        ?=
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
export PIPELINE_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: install train test test-fast bench bench-quality bench-corpora bench-chaos lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

train: install
	PATH=$(abspath $(VENV))/bin:$$PATH launch/local.sh --config $(CONFIG) $(ARGS)

test: install
	HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q -ra $(ARGS)

test-fast: install
	HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q -ra -m "not slow and not slurm" $(ARGS)

bench: install
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m bench.run $(ARGS)
	OMP_NUM_THREADS=1 $(PY) -m bench.guard --write

bench-quality: install
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m bench.quality $(ARGS)

bench-corpora: install
	$(PY) -m bench.corpora $(ARGS)

bench-chaos: install
	$(PY) -m bench.chaos --write $(ARGS)

lint: install
	$(VENV)/bin/ruff check pipeline tests bench
	$(VENV)/bin/ruff format --check pipeline tests bench

format: install
	$(VENV)/bin/ruff format pipeline tests bench
	$(VENV)/bin/ruff check --fix pipeline tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache bench/out
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
