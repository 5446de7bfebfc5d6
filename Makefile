# Set-up on a fresh machine is part of every target: `make demo` and `make test` need nothing else.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first and pinned: a bare `torch` requirement resolves to a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-fast test-all lint format bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,qlora,sagemaker]"
	touch $@

# Build the tiny model, train it with LoRA on data/sciq-sample on the CPU, evaluate adapter vs. base.
demo: install
	rm -rf runs/demo
	$(VENV)/bin/sftbridge train configs/tiny-cpu.yaml --run-dir runs/demo
	$(VENV)/bin/sftbridge eval runs/demo --data data/sciq-sample/train.jsonl --limit 100 --json runs/demo/eval-train.json
	$(VENV)/bin/sftbridge eval runs/demo --json runs/demo/eval-test.json
	$(VENV)/bin/sftbridge generate runs/demo "What pigment produced by skin cells gives human skin, hair, and eyes much of their color?"

# Everything the CPU can run (what CI runs): ~5 minutes on 2 cores.
test: install
	$(PY) -m pytest -q -m "not gpu"

# The inner loop: everything but the end-to-end runs marked slow; under 2 minutes on 2 cores.
test-fast: install
	$(PY) -m pytest -q -m "not slow and not gpu"

lint: install
	$(VENV)/bin/ruff check src tests scripts benchmarks
	$(VENV)/bin/ruff format --check src tests scripts benchmarks
	$(VENV)/bin/mypy src

format: install
	$(VENV)/bin/ruff format src tests scripts benchmarks
	$(VENV)/bin/ruff check --fix src tests scripts benchmarks

bench: install
	$(PY) benchmarks/step_time.py

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
