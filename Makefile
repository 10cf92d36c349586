# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create (or reuse) .venv and install what they need.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.rapidnet-installed
# torch/torchvision pinned to the builds this project is tested with (pip takes them from the machine's disk here).
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test lint format clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Train RapidNet-Ti on Fashion-MNIST (real images, offline) on the CPU, evaluate it, classify a sample, plot curves.
DEMO_DIR ?= runs/demo
demo: $(STAMP)
	@bash scripts/ensure_fashion_mnist.sh
	$(VENV)/bin/rapidnet info rapidnet_ti
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/rapidnet train --config configs/fashion_mnist_rapidnet_ti_demo.yaml --output $(DEMO_DIR)
	$(VENV)/bin/rapidnet eval --checkpoint $(DEMO_DIR)/model_best.safetensors --data fashion-mnist
	$(VENV)/bin/rapidnet predict src/rapidnet/assets/sample_ankle_boot.png --checkpoint $(DEMO_DIR)/model_best.safetensors --top-k 3
	$(VENV)/bin/rapidnet plot $(DEMO_DIR)

# One worker per core (pytest-xdist), each test file on one worker so that its module fixtures are built once; the
# tests themselves use one torch thread (tests/conftest.py), so a second worker uses the otherwise idle core.
test: $(STAMP)
	$(PY) -m pytest -q -n auto --dist loadfile --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format src tests

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
