"""The model card: one typed schema for ``models/<name>/card.json``, read and written only here.

    card = read_card(Path("models/cifar10"))      # validated; RegistryError says what is wrong
    card.input.size, card.classes, card.artifacts["onnx"].sha256, card.temperature
    write_card(folder, card.updated(version="...", parity={...}))

The fields every consumer relies on are typed attributes (name, version, classes, the input
contract, the artifacts, the architecture, test-time augmentation, calibration, the out-of-distribution
score's threshold (``ood``), metrics, the training record and the split it was measured on); the descriptive rest (``task``, ``output``,
``parity``, ``exported``, commands, ``quantization``, ...) is kept as read in :attr:`ModelCard.extra`,
so a card survives a read/write round trip key for key. Training writes cards, the service reads
them; neither spells a key of the file anywhere else.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

CARD_FILE = "card.json"


class RegistryError(RuntimeError):
    """The registry cannot be served as it is (missing file, hash mismatch, bad card)."""


@dataclass(frozen=True)
class InputSpec:
    """The card's ``input`` section: what a model expects, and so how every image is preprocessed
    (:mod:`service.preprocess` turns bytes into this; training builds its tensors the same way)."""

    size: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> "InputSpec":
        size, mean, std = spec.get("size"), spec.get("mean"), spec.get("std")
        if not (_numbers(size, 2, int) and all(v > 0 for v in size)):
            raise ValueError(f"input.size must be two positive integers (height, width), got {size!r}")
        if not _numbers(mean, 3, (int, float)) or not _numbers(std, 3, (int, float)) or min(std) <= 0:
            raise ValueError(f"input.mean and input.std must be three numbers (std > 0), got {mean!r}, {std!r}")
        return cls(size=(int(size[0]), int(size[1])), mean=tuple(float(v) for v in mean),
                   std=tuple(float(v) for v in std))

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": list(self.size),
            "channels": "RGB",
            "layout": "NCHW",
            "dtype": "float32",
            "resize": "shorter side to size (bilinear, antialiased), then centre crop",
            "scale": "pixel / 255",
            "mean": list(self.mean),
            "std": list(self.std),
        }


@dataclass(frozen=True)
class Artifact:
    """One file of a registry entry: its name in the entry's folder, sha256 and size."""

    file: str
    sha256: str
    bytes: int

    @classmethod
    def from_dict(cls, fmt: str, entry: Any) -> "Artifact":
        if not isinstance(entry, Mapping) or not isinstance(entry.get("file"), str) \
                or not isinstance(entry.get("sha256"), str) or len(entry["sha256"]) != 64:
            raise ValueError(f"artifacts.{fmt} needs a file name and a 64-hex sha256, got {entry!r}")
        name = entry["file"]
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise ValueError(f"artifacts.{fmt}.file must be a file name in the entry's folder, got {name!r}")
        return cls(file=name, sha256=entry["sha256"], bytes=int(entry.get("bytes", 0)))

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256, "bytes": self.bytes}


OOD_OUTPUTS = ("probabilities", "ood_score")  # the graph outputs of an entry with an ``ood`` section, in order


@dataclass(frozen=True)
class OODSpec:
    """The card's ``ood`` section: the out-of-distribution score the graphs return beside the
    probabilities (``ood_score``; higher = further from the training data) and the threshold an
    answer is judged by: ``in_distribution = ood_score <= threshold``. The rest of the section (the
    statistics' description, the split the threshold came from, the figures measured at export on
    the proxy sets) is kept as read, so the section survives a round trip key for key."""

    method: str
    threshold: float
    section: Mapping[str, Any]  # the whole section, as read or as export wrote it

    @classmethod
    def from_dict(cls, section: Any) -> "OODSpec":
        if not isinstance(section, Mapping):
            raise ValueError("ood must be an object")
        method, threshold = section.get("method"), section.get("threshold")
        if not isinstance(method, str) or not method:
            raise ValueError("ood.method must name the score")
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not math.isfinite(threshold):
            raise ValueError(f"ood.threshold must be a finite number, got {threshold!r}")
        outputs = section.get("outputs", {}).get("onnx", list(OOD_OUTPUTS)) \
            if isinstance(section.get("outputs", {}), Mapping) else None
        if outputs != list(OOD_OUTPUTS):
            raise ValueError(f"ood.outputs.onnx must be {list(OOD_OUTPUTS)}, got {outputs!r}")
        return cls(method=method, threshold=float(threshold), section=dict(section))

    def to_dict(self) -> dict[str, Any]:
        return {**self.section, "method": self.method, "threshold": self.threshold}


# The typed fields in the order a card is written; ``extra`` keys keep their place among them.
TYPED = ("name", "version", "classes", "input", "architecture", "metrics", "training", "split_spec",
         "artifacts", "test_time_augmentation", "calibration", "ood")
