"""``python -m service.score``: see :mod:`service.score`."""

from service.score.cli import main

raise SystemExit(main())
