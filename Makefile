# Two set-up commands and one to serve; see README.md.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 3000

.PHONY: setup browser test test-fast serve gpu-run train-fast train-cifar10 export-cifar10 train-catsdogs train-catsdogs-lenet export-catsdogs compare-optimizers compare-architectures lint clean

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

# The shipped models were made by these targets (numbers in models/*/card.json and docs/TRAINING.md).
# CIFAR-10 in three CPU-sized sessions: 8 epochs, then 10 more from that checkpoint (a second
# warm-up + decay cycle at half the learning rate), then 12 more the same way. (They ran with the
# hand-written warm-up from 0 + linear decay to 0 that the onecycle schedule has since replaced:
# the same shape, from 0.2x to 0.07x the peak rate instead of 0 to 0.) Cats vs dogs was
# transferred from the second session's checkpoint. OLD_RECIPE keeps the defaults training.train had
# then (docs/TRAINING.md: why they changed).
OLD_RECIPE := --schedule onecycle --warmup 0.15 --label-smoothing 0.1
train-cifar10 runs/cifar10-resnet20-more/best.pt: setup
	$(PY) -m training.train --dataset cifar10 --model resnet20 --epochs 8 --lr 0.1 --batch-size 256 $(OLD_RECIPE) \
		--out runs/cifar10-resnet20
	$(PY) -m training.train --dataset cifar10 --model resnet20 --init-from runs/cifar10-resnet20/best.pt \
		--epochs 10 --lr 0.05 --batch-size 256 $(OLD_RECIPE) --out runs/cifar10-resnet20-more
	$(PY) -m training.train --dataset cifar10 --model resnet20 --init-from runs/cifar10-resnet20-more/best.pt \
		--epochs 12 --lr 0.05 --batch-size 256 $(OLD_RECIPE) --out runs/cifar10-resnet20-30ep

export-cifar10:
	$(PY) -m training.export runs/cifar10-resnet20-30ep --name cifar10

# Transfer from the CIFAR-10 checkpoint at 64x64: 1 head-only epoch, then 8 epochs of everything;
# 6 more epochs at lr 0.02; then 6 epochs at 96x96 (each step kept because validation accuracy rose).
train-catsdogs: runs/cifar10-resnet20-more/best.pt
	$(PY) -m training.train --dataset catsdogs --model resnet20 --image-size 64 \
		--init-from runs/cifar10-resnet20-more/best.pt --head-epochs 1 --epochs 8 --lr 0.05 --batch-size 128 $(OLD_RECIPE) \
		--out runs/catsdogs-resnet20-transfer
	$(PY) -m training.train --dataset catsdogs --model resnet20 --image-size 64 \
		--init-from runs/catsdogs-resnet20-transfer/best.pt --epochs 6 --lr 0.02 --batch-size 128 $(OLD_RECIPE) \
		--out runs/catsdogs-resnet20-transfer-more
	$(PY) -m training.train --dataset catsdogs --model resnet20 --image-size 96 \
		--init-from runs/catsdogs-resnet20-transfer-more/best.pt --epochs 6 --lr 0.02 --batch-size 128 $(OLD_RECIPE) \
		--out runs/catsdogs-resnet20-96

# The from-scratch baseline: the seed's LeNet-5 at 224x224, fixed.
train-catsdogs-lenet: setup
	$(PY) -m training.train --dataset catsdogs --model lenet5 --image-size 224 --epochs 4 \
		--optimizer adam --lr 0.002 --weight-decay 0.0001 --batch-size 128 $(OLD_RECIPE) \
		--out runs/catsdogs-lenet5

export-catsdogs:
	$(PY) -m training.export runs/catsdogs-resnet20-96 --name catsdogs --tta auto

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
