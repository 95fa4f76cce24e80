# Two commands do all the set-up on a fresh machine:
#   make demo   # venv + install, demo data, a short DDP training run on local Ray, tracked in local MLflow
#   make test   # venv + install, the whole test suite (real Ray clusters, real mlflow servers)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch stays a range in pyproject.toml (clusters bring their own); this pair works on our CPU machines.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test test-fast bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e ".[test]" $(TORCH_PINS)
	# BasicSR 1.4.2's source, run standalone by the golden tests (tests/gan_core/test_realesrgan_golden.py)
	$(BIN)/pip download -q basicsr==1.4.2 --no-deps --no-build-isolation --no-binary :all: -d $(VENV)/reference
	touch $@

demo: install
	$(BIN)/python -m jobs.prepare_data --demo
	$(BIN)/python -m jobs.train --config jobs/configs/demo.yaml --num-workers 2

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

bench: install
	$(BIN)/python -m bench.train_throughput

clean:
	rm -rf data/demo ray_results mlflow.db mlartifacts
