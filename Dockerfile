# syntax=docker/dockerfile:1
# The classifier service in a container: two images from this one file (docs/DEPLOY.md has the rest).
#   GPU, the default target: onnxruntime-gpu and torch with CUDA on the CUDA runtime base
#     docker build -t image-classifier .
#     docker run --gpus all -p 3000:3000 image-classifier
#   CPU, target `cpu`: the CPU onnxruntime, no torch and no CUDA library, on Debian slim
#     docker build --target cpu -t image-classifier:cpu .
#     docker run -p 3000:3000 image-classifier:cpu
# Bases are build arguments (GPU_BASE, CPU_BASE: any Debian or Ubuntu image with python3 >= 3.10 in
# apt); `make container` builds the CPU image with a Debian base made by debootstrap, no registry.
# Builds without internet: wheels in wheelhouse/gpu or wheelhouse/cpu (`make wheelhouse-cpu`) are
# installed with --no-index; the wheelhouse is bind-mounted, never part of the image.
# Mount another registry over the baked-in models:  -v /path/models:/app/models:ro
# Run it read-only: --read-only --tmpfs /tmp (the service writes only under /tmp).
ARG GPU_BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG CPU_BASE=debian:bookworm-slim

# ---- CPU image -----------------------------------------------------------------------------------
FROM ${CPU_BASE} AS cpu

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt/* /var/log/dpkg.log \
    && python3 -m venv /opt/venv \
    && useradd --uid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin app

WORKDIR /app
COPY requirements.lock requirements-serve-cpu.txt ./
# Serving needs neither pip nor setuptools: they leave the image once the requirements are in.
RUN --mount=type=bind,source=wheelhouse,target=/wheelhouse \
    if ls /wheelhouse/cpu/*.whl >/dev/null 2>&1; then export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheelhouse/cpu; fi \
    && pip install -r requirements-serve-cpu.txt -c requirements.lock \
    && pip uninstall -y -q pip setuptools

COPY service/ service/
COPY models/ models/
RUN chmod 0755 service/entrypoint.sh && python -m compileall -q service

USER 10001
ENV IMGCLF_MODELS_DIR=/app/models \
    IMGCLF_DEVICE=cpu \
    IMGCLF_PORT=3000 \
    HOME=/tmp \
    BENTOML_HOME=/tmp/bentoml
EXPOSE 3000
HEALTHCHECK --interval=15s --timeout=5s --start-period=90s --retries=3 \
    CMD ["/app/service/entrypoint.sh", "--healthcheck"]
# bentoml serve drains in-flight requests on SIGTERM; give it time: docker stop -t 30
STOPSIGNAL SIGTERM
ENTRYPOINT ["/app/service/entrypoint.sh"]

# ---- GPU image (the default: the last stage) -------------------------------------------------------
FROM ${GPU_BASE} AS gpu

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt/* /var/log/dpkg.log \
    && python3 -m venv /opt/venv \
    && useradd --uid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin app

WORKDIR /app
COPY requirements.lock requirements-serve.txt ./
RUN --mount=type=bind,source=wheelhouse,target=/wheelhouse \
    if ls /wheelhouse/gpu/*.whl >/dev/null 2>&1; then export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheelhouse/gpu; fi \
    && pip install -r requirements-serve.txt -c requirements.lock

COPY service/ service/
COPY models/ models/
RUN chmod 0755 service/entrypoint.sh && python -m compileall -q service

USER 10001
ENV IMGCLF_MODELS_DIR=/app/models \
    IMGCLF_DEVICE=auto \
    IMGCLF_PORT=3000 \
    HOME=/tmp \
    BENTOML_HOME=/tmp/bentoml
EXPOSE 3000
HEALTHCHECK --interval=15s --timeout=5s --start-period=90s --retries=3 \
    CMD ["/app/service/entrypoint.sh", "--healthcheck"]
# bentoml serve drains in-flight requests on SIGTERM; give it time: docker stop -t 30
STOPSIGNAL SIGTERM
ENTRYPOINT ["/app/service/entrypoint.sh"]
