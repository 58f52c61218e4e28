# The project's front door: `make help` lists every command.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON      ?= python3
VENV        := .venv
BIN         := $(VENV)/bin
EXPERIMENT  ?= quick
# `make train` and `make serve` keep each experiment's model and metrics apart.
MODEL_DIR   := models/emotion-$(EXPERIMENT)
METRICS_DIR := metrics/$(EXPERIMENT)
ARCHIVE     := model_store/emotion.mar
export PYTHONUNBUFFERED := 1
export WANDB_SILENT := true

TRAIN_SOURCES := $(wildcard training/*.py training/conf/*.yaml training/conf/*/*.yaml)
HANDLER_SOURCES := $(wildcard handler/*.py handler/*.yaml serving/archive.py serving/onnx_export.py)

help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk -F ':.*?## ' '{printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(BIN)/.installed: requirements.txt requirements-dev.txt requirements-serve.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

venv: $(BIN)/.installed ## Create the virtualenv and install the pinned requirements

system-deps: ## Install Java 17 (TorchServe), Prometheus, wrk and nginx with apt when missing
	@command -v java >/dev/null || (apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless)
	@command -v prometheus >/dev/null || (apt-get update -qq && apt-get install -y -qq prometheus)
	@command -v promtool >/dev/null || (apt-get update -qq && apt-get install -y -qq prometheus)
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || (apt-get update -qq && apt-get install -y -qq nginx)

data/processed/stats.json: $(BIN)/.installed training/prepare.py training/data.py
	$(BIN)/python -m training.prepare

data: data/processed/stats.json ## Validate the raw splits and write data/processed/

$(MODEL_DIR)/model.safetensors: data/processed/stats.json $(TRAIN_SOURCES)
	$(BIN)/python -m training.train experiment=$(EXPERIMENT) paths.model_dir=$(abspath $(MODEL_DIR)) \
		paths.metrics_dir=$(abspath $(METRICS_DIR))

train: $(MODEL_DIR)/model.safetensors ## Train models/emotion-$EXPERIMENT (EXPERIMENT=quick|full, default quick)

train-speed: data/processed/stats.json ## Epoch time fp32 vs bf16, with and without length buckets
	$(BIN)/python -m training.speed

profile: data/processed/stats.json ## Profile a few training steps (trace + top operators in outputs/profile/)
	$(BIN)/python -m training.train experiment=quick train.profile.enabled=true train.max_steps=10 logger=none \
		data.max_train_examples=640 paths.model_dir=$(abspath outputs/profile/model) \
		paths.metrics_dir=$(abspath outputs/profile/metrics)

repro: $(BIN)/.installed ## Run the DVC pipeline (data -> train -> evaluate -> archive)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/dvc repro

$(ARCHIVE): $(MODEL_DIR)/model.safetensors $(HANDLER_SOURCES)
	$(BIN)/python -m serving.archive --model-dir $(MODEL_DIR) --export-dir model_store

archive: $(ARCHIVE) ## Pack model_store/emotion.mar with torch-model-archiver

serve: system-deps $(ARCHIVE) ## Main job: data -> train -> archive -> TorchServe on 127.0.0.1 (EXPERIMENT=quick|full)
	@$(BIN)/torchserve --stop >/dev/null 2>&1 || true
	@mkdir -p logs
	$(BIN)/torchserve --start --ncs --ts-config config.properties --models emotion=emotion.mar >> logs/console.log 2>&1
	$(BIN)/python -m serving.server wait

gateway: system-deps ## Retrying nginx gateway on 127.0.0.1:8090 in front of `make serve` (scale down safely)
	$(BIN)/python -m serving.gateway --port 8090

stop: ## Stop TorchServe started by `make serve`
	$(BIN)/torchserve --stop

loadtest: $(BIN)/.installed ## Stepped Locust load test against `make serve` (reports in loadtest/results)
	$(BIN)/python -m loadtest.run --config loadtest/config.yaml

monitor: system-deps ## Prometheus on 127.0.0.1:9090 scraping the TorchServe of `make serve`
	prometheus --config.file=monitoring/prometheus.yml --web.listen-address=127.0.0.1:9090 \
		--storage.tsdb.path=outputs/prometheus

bench: system-deps $(MODEL_DIR)/model.safetensors ## In-process vs FastAPI vs stock vs tuned TorchServe, one run
	$(BIN)/python -m bench.run --model-dir $(MODEL_DIR)

batching: $(ARCHIVE) ## Measure batchSize x maxBatchDelay x workers (loadtest/results/batching.json)
	$(BIN)/python -m loadtest.batching_sweep

# Drift monitoring (README, "Model monitoring (drift)").
DRIFT_WINDOW ?= 1000

$(MODEL_DIR).profile.json: $(MODEL_DIR)/model.safetensors monitoring/profile.py handler/emotion_monitor.py
	$(BIN)/python -m monitoring.profile --model-dir $(MODEL_DIR)

drift: $(BIN)/.installed ## Last DRIFT_WINDOW (1000) logged requests of `make serve` vs the reference (outputs/drift/)
	$(BIN)/python -m monitoring.drift --window $(DRIFT_WINDOW) --model-dir $(MODEL_DIR)

robustness: $(MODEL_DIR).profile.json $(ARCHIVE) ## Served model's accuracy under typos, emoji, casing, ... (outputs/robustness/)
	$(BIN)/python -m monitoring.robustness --archive $(ARCHIVE)

lint: $(BIN)/.installed ## Ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(BIN)/.installed ## Apply ruff formatting and autofixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: $(BIN)/.installed system-deps lint ## Lint, then the whole test suite with line coverage
	$(BIN)/python -m pytest --cov --cov-report=term --cov-report=xml

test-fast: $(BIN)/.installed ## Tests not marked slow
	$(BIN)/python -m pytest -m "not slow"

clean: ## Remove run folders and caches (keeps data, models and the virtualenv)
	rm -rf outputs .pytest_cache .ruff_cache .coverage coverage.xml logs

.PHONY: help venv system-deps data train train-speed profile repro archive serve gateway stop loadtest monitor bench batching drift robustness lint format test test-fast clean
