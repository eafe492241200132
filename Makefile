# Two set-up commands and one to serve; see README.md.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 3000

.PHONY: setup test serve train-cifar10 export-cifar10 train-catsdogs export-catsdogs lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	touch $@

# pytest exits 5 when it collects no tests; that is a failure here, not a pass.
test: setup
	$(PY) -m pytest

serve: setup
	IMGCLF_PORT=$(PORT) $(PY) -m service.serve

# The shipped models were made by these targets (numbers in models/*/card.json and docs/TRAINING.md).
train-cifar10: setup
	$(PY) -m training.train --dataset cifar10 --model resnet20 --epochs 8 --out runs/cifar10-resnet20

export-cifar10:
	$(PY) -m training.export runs/cifar10-resnet20 --name cifar10

lint: setup
	$(VENV)/bin/hadolint Dockerfile

clean:
	rm -rf runs .pytest_cache
