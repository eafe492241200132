# Two set-up commands and one to serve; see README.md.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 3000

.PHONY: setup browser test test-fast serve gpu-run train-fast train-cifar10 export-cifar10 export-cifar10-shared \
	quantize-cifar10 train-catsdogs export-catsdogs train-catsdogs-cifar train-catsdogs-lenet train-cifar10-resnet20 \
	train-catsdogs-resnet20 compare-optimizers compare-architectures lint clean \
	container-tools container-base wheelhouse-cpu wheelhouse-gpu container container-gpu container-test

setup: $(VENV)/.installed browser container-tools

# Chromium and playwright-core for tests/test_ui.py (the /ui page in a real browser). Never fails
# setup: where either cannot be installed, that test skips and says why.
browser:
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) \
			|| echo "make browser: chromium not installed; tests/test_ui.py will skip"; fi
	@if [ ! -f node_modules/playwright-core/package.json ]; then \
		(command -v npm >/dev/null 2>&1 && npm ci --no-audit --no-fund --silent) \
			|| echo "make browser: playwright-core not installed; tests/test_ui.py will skip"; fi

# podman, runc and debootstrap for the container image and tests/test_container.py (no Docker engine
# needed). Never fails setup: where they cannot be installed, that test skips and says why.
container-tools:
	@if ! command -v podman >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1 || [ ! -x $(RUNC) ]; then \
		if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
				podman runc debootstrap >/dev/null) \
				|| echo "make container-tools: podman/runc/debootstrap not installed; tests/test_container.py will skip"; \
		else echo "make container-tools: podman/runc/debootstrap need apt-get as root; tests/test_container.py will skip"; fi; fi

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

# ---- containers (Dockerfile; docs/DEPLOY.md) -------------------------------------------------------
# The CPU image, built here by podman with no image registry: the base is Debian made by debootstrap
# from the Debian package registry (CONTAINER_BASE, made once), the Python packages come from a
# wheelhouse downloaded on this machine (the build container has no TLS trust for the index).
# podman's defaults ask for more than this sandbox allows: runc (crun fails on hybrid cgroups) and
# explicit ulimits. tests/test_container.py uses the same image and flags.
RUNC ?= /usr/sbin/runc
PODMAN ?= podman --runtime $(RUNC)
PODMAN_LIMITS := --ulimit nofile=20000:20000 --ulimit nproc=4096:4096
CONTAINER_BASE ?= localhost/debian:bookworm
CONTAINER_IMAGE ?= localhost/image-classifier:cpu
CONTAINER_GPU_IMAGE ?= localhost/image-classifier:gpu
DEBIAN_MIRROR ?= http://deb.debian.org/debian
CONTAINER_CACHE ?= $(HOME)/.cache/imgclf/container
WHEEL_PY ?=
WHEEL_PY_ARGS := $(if $(WHEEL_PY),--python-version $(WHEEL_PY),)

container-base:
	@$(PODMAN) image exists $(CONTAINER_BASE) \
		|| container/make-base.sh $(CONTAINER_BASE) $(CONTAINER_CACHE) $(DEBIAN_MIRROR) $(PODMAN)

# Wheels for the image's Python (WHEEL_PY=3.12 for the CUDA base, Ubuntu 24.04); git ignores them.
# No `setup` prerequisite: the container targets never touch .venv (tests/test_container.py runs
# `make container` from inside `make test`); any Python with pip will do.
PIP_PY := $(if $(wildcard $(PY)),$(PY),$(PYTHON))
wheelhouse-cpu:
	$(PIP_PY) -m pip download --quiet --only-binary=:all: $(WHEEL_PY_ARGS) -d wheelhouse/cpu \
		-r requirements-serve-cpu.txt -c requirements.lock

wheelhouse-gpu:
	$(PIP_PY) -m pip download --quiet --only-binary=:all: $(WHEEL_PY_ARGS) -d wheelhouse/gpu \
		-r requirements-serve.txt -c requirements.lock

container: container-base wheelhouse-cpu
	$(PODMAN) build $(PODMAN_LIMITS) --format docker --target cpu \
		--build-arg CPU_BASE=$(CONTAINER_BASE) -t $(CONTAINER_IMAGE) .
	@$(PODMAN) image inspect --format '$(CONTAINER_IMAGE): {{.Size}} bytes' $(CONTAINER_IMAGE)

# The GPU image on the same Debian base (the CUDA base cannot be pulled here): proves its install
# step resolves offline; it cannot run here (no GPU in the container).
container-gpu: container-base wheelhouse-gpu
	$(PODMAN) build $(PODMAN_LIMITS) --format docker --target gpu \
		--build-arg GPU_BASE=$(CONTAINER_BASE) -t $(CONTAINER_GPU_IMAGE) .
	@$(PODMAN) image inspect --format '$(CONTAINER_GPU_IMAGE): {{.Size}} bytes' $(CONTAINER_GPU_IMAGE)

# Runs the CPU image and checks it from outside (tests/test_container.py); builds it first.
container-test: container
	IMGCLF_CONTAINER_BUILT=1 $(PY) -m pytest tests/test_container.py

lint: setup
	$(VENV)/bin/hadolint Dockerfile

clean:
	rm -rf runs .pytest_cache
