# edgeforge: the two set-up commands are `make demo` and `make test`; both create .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# llama.cpp's CMake flags on this machine: native, minus Intel AMX only where the CPU reports AMX (its kernels crash in
# some VMs; edgeforge/export/native_build.py; EDGEFORGE_LLAMA_AMX=on|off overrides it). Expanded only when used.
LLAMA_CMAKE_ARGS = $(shell $(PY) edgeforge/export/native_build.py)

.PHONY: demo test lint clean system-deps
# A set-up step that fails leaves no target behind (pip writes bin/edgeforge before the binding check and the tools
# are done): the next make runs the whole set-up again instead of taking the half-made venv as ready.
.DELETE_ON_ERROR:

$(BIN)/edgeforge: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch by exact version first: a bare 'torch' requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	# llama-cpp-python compiles llama.cpp natively; without Intel AMX only where the CPU has it (native_build.py).
	# --no-cache-dir: a wheel cached from a build with other flags must not be reused.
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install -q --no-cache-dir llama-cpp-python==0.3.36
	$(BIN)/pip install -q -e '.[dev]'
	# llama.cpp itself on a real batch (the bundled teacher): a runtime that crashes here stops the install with why
	$(BIN)/python edgeforge/export/native_build.py --check-binding
	# llama.cpp's converter and tools at the binding's version (fetched and built once, ~5 min on 2 cores)
	$(BIN)/python -m edgeforge.export.llama_tools
	touch $@

# System packages the tests use: openssh-server (the SSH-target tests start a real sshd on 127.0.0.1), adb (the adb
# target tests) and chromium (the report test renders report.html headless). As root, the missing ones are installed
# with apt-get; otherwise make stops, before anything is set up or tested, with the one command to run.
SYSTEM_PACKAGES_CHECK = \
	need=""; \
	[ -x /usr/sbin/sshd ] || need="$$need openssh-server"; \
	command -v adb >/dev/null 2>&1 || need="$$need adb"; \
	command -v chromium >/dev/null 2>&1 || need="$$need chromium"

system-deps:
	@$(SYSTEM_PACKAGES_CHECK); \
	if [ -z "$$need" ]; then exit 0; fi; \
	if [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing the system packages the tests need:$$need"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$need >/dev/null; \
	else \
		echo "missing system packages for the tests:$$need; install them with: sudo apt-get install -y$$need" >&2; \
		exit 1; \
	fi

# The main job on the embedded default: the bundled teacher, built-in data and task, for a device it is too slow
# for (so it distills, fine-tunes, exports, verifies, benchmarks and ships to edgeforge-build/ship).
demo: system-deps $(BIN)/edgeforge
	$(BIN)/edgeforge build --profile raspberry-pi-zero-2w --out edgeforge-build

# Fast tests, then the integration tests (bundled teacher, real llama.cpp / onnxruntime / sshd), then ruff.
test: system-deps $(BIN)/edgeforge
	$(BIN)/ruff check .
	$(BIN)/pytest
	# exit 5 means no test was selected: allowed, so a branch without integration tests still passes
	$(BIN)/pytest -m integration || [ $$? -eq 5 ]

lint: $(BIN)/edgeforge
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
