# Dev setup: a local .venv with the CPU build of torch pinned first, then moeflow and its dev extras.
# GPU users: create the venv with your CUDA torch already installed and set TORCH_VERSION to it.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.moeflow-installed

.PHONY: setup test demo quickstart bench lint format docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python setup.py pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	echo "torch==$(TORCH_VERSION)" > $(VENV)/constraints.txt
	# The constraint keeps every other package from replacing the pinned torch.
	$(BIN)/python -m pip install --quiet -c $(VENV)/constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q --durations=20 tests

# The main job on the embedded default. A second run replaces runs/tiny_cpu (it is the demo's own
# output); DEMO_ARGS=--resume continues it instead.
DEMO_ARGS ?= --overwrite
demo: setup
	$(BIN)/moeflow launch --nproc 2 -- train examples/configs/tiny_cpu.toml $(DEMO_ARGS)

quickstart: setup
	$(BIN)/python examples/quickstart.py

bench: setup
	$(BIN)/python bench/layer.py

# The configuration reference is generated from the config classes (a test checks it is current).
docs: setup
	$(BIN)/python -m moeflow.train.config_reference > docs/configuration.md

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info
