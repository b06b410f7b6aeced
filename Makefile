# edgeforge: the two set-up commands are `make demo` and `make test`; both create .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test test-all lint clean

$(BIN)/edgeforge: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch by exact version first: a bare 'torch' requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: $(BIN)/edgeforge
	$(BIN)/edgeforge demo

# Fast tests, then the integration tests (bundled teacher, real llama.cpp / onnxruntime / sshd), then ruff.
test: $(BIN)/edgeforge
	$(BIN)/ruff check .
	$(BIN)/pytest
	# exit 5 means no test was selected: allowed, so a branch without integration tests still passes
	$(BIN)/pytest -m integration || [ $$? -eq 5 ]

lint: $(BIN)/edgeforge
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
