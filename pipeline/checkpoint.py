"""Model checkpoint: one safetensors file holding the weights and, in its header, JSON metadata.

Layout: a standard safetensors file (no pickle anywhere: loading cannot execute code). The header's
``__metadata__`` has a single key, :data:`METADATA_KEY`, whose value is a JSON object::

    {"format_version": 1,
     "architecture": {...ModelConfig.to_dict()...},
     "roles": [...], "slices_per_role": 5,          # duplicated from the architecture for readers
     "meta": {...CheckpointMeta fields...}}

Loading checks the metadata against this code and raises :class:`CheckpointError` with a one-line
message ``"<file>: <field>: <reason>"`` on the first mismatch: format version, unknown or missing
architecture keys, a role order other than :data:`pipeline.model.ROLE_ORDER`, weights that do not
fit the architecture, a missing or invalid threshold, missing or unknown metadata fields.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydicom.uid import generate_uid
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pipeline.model import ROLE_ORDER, ILDDeepLabV3, ModelConfig, combination_key

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "METADATA_KEY",
    "THRESHOLD_CHOICES",
    "THRESHOLD_RULES",
    "VALIDATION_METRICS",
    "CheckpointError",
    "CheckpointMeta",
    "load_checkpoint",
    "read_checkpoint_metadata",
    "save_checkpoint",
    "select_threshold",
]

CHECKPOINT_FORMAT_VERSION = 1
METADATA_KEY = "ild_checkpoint"
#: Allowed keys of each per-combination validation entry.
VALIDATION_METRICS: tuple[str, ...] = ("auc", "dice", "lesion_sensitivity")
#: Ways the operating threshold may have been chosen (``CheckpointMeta.threshold_rule``): on the validation
#: cases, "lesion-froc" = highest lesion sensitivity with <= 0.5 false positives (>= 10 mm^3) per patient, ties to
#: the best mean Dice; "youden" = maximum Youden index of the pooled voxel ROC (the method's rule); "max-dice" =
#: maximum pooled voxel Dice (see ``training/calibrate.py``).
THRESHOLD_RULES: tuple[str, ...] = ("lesion-froc", "youden", "max-dice")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used with this code; ``str()`` is one line naming file and field."""

    def __init__(self, path: str | os.PathLike[str], field_name: str, reason: str):
        self.path = str(path)
        self.field = field_name
        self.reason = reason
        super().__init__(f"{self.path}: {field_name}: {reason}".replace("\n", " "))


def _utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()


