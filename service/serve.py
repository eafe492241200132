"""Start the service: check the registry first, then hand over to ``bentoml serve``.

    python -m service.serve [--port 3000] [extra bentoml serve options]

A missing or corrupted artifact (sha256 differs from its card) ends start-up here with a one-line
reason and exit code 2, before any port is opened.
"""

from __future__ import annotations

import os
import shutil
import sys

from service.config import Settings
from service.registry import RegistryError, load_cards


def main(argv: list[str]) -> None:
    settings = Settings.from_env()
    try:
        cards = load_cards(settings.models_dir, settings.models, settings.backend, settings.default_model)
    except RegistryError as exc:
        print(f"imgclf: cannot start: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    served = ", ".join(f"{name} v{card['version']}" for name, card in cards.items())
    print(f"imgclf: serving {served} "
          f"from {settings.models_dir} ({settings.backend}, device {settings.device})", file=sys.stderr)
    if "--port" not in argv:
        argv = ["--port", os.environ.get("IMGCLF_PORT", "3000"), *argv]
    bentoml = shutil.which("bentoml", path=os.path.dirname(sys.executable)) or "bentoml"
    os.execv(bentoml, [bentoml, "serve", "service.service:ImageClassifier", *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
