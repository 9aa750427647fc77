# The two commands of the README. Each creates .venv and installs on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch 2.13.0 is pinned first so that pip never pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
DEEPSPEED_VERSION ?= 0.19.8
# pytest-xdist workers of `make test` (the multi-rank tests share one of them: tests/conftest.py)
TEST_WORKERS ?= 2

.PHONY: test demo lint clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)" setuptools wheel
	$(PY) -m pip install -q -e ".[dev]"
	# DeepSpeed ships as a source package: build it against the torch above, not in an
	# isolated environment that would fetch another (CUDA) torch.
	$(PY) -m pip install -q --no-build-isolation "deepspeed==$(DEEPSPEED_VERSION)"
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q -n $(TEST_WORKERS) tests

demo: $(VENV)/.installed
	$(PY) -m train experiment=tiny hydra.run.dir=runs/demo
	$(PY) -m train.export runs/demo runs/demo/hf
	$(VENV)/bin/moe-serve generate --model runs/demo/hf --device cpu --memory-budget 8.5MiB \
	  --prompt "def " --prompt "import os" --prompt "class " --max-new-tokens 48 \
	  --temperature 0.8 --top-k 40 --seed 0

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
