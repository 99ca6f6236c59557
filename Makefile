# sounding-anagrams: every install goes through pyproject.toml; the venv lives in .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# `make render MODELS=tiny` runs offline on small random models; leave it out for SD 1.5 + Auffusion.
MODELS ?=
CONFIG ?= configs/rotate.yaml
OUT ?=
PYTEST_ARGS ?=

.PHONY: install test render bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

test: install
	HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true $(BIN)/python -m pytest $(PYTEST_ARGS)

render: install
	$(BIN)/sounding-anagrams render --config $(CONFIG) $(if $(MODELS),--models $(MODELS)) $(if $(OUT),--out $(OUT))

bench: install
	$(BIN)/python benchmarks/bench_sampler.py

lint: install
	$(BIN)/ruff check sounding_anagrams tests benchmarks
	$(BIN)/ruff format --check sounding_anagrams tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache renders