REQUIRED = ("name", "version", "classes", "input", "artifacts")


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: str  # first 12 hex digits of the ONNX artifact's sha256
    classes: tuple[str, ...]
    input: InputSpec
    artifacts: dict[str, Artifact]  # format (onnx | torchscript) -> file
    architecture: str | None = None  # training.nets name; None for an entry made from another (INT8)
    metrics: dict[str, Any] = field(default_factory=dict)  # test_accuracy, val_accuracy, ...
    training: dict[str, Any] = field(default_factory=dict)  # how the network was trained
    split_spec: dict[str, Any] | None = None  # what rebuilds the run's exact split (dataset, seed, ...)
    test_time_augmentation: dict[str, Any] | None = None  # the graph averages these views
    calibration: dict[str, Any] | None = None  # temperature scaling folded into the graphs
    ood: OODSpec | None = None  # the graphs also return an out-of-distribution score
    extra: dict[str, Any] = field(default_factory=dict)  # every other key, as read
    order: tuple[str, ...] = ()  # the keys in the order read (for a faithful rewrite)

    @property
    def dataset(self) -> str:
        """The dataset the model was trained on: its split spec's, else its training record's."""
        return (self.split_spec or self.training)["dataset"]

    # --- reading and writing --------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "card") -> "ModelCard":
        """Validate and type a card; raises :class:`RegistryError` naming ``where`` and the problem."""
        if not isinstance(data, Mapping):
            raise RegistryError(f"{where} is not a JSON object")
        for key in REQUIRED:
            if key not in data:
                raise RegistryError(f"{where} lacks {key!r}")
        try:
            for key in ("name", "version"):
                if not isinstance(data[key], str) or not data[key]:
                    raise ValueError(f"{key} must be a non-empty string")
            classes = data["classes"]
            if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes) \
                    or len(set(classes)) != len(classes):
                raise ValueError("classes must be a non-empty list of distinct names")
            if not isinstance(data["artifacts"], Mapping) or not data["artifacts"]:
                raise ValueError("artifacts must name at least one file")
            artifacts = {fmt: Artifact.from_dict(fmt, entry) for fmt, entry in data["artifacts"].items()}
            optional = {key: data.get(key) for key in ("metrics", "training", "split_spec",
                                                        "test_time_augmentation", "calibration")}
            for key, value in optional.items():
                if value is not None and not isinstance(value, Mapping):
                    raise ValueError(f"{key} must be an object")
            calibration = optional["calibration"]
            if calibration and not (isinstance(calibration.get("temperature"), (int, float))
                                    and calibration["temperature"] > 0):
                raise ValueError("calibration.temperature must be a positive number")
            architecture = data.get("architecture")
            if architecture is not None and not isinstance(architecture, str):
                raise ValueError("architecture must be a name")
            ood = OODSpec.from_dict(data["ood"]) if data.get("ood") is not None else None
            return cls(name=data["name"], version=data["version"], classes=tuple(classes),
                       input=InputSpec.from_dict(data["input"]) if isinstance(data["input"], Mapping)
                       else InputSpec.from_dict({}),
                       artifacts=artifacts, architecture=architecture,
                       metrics=dict(optional["metrics"] or {}), training=dict(optional["training"] or {}),
                       split_spec=optional["split_spec"], test_time_augmentation=optional["test_time_augmentation"],
                       calibration=calibration, ood=ood,
                       extra={k: v for k, v in data.items() if k not in TYPED},
                       order=tuple(data))
        except ValueError as exc:
            raise RegistryError(f"{where}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """The card as JSON-ready data, keys in the order read (new keys after them)."""
        typed = {"name": self.name, "version": self.version, "classes": list(self.classes),
                 "input": self.input.to_dict(), "architecture": self.architecture, "metrics": self.metrics,
                 "training": self.training, "split_spec": self.split_spec,
                 "artifacts": {fmt: a.to_dict() for fmt, a in self.artifacts.items()},
                 "test_time_augmentation": self.test_time_augmentation, "calibration": self.calibration,
                 "ood": self.ood.to_dict() if self.ood else None}
        # optional sections a card did not have stay absent
        absent = {key for key in ("architecture", "metrics", "training", "split_spec", "test_time_augmentation",
                                  "calibration", "ood") if key not in self.order and not typed[key]}
        merged = {**{k: v for k, v in typed.items() if k not in absent}, **self.extra}
        keys = [k for k in self.order if k in merged] + [k for k in TYPED if k in merged and k not in self.order] \
            + [k for k in merged if k not in self.order and k not in TYPED]
        return {k: merged[k] for k in keys}

    def updated(self, **changes: Any) -> "ModelCard":
        """A copy with ``changes``: typed fields by name, anything else into :attr:`extra` (a value of
        None removes an extra key)."""
        names = {f.name for f in dataclasses.fields(self)} - {"extra", "order"}
        extra = dict(self.extra)
        for key in [k for k in changes if k not in names]:
            value = changes.pop(key)
            if value is None:
                extra.pop(key, None)
            else:
                extra[key] = value
        return dataclasses.replace(self, extra=extra, **changes)

    # --- what consumers ask ---------------------------------------------------------------------

    @property
    def temperature(self) -> float:
        """The calibration temperature folded into the graphs (1.0: none)."""
        return float(self.calibration["temperature"]) if self.calibration else 1.0

    @property
    def tta_level(self) -> int:
        """The test-time augmentation the graphs average (0: none, 1: flip, 2: flip + translate)."""
        tta = self.test_time_augmentation
        return int(tta.get("level", 1)) if tta else 0

    def artifact(self, fmt: str) -> Artifact:
        if fmt not in self.artifacts:
            raise RegistryError(f"model {self.name!r} has no {fmt} artifact in its card")
        return self.artifacts[fmt]


def read_card(folder: Path) -> ModelCard:
    """``folder/card.json``, validated (:class:`RegistryError` says what is wrong)."""
    path = Path(folder) / CARD_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RegistryError(f"{folder}: no {CARD_FILE}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RegistryError(f"{path} cannot be read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{path} is not valid JSON: {exc}") from None
    return ModelCard.from_dict(data, str(path))


def write_card(folder: Path, card: ModelCard) -> Path:
    """Write ``folder/card.json`` atomically (a reader never sees half a card)."""
    path = Path(folder) / CARD_FILE
    tmp = path.with_name(f".{CARD_FILE}.tmp")
    tmp.write_text(json.dumps(card.to_dict(), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def _numbers(value: Any, count: int, kinds: type | tuple[type, ...]) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == count and \
        all(isinstance(v, kinds) and not isinstance(v, bool) for v in value)
