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
# `make search VIEW=rotate [MODELS=tiny] [TRIALS=N] [RUNS=DIR]` runs studies/$(VIEW).yaml.
VIEW ?= rotate
TRIALS ?=
RUNS ?= runs
PORT ?= 5000
# Many workers: `make search ... WORKERS=4 [STORAGE=postgresql+psycopg://...] [TRACKING_URI=http://...]`.
WORKERS ?=
STORAGE ?=
TRACKING_URI ?=
# `make server`: an MLflow tracking server for workers on many machines (README, "Many GPUs, many machines").
HOST ?= 127.0.0.1
MLFLOW_DB ?= postgresql+psycopg://postgres@127.0.0.1:5432/mlflow
ARTIFACTS ?= $(RUNS)/server-artifacts

.PHONY: install install-dev install-prefer browser test render search server ui dashboard prefer confirm leaderboard gallery \
	export bench bench-gpu lint schema clean

# What each job needs, no more: `install` the package (search, render, ui, dashboard, export, bench);
# `install-prefer` adds BoTorch for `prefer`; `install-dev` the test and lint tools too (`make test`, `make lint`).
DEV_STAMP := $(VENV)/.installed-dev
PREFER_STAMP := $(VENV)/.installed-prefer

install: $(STAMP)
install-dev: $(DEV_STAMP)
install-prefer: $(PREFER_STAMP)

$(BIN)/pip:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/pip
	$(BIN)/pip install -q -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(DEV_STAMP)

$(PREFER_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[prefer]'
	touch $(PREFER_STAMP)

# Debian's chromium, headless, for the tests that look at the web pages (MLflow UI, optuna-dashboard) as a
# person would. Root installs it; elsewhere, install the chromium package yourself.
CHROMIUM ?= /usr/bin/chromium

browser: $(CHROMIUM)

# Waits for another apt-get (a second checkout installing at the same time) rather than failing.
$(CHROMIUM):
	apt-get -o DPkg::Lock::Timeout=600 update -qq && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends chromium

test: install-dev browser
	HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true $(BIN)/python -m pytest $(PYTEST_ARGS)

render: install
	$(BIN)/sounding-anagrams render --config $(CONFIG) $(if $(MODELS),--models $(MODELS)) $(if $(OUT),--out $(OUT))

STORES = $(if $(STORAGE),--storage $(STORAGE)) $(if $(TRACKING_URI),--tracking-uri $(TRACKING_URI))

search: install
	$(BIN)/sounding-anagrams search studies/$(VIEW).yaml --runs $(RUNS) $(if $(MODELS),--models $(MODELS)) \
		$(if $(TRIALS),--trials $(TRIALS)) $(if $(WORKERS),--workers $(WORKERS)) $(STORES)

server: install
	$(BIN)/sounding-anagrams server --backend-store-uri $(MLFLOW_DB) --artifacts-destination $(ARTIFACTS) \
		--host $(HOST) --port $(PORT) $(if $(EXPOSE),--expose)

confirm: install
	$(BIN)/sounding-anagrams confirm studies/$(VIEW).yaml --runs $(RUNS) $(if $(MODELS),--models $(MODELS)) $(STORES)

leaderboard: install
	$(BIN)/sounding-anagrams leaderboard studies/$(VIEW).yaml --runs $(RUNS) $(if $(MODELS),--models $(MODELS)) $(STORES)

# The study's gallery, its top knob sets side by side (pictures, sounds, clips), written from the stored study
# without rendering (a search rewrites it after each batch): `make gallery VIEW=rotate [MODELS=tiny]`.
gallery: install
	$(BIN)/sounding-anagrams gallery studies/$(VIEW).yaml --runs $(RUNS) $(if $(MODELS),--models $(MODELS)) $(STORES)

export: install
	$(BIN)/sounding-anagrams export studies/$(VIEW).yaml --runs $(RUNS) $(if $(MODELS),--models $(MODELS)) $(STORES) \
		$(if $(PREFER),--prefer)

# MLflow's UI over the search's store, on loopback only, opened on the leaderboard of the study searched last
# (STUDY=permute for another).
STUDY ?=
ui: install
	$(BIN)/sounding-anagrams ui $(STUDY) --runs $(RUNS) --port $(PORT) $(if $(MODELS),--models $(MODELS))

# optuna-dashboard over the search's storage: each trial's views, spectrogram, clip and sound (loopback only).
DASHBOARD_PORT ?= 8080
dashboard: install
	$(BIN)/sounding-anagrams dashboard $(STUDY) --runs $(RUNS) --port $(DASHBOARD_PORT) $(if $(MODELS),--models $(MODELS)) \
		$(if $(STORAGE),--storage $(STORAGE))

# A person steers: `make prefer VIEW=rotate [MODELS=tiny] [FROM_SEARCH=1]` shows candidates side by side in
# optuna-dashboard; the person clicks the worst, a preferential GP proposes the next.
FROM_SEARCH ?=
prefer: install-prefer
	$(BIN)/sounding-anagrams prefer studies/$(VIEW).yaml --runs $(RUNS) --port $(DASHBOARD_PORT) \
		$(if $(MODELS),--models $(MODELS)) $(if $(TRIALS),--trials $(TRIALS)) $(if $(FROM_SEARCH),--from-search) \
		$(STORES)

bench: install
	$(BIN)/python benchmarks/bench_sampler.py
	$(BIN)/python benchmarks/bench_pruning.py
	$(BIN)/python benchmarks/bench_search.py
	$(BIN)/python benchmarks/bench_pipeline.py

# On a CUDA machine: the measured GPU busy fraction of a 16-trial search (bench_pipeline's part 3) alone.
bench-gpu: install
	$(BIN)/python benchmarks/bench_pipeline.py --gpu-only

# The JSON Schemas of study files and configs, which editors read (the tests fail when one is out of date).
schema: install
	$(BIN)/python -m sounding_anagrams.schema

lint: install-dev
	$(BIN)/ruff check sounding_anagrams tests benchmarks
	$(BIN)/ruff format --check sounding_anagrams tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache renders runs
