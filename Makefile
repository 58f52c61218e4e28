# The project's front door: `make help` lists every command.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON      ?= python3
VENV        := .venv
BIN         := $(VENV)/bin
# The Hydra experiment (training/conf/experiment) the pipeline targets build: default (the served
# model), full (the released recipe), quick (smoke runs). Outputs: models/emotion-$EXPERIMENT/,
# metrics/$EXPERIMENT/ (named by the Hydra paths group and dvc.yaml alike).
EXPERIMENT  ?= default
ARCHIVE     := model_store/emotion.mar
# dvc.yaml holds the stage graph; its commands run `python` from the virtualenv.
DVC         := PATH=$(abspath $(BIN)):$$PATH $(BIN)/dvc
export PYTHONUNBUFFERED := 1
export WANDB_SILENT := true

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

experiment: $(BIN)/.installed ## Set `experiment` in params.yaml to $EXPERIMENT (the pipeline targets do it)
	@test -f training/conf/experiment/$(EXPERIMENT).yaml || \
		{ echo "no experiment '$(EXPERIMENT)': choose one of training/conf/experiment/*.yaml" >&2; exit 1; }
	@grep -qx 'experiment: $(EXPERIMENT)' params.yaml || sed -i 's/^experiment: .*/experiment: $(EXPERIMENT)/' params.yaml

# Each pipeline target runs its DVC stage and whatever it depends on; DVC skips what is up to date.
data: experiment ## Validate the raw splits and write data/processed/ (DVC stage data)
	$(DVC) repro data

train: experiment ## Train models/emotion-$EXPERIMENT/, metrics in metrics/$EXPERIMENT/ (DVC stage train)
	$(DVC) repro train

evaluate: experiment ## Evaluate the trained model into metrics/$EXPERIMENT/eval.json (DVC stage evaluate)
	$(DVC) repro evaluate

archive: experiment ## Pack model_store/emotion.mar from models/emotion-$EXPERIMENT/ (DVC stage archive)
	$(DVC) repro archive

# What `make serve` needs: the whole pipeline (the served model evaluated too), so `dvc status` has
# nothing to report afterwards. Targets that need the archive depend on this file.
$(ARCHIVE): repro ;

repro: experiment ## The whole DVC pipeline (data -> train -> evaluate -> archive) for $EXPERIMENT
	$(DVC) repro

train-speed: data ## Epoch time fp32 vs bf16, with and without length buckets
	$(BIN)/python -m training.speed

profile: data ## Profile a few training steps (trace + top operators in outputs/profile/)
	$(BIN)/python -m training.train experiment=quick train.profile.enabled=true train.max_steps=10 logger=none \
		data.max_train_examples=640 paths.model_dir=$(abspath outputs/profile/model) \
		paths.metrics_dir=$(abspath outputs/profile/metrics)

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

bench: system-deps train ## In-process vs FastAPI vs stock vs tuned TorchServe, one run, on models/emotion-$EXPERIMENT
	$(BIN)/python -m bench.run

batching: $(ARCHIVE) ## Measure batchSize x maxBatchDelay x workers (loadtest/results/batching.json)
	$(BIN)/python -m loadtest.batching_sweep

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

.PHONY: help venv system-deps experiment data train evaluate archive repro train-speed profile serve gateway stop loadtest monitor bench batching lint format test test-fast clean
