"""``python -m service.score``: see :mod:`service.score`."""

from service.score.cli import main

# the usage line keeps the name it has always had (python -m service.score ran service/score.py)
raise SystemExit(main(prog="score.py"))
