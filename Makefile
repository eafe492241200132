# Two set-up commands and one to serve; see README.md.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 3000

.PHONY: setup browser test test-fast serve gpu-run train-fast train-cifar10 export-cifar10 export-cifar10-shared \
	quantize-cifar10 train-catsdogs export-catsdogs train-catsdogs-cifar train-catsdogs-lenet train-cifar10-resnet20 \
	train-catsdogs-resnet20 compare-optimizers compare-architectures lint clean

setup: $(VENV)/.installed browser

# Chromium and playwright-core for tests/test_ui.py (the /ui page in a real browser). Never fails
# setup: where either cannot be installed, that test skips and says why.
browser:
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) \
			|| echo "make browser: chromium not installed; tests/test_ui.py will skip"; fi
	@if [ ! -f node_modules/playwright-core/package.json ]; then \
		(command -v npm >/dev/null 2>&1 && npm ci --no-audit --no-fund --silent) \
			|| echo "make browser: playwright-core not installed; tests/test_ui.py will skip"; fi

$(VENV)/.installed: requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	touch $@

# pytest exits 5 when it collects no tests; that is a failure here, not a pass.
test: setup
	$(PY) -m pytest

# The quick tier of the same suite: no server, dataset, training or packaging (tests/conftest.py
# marks those `slow`); under a minute.
test-fast: setup
	$(PY) -m pytest -m "not slow"

# Port: IMGCLF_PORT from the environment, else PORT (make serve PORT=8103), else 3000.
serve: setup
	IMGCLF_PORT=$${IMGCLF_PORT:-$(PORT)} $(PY) -m service.serve

# The one GPU run: trains the fast and shipping recipes, exports them into runs/gpu-run/registry,
# benchmarks scoring and serving; <= 8 min on one H100 (docs/BENCHMARKS.md). --smoke: CPU, tiny.
gpu-run: setup
	$(PY) benchmarks/gpu_run.py runs/gpu-run

# The fast preset once (docs/TRAINING.md); on a CPU pass e.g. ARGS="--limit-train 10000 --epochs 3".
train-fast: setup
	$(PY) -m training.train --preset fast --out runs/cifar10-fast $(ARGS)

# The shipped models were made by these targets (numbers in models/*/card.json and docs/TRAINING.md);
# each names a preset of training/presets.py. --precision auto (the default) trains in bf16 where the
# CPU or GPU computes it natively. The shipped cifar10 is the ship preset's run in
# ../shared/runs/2026-12-03-cpu-xeon-amx (export-cifar10-shared), served with flip test-time
# augmentation (docs/BENCHMARKS.md: what TTA and INT8 cost and give).
CIFAR10_RUN ?= runs/cifar10-ship
SHARED_CIFAR10_RUN := ../shared/runs/2026-12-03-cpu-xeon-amx/cifar10-ship
train-cifar10 $(CIFAR10_RUN)/best.pt: setup
	$(PY) -m training.train --preset ship --out $(CIFAR10_RUN)

export-cifar10:
	$(PY) -m training.export $(CIFAR10_RUN) --name cifar10 --tta flip

export-cifar10-shared:
	$(PY) -m training.export $(SHARED_CIFAR10_RUN) --name cifar10 --tta flip --trained-precision bf16

# The INT8 entry beside it (ONNX only): ONNX Runtime static quantisation of models/cifar10.
quantize-cifar10:
	$(PY) -m training.quantize models/cifar10 --name cifar10-int8

# Cats vs dogs: EfficientNet-Lite0 from ImageNet weights (shipped), and the course's two comparisons.
train-catsdogs: setup
	$(PY) -m training.train --preset catsdogs-imagenet --out runs/catsdogs-imagenet

export-catsdogs:
	$(PY) -m training.export runs/catsdogs-imagenet --name catsdogs --tta auto

train-catsdogs-cifar: $(CIFAR10_RUN)/best.pt
	$(PY) -m training.train --preset catsdogs-cifar --init-from $(CIFAR10_RUN)/best.pt --out runs/catsdogs-cifar

train-catsdogs-lenet: setup
	$(PY) -m training.train --preset catsdogs-lenet --out runs/catsdogs-lenet

# The earlier shipped models, kept as docs/TRAINING.md's comparison rows: a ResNet-20 in three
# CPU-sized sessions (8 epochs, then 10 and 12 more from each checkpoint, a warm-up + decay cycle
# each), and cats vs dogs transferred from its second session at 64, then 96 px. They ran with the
# defaults training.train had then (the resnet20-old* presets; docs/TRAINING.md: why they changed), in fp32.
train-cifar10-resnet20 runs/cifar10-resnet20-more/best.pt: setup
	$(PY) -m training.train --preset resnet20-old --out runs/cifar10-resnet20
	$(PY) -m training.train --preset resnet20-old-more --init-from runs/cifar10-resnet20/best.pt \
		--out runs/cifar10-resnet20-more
	$(PY) -m training.train --preset resnet20-old-30ep --init-from runs/cifar10-resnet20-more/best.pt \
		--out runs/cifar10-resnet20-30ep

train-catsdogs-resnet20: runs/cifar10-resnet20-more/best.pt
	$(PY) -m training.train --preset catsdogs-resnet20-old --init-from runs/cifar10-resnet20-more/best.pt \
		--out runs/catsdogs-resnet20-transfer
	$(PY) -m training.train --preset catsdogs-resnet20-old-more --init-from runs/catsdogs-resnet20-transfer/best.pt \
		--out runs/catsdogs-resnet20-transfer-more
	$(PY) -m training.train --preset catsdogs-resnet20-old-96 --init-from runs/catsdogs-resnet20-transfer-more/best.pt \
		--out runs/catsdogs-resnet20-96

# The course's comparisons (docs/INSIGHT.md): SGD/RMSprop/Adam on one network, then the zoo, on a
# CPU-sized budget; ARGS="--gpu" for the GPU run's budget (or e.g. ARGS="--epochs 4").
compare-optimizers: setup
	$(PY) benchmarks/compare.py optimizers --out runs/compare-optimizers $(ARGS)

compare-architectures: setup
	$(PY) benchmarks/compare.py architectures --out runs/compare-architectures $(ARGS)

lint: setup
	$(VENV)/bin/hadolint Dockerfile

clean:
	rm -rf runs .pytest_cache