@dataclass(frozen=True)
class CheckpointMeta:
    """Everything about a trained model except its architecture (which the model's config carries).

    ``threshold``: operating threshold on the sigmoid output, in (0, 1), chosen on the validation cases by
    ``threshold_rule`` (:data:`THRESHOLD_RULES`).
    ``youden_threshold``: the method's validation Youden point, kept for comparison and for readers who select it
    (``dicom-node validate --threshold youden``); None in checkpoints written before it was recorded.
    ``training_run_uid``: changes with every training run (a fresh DICOM UID by default).
    ``in_plane_size`` / ``through_plane_mm``: the grid the model was trained on (256 px, 1.0 mm).
    ``validation``: per role combination (:func:`pipeline.model.combination_key`) the validation
    figures when known, e.g. ``{"t1_cube_pre+t1_cube_post+flair": {"auc": 0.98, "dice": 0.79,
    "lesion_sensitivity": 0.83}}``; each metric is optional.
    """

    model_name: str
    model_version: str
    threshold: float
    normalisation: str
    normalisation_version: str
    training_data: str
    training_run_uid: str = field(default_factory=lambda: str(generate_uid()))
    in_plane_size: int = 256
    through_plane_mm: float = 1.0
    validation: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    created_utc: str = field(default_factory=_utc_now)
    #: how ``threshold`` was chosen on the validation cases (:data:`THRESHOLD_RULES`); "youden" in older files
    threshold_rule: str = "youden"
    youden_threshold: float | None = None

    def __post_init__(self) -> None:
        # raises ValueError naming the field; load_checkpoint turns it into a CheckpointError
        for name in ("model_name", "model_version", "normalisation", "normalisation_version", "training_run_uid", "created_utc"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v:
                raise _FieldError(name, f"must be a non-empty string, got {v!r}")
        if not isinstance(self.training_data, str):
            raise _FieldError("training_data", f"must be a string, got {self.training_data!r}")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0.0 < float(t) < 1.0):
            raise _FieldError("threshold", f"must be a number in (0, 1), got {t!r}")
        object.__setattr__(self, "threshold", float(t))
        y = self.youden_threshold
        if y is not None:
            if isinstance(y, bool) or not isinstance(y, (int, float)) or not (0.0 < float(y) < 1.0):
                raise _FieldError("youden_threshold", f"must be a number in (0, 1) or null, got {y!r}")
            object.__setattr__(self, "youden_threshold", float(y))
        if isinstance(self.in_plane_size, bool) or not isinstance(self.in_plane_size, int) or self.in_plane_size < 1:
            raise _FieldError("in_plane_size", f"must be a positive int, got {self.in_plane_size!r}")
        mm = self.through_plane_mm
        if isinstance(mm, bool) or not isinstance(mm, (int, float)) or not (float(mm) > 0 and math.isfinite(mm)):
            raise _FieldError("through_plane_mm", f"must be a positive number, got {mm!r}")
        object.__setattr__(self, "through_plane_mm", float(mm))
        object.__setattr__(self, "validation", _check_validation(self.validation))
        if self.threshold_rule not in THRESHOLD_RULES:
            raise _FieldError("threshold_rule", f"must be one of {list(THRESHOLD_RULES)}, got {self.threshold_rule!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["validation"] = {k: dict(v) for k, v in self.validation.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CheckpointMeta:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise _FieldError(f"meta.{unknown[0]}", "unknown metadata field")
        for f in dataclasses.fields(cls):
            if f.name not in d and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise _FieldError(f.name, "missing")
        for name in ("training_run_uid", "created_utc"):  # must travel with the file, never be re-generated
            if name not in d:
                raise _FieldError(name, "missing")
        return cls(**dict(d))


class _FieldError(ValueError):
    def __init__(self, field_name: str, reason: str):
        self.field = field_name
        self.reason = reason
        super().__init__(f"{field_name}: {reason}")


def _check_validation(validation: Any) -> dict[str, dict[str, float]]:
    if not isinstance(validation, Mapping):
        raise _FieldError("validation", f"must be a mapping, got {type(validation).__name__}")
    out: dict[str, dict[str, float]] = {}
    for key, metrics in validation.items():
        try:
            canonical = combination_key(str(key).split("+"))
        except ValueError as exc:
            raise _FieldError(f"validation[{key!r}]", str(exc)) from None
        if canonical != key:
            raise _FieldError(f"validation[{key!r}]", f"not a canonical combination key (expected {canonical!r})")
        if not isinstance(metrics, Mapping):
            raise _FieldError(f"validation[{key!r}]", "must map metric names to numbers")
        entry: dict[str, float] = {}
        for m, v in metrics.items():
            if m not in VALIDATION_METRICS:
                raise _FieldError(f"validation[{key!r}].{m}", f"unknown metric; known: {list(VALIDATION_METRICS)}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 <= float(v) <= 1.0):
                raise _FieldError(f"validation[{key!r}].{m}", f"must be a number in [0, 1], got {v!r}")
            entry[m] = float(v)
        out[key] = entry
    return out


#: What a reader may run a checkpoint at (node ``model.threshold``, ``dicom-node validate --threshold``): "stored" =
#: ``threshold`` (its ``threshold_rule``), "youden" = ``youden_threshold`` (the method's rule, for comparison).
THRESHOLD_CHOICES: tuple[str, ...] = ("stored", "youden")


def select_threshold(meta: CheckpointMeta, choice: str) -> CheckpointMeta:
    """``meta`` with the operating threshold ``choice`` (:data:`THRESHOLD_CHOICES`) in ``threshold`` and the rule
    that chose it in ``threshold_rule``, so every result (summary.json, SEG, SR) names what was used.
    ``ValueError`` for an unknown choice or "youden" on a checkpoint that does not record its Youden point."""
    if choice == "stored":
        return meta
    if choice != "youden":
        raise ValueError(f"threshold: expected one of {list(THRESHOLD_CHOICES)}, got {choice!r}")
    if meta.youden_threshold is None:
        raise ValueError("threshold: youden: this checkpoint does not record its Youden point (calibrate it again "
                         "with `dicom-node calibrate`)")
    return dataclasses.replace(meta, threshold=meta.youden_threshold, threshold_rule="youden")


def save_checkpoint(path: str | os.PathLike[str], model: ILDDeepLabV3, meta: CheckpointMeta) -> Path:
    """Write ``model``'s weights and ``meta`` to ``path`` (safetensors; written atomically)."""
    path = Path(path)
    cfg = model.config
    unknown = sorted({r for k in meta.validation for r in k.split("+")} - set(cfg.roles))
    if unknown:
        raise ValueError(f"validation: combination uses role(s) {unknown} that the model does not take")
    header = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "architecture": cfg.to_dict(),
        "roles": list(cfg.roles),
        "slices_per_role": cfg.slices_per_role,
        "meta": meta.to_dict(),
    }
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(header, sort_keys=True)})
    os.replace(tmp, path)
    return path


