#!/bin/sh
# Container entry point (Dockerfile) and the same start command outside Docker (tests run it).
# Checks the model registry, then execs `bentoml serve`; extra arguments go to bentoml serve.
set -eu
cd "$(dirname "$0")/.."
exec python -m service.serve --host "${IMGCLF_HOST:-0.0.0.0}" "$@"
