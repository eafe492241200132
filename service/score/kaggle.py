"""The cats-vs-dogs competition's submission format: ``id,label``, label = probability of dog."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

from service.card import ModelCard
from service.score.errors import ScoreError


def kaggle_id(relative: str) -> int | str:
    stem = Path(relative).stem
    return int(stem) if stem.isdigit() else stem


def check_kaggle_model(card: ModelCard, model: str) -> None:
    """A submission is the probability of ``dog``: the model needs that class."""
    if "dog" not in card.classes:
        raise ScoreError(f"--kaggle needs a model with a 'dog' class; {model} has {list(card.classes)}")


def check_kaggle_ids(names: Sequence[str]) -> None:
    """Refuse a layout whose files would share an id (``cat/0.jpg`` and ``dog/0.jpg`` are both id 0):
    a submission with repeated ids is wrong, and inventing ids would be wrong too."""
    seen: dict[int | str, str] = {}
    clashes: list[tuple[str, str, int | str]] = []
    for name in names:
        key = kaggle_id(name)
        if key in seen:
            clashes.append((seen[key], name, key))
        else:
            seen[key] = name
    if clashes:
        first, second, key = clashes[0]
        raise ScoreError(f"--kaggle needs one file per id, but {first} and {second} are both id {key!r} "
                         f"({len(clashes)} files repeat an id); score a flat folder such as Kaggle's test1/, "
                         "or drop --kaggle")


def kaggle_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The seed competition's submission: ``id,label`` with label = probability of dog."""
    out = [{"id": kaggle_id(r["path"]), "label": r["p_dog"]} for r in rows]
    return sorted(out, key=lambda r: (isinstance(r["id"], str), r["id"]))
