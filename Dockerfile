# GPU image for the classifier service. Build and run (from the repository root):
#   docker build -t image-classifier .
#   docker run --gpus all -p 3000:3000 image-classifier
# Mount another registry instead of the baked-in models:  -v /path/models:/app/models:ro
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /app
COPY requirements.lock requirements-serve.txt ./
RUN pip install -r requirements-serve.txt -c requirements.lock

COPY service/ service/
COPY models/ models/
RUN useradd --uid 10001 --no-create-home --home-dir /app app \
    && chmod 0755 service/entrypoint.sh

USER 10001
ENV IMGCLF_MODELS_DIR=/app/models \
    IMGCLF_DEVICE=auto \
    IMGCLF_PORT=3000 \
    BENTOML_HOME=/tmp/bentoml
EXPOSE 3000
HEALTHCHECK --interval=15s --timeout=3s --start-period=90s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:3000/readyz"]
# bentoml serve drains in-flight requests on SIGTERM; give it time: docker stop -t 30
STOPSIGNAL SIGTERM
ENTRYPOINT ["/app/service/entrypoint.sh"]
