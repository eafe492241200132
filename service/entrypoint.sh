#!/bin/sh
# Container entry point (Dockerfile) and the same start command outside Docker (tests run it).
# Checks the model registry, then execs `bentoml serve`; extra arguments go to bentoml serve.
# `entrypoint.sh --healthcheck` is the image's HEALTHCHECK: exit 0 when /readyz answers 200 on
# IMGCLF_PORT (no curl in the image: the service's own Python asks).
set -eu
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--healthcheck" ]; then
    exec python -c 'import os, urllib.request
urllib.request.urlopen("http://127.0.0.1:%s/readyz" % (os.environ.get("IMGCLF_PORT") or "3000"), timeout=4)'
fi
exec python -m service.serve --host "${IMGCLF_HOST:-0.0.0.0}" "$@"
