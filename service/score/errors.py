"""How a scoring run fails: :class:`ScoreError`, which the command prints as one ``error:`` line."""

from __future__ import annotations


class ScoreError(RuntimeError):
    """A run that cannot start or go on; the command prints it as one ``error:`` line."""