def read_checkpoint_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The raw JSON metadata of a checkpoint (no weights read, no checks beyond parsing)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(path, "file", f"not a readable safetensors checkpoint ({exc})") from None
    if raw is None:
        raise CheckpointError(path, "metadata", f"no {METADATA_KEY!r} entry in the safetensors header")
    try:
        header = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(path, "metadata", f"invalid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "metadata", "not a JSON object")
    return header


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    expected_format_version: int = CHECKPOINT_FORMAT_VERSION,
    map_location: str | torch.device = "cpu",
) -> tuple[ILDDeepLabV3, CheckpointMeta]:
    """Rebuild the model (in eval mode) and its metadata; :class:`CheckpointError` on any mismatch."""
    header = read_checkpoint_metadata(path)

    version = header.get("format_version")
    if version != expected_format_version:
        raise CheckpointError(path, "format_version", f"is {version!r}, this code reads {expected_format_version}")

    arch = header.get("architecture")
    if not isinstance(arch, dict):
        raise CheckpointError(path, "architecture", "missing or not an object")
    known = set(ModelConfig.field_names())
    for key in sorted(arch):
        if key not in known:
            raise CheckpointError(path, f"architecture.{key}", "unknown architecture key for this code")
    for key in ModelConfig.field_names():
        if key not in arch:
            raise CheckpointError(path, f"architecture.{key}", "missing")

    roles = arch["roles"]
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise CheckpointError(path, "roles", f"must be a list of role names, got {roles!r}")
    expected_order = [r for r in ROLE_ORDER if r in roles]
    if any(r not in ROLE_ORDER for r in roles) or roles != expected_order or len(set(roles)) != len(roles):
        raise CheckpointError(path, "roles", f"{roles} does not follow this code's role order {list(ROLE_ORDER)}")
    if header.get("roles") != roles:
        raise CheckpointError(path, "roles", f"header roles {header.get('roles')!r} differ from architecture roles {roles}")
    if header.get("slices_per_role") != arch["slices_per_role"]:
        raise CheckpointError(path, "slices_per_role", "header and architecture disagree")

    try:
        config = ModelConfig.from_dict(arch)
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        name = msg.split(":", 1)[0] if ":" in msg else "?"
        raise CheckpointError(path, f"architecture.{name}", msg) from None

    meta_raw = header.get("meta")
    if not isinstance(meta_raw, dict):
        raise CheckpointError(path, "meta", "missing or not an object")
    if "threshold" not in meta_raw:
        raise CheckpointError(path, "threshold", "missing (the operating threshold travels with the weights)")
    try:
        meta = CheckpointMeta.from_dict(meta_raw)
    except _FieldError as exc:
        raise CheckpointError(path, exc.field, exc.reason) from None
    except TypeError as exc:
        raise CheckpointError(path, "meta", str(exc)) from None
    stray = sorted({r for k in meta.validation for r in k.split("+")} - set(config.roles))
    if stray:
        raise CheckpointError(path, "validation", f"combination uses role(s) {stray} that the model does not take")

    model = ILDDeepLabV3(config)
    expected = model.state_dict()
    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as f:
            names = set(f.keys())
            missing = sorted(set(expected) - names)
            if missing:
                raise CheckpointError(path, "weights", f"missing tensor {missing[0]!r} ({len(missing)} missing)")
            extra = sorted(names - set(expected))
            if extra:
                raise CheckpointError(path, "weights", f"unexpected tensor {extra[0]!r} ({len(extra)} unexpected)")
            state = {}
            for k in expected:
                t = f.get_tensor(k)
                if tuple(t.shape) != tuple(expected[k].shape) or t.dtype != expected[k].dtype:
                    raise CheckpointError(
                        path,
                        "weights",
                        f"tensor {k!r} is {t.dtype} {tuple(t.shape)}, the architecture needs "
                        f"{expected[k].dtype} {tuple(expected[k].shape)}",
                    )
                state[k] = t
    except SafetensorError as exc:
        raise CheckpointError(path, "weights", f"unreadable ({exc})") from None
    model.load_state_dict(state, strict=True)
    model.to(map_location)
    model.eval()
    return model, meta
