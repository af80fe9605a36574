"""Calibration on the validation cases: the operating threshold and the per-combination expectations.

* Threshold, chosen on the validation cases predicted with every role the model takes present; predicted
  positive means ``probability >= threshold``. ``rule``:

  - ``"lesion-froc"`` (the default since issue #17): over the patients' whole maps, the threshold of highest
    pooled lesion sensitivity (26-connected GT lesions hit) whose false positives (>= 10 mm^3) stay within
    0.5 per patient, ties to the best mean per-patient Dice (:func:`training.metrics.operating.lesion_froc_point`);
  - ``"youden"``: the maximum Youden index (sensitivity + specificity - 1) of the voxel-wise ROC pooled over the
    cases inside their brain masks (the method spec; the paper's ILD threshold was 0.76). With ~1000
    background voxels per lesion voxel it sits at a very low probability for a soft model (see
    ``docs/physicist.md``). It is computed and stored (``CheckpointMeta.youden_threshold``) whatever the rule;
  - ``"max-dice"``: the threshold of maximum pooled Dice on the same voxels.
* For each of the model's role combinations (15 for the four-role ILD model; one for a baseline), at that
  threshold: mean per-patient voxel AUC (in the brain mask) and Dice, and the pooled lesion sensitivity (GT
  lesions hit / GT lesions, 26-connected). These go into the checkpoint (``CheckpointMeta.validation``) so that
  every result can say how well the model is expected to do with the sequences it was given.
* Predictions are made by :func:`pipeline.inference.predict_probability` on the cached model-grid volumes:
  the inference code itself.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from pydicom.uid import generate_uid
from tqdm import tqdm

from pipeline.checkpoint import CheckpointMeta, save_checkpoint
from pipeline.inference import predict_probability
from pipeline.model import ILDDeepLabV3, combination_key
from pipeline.preprocess import NORMALISATION_NAME, NORMALISATION_VERSION
from training.data.cache import CachedCase, GridSettings
from training.metrics import PatientMetrics, confusion, evaluate_patient, max_dice_threshold, summarise, youden_threshold
from training.metrics.operating import FROC_MAX_FP_PER_PATIENT, OperatingPoint, lesion_froc_point, sweep

#: Voxel rules: (pooled brain-mask scores, labels) -> (threshold, sensitivity, specificity).
_VOXEL_RULES = {"youden": youden_threshold, "max-dice": max_dice_threshold}
#: Every rule ``calibrate`` takes; the lesion-wise one needs the whole maps (:func:`choose_threshold`).
_RULES = (*_VOXEL_RULES, "lesion-froc")

__all__ = ["Calibration", "ThresholdChoice", "calibrate", "calibrate_and_save", "choose_threshold", "combinations",
           "evaluate_cases", "full_role_maps", "model_combinations", "pooled_threshold", "predict_case"]


def combinations(roles: Sequence[str]) -> list[tuple[str, ...]]:
    """Every non-empty subset of ``roles`` (kept in their order), largest first: 15 for four roles."""
    return [c for k in range(len(roles), 0, -1) for c in itertools.combinations(roles, k)]


def model_combinations(model: ILDDeepLabV3) -> list[tuple[str, ...]]:
    """The role combinations ``model`` can be run on: every subset for an ILD model, only all of its roles for a
    baseline (trained without input-level dropout, it refuses missing roles)."""
    roles = tuple(model.config.roles)
    return combinations(roles) if model.config.ild else [roles]


def predict_case(model: ILDDeepLabV3, case: CachedCase, roles: Sequence[str], device: torch.device | str = "cpu",
                 threads: int | None = None) -> np.ndarray:
    """Probability (float32, model grid) for ``case`` given only ``roles``; on ``threads`` CPU threads (default: the
    process's current torch setting, e.g. the trainer's ``recipe.threads``, not every core)."""
    # the model's own role order (a baseline takes three of the four): ``prepared`` alone lists all four
    prepared = replace(case.prepared(roles, model.config.slices_per_role), roles=tuple(model.config.roles))
    return predict_probability(model, prepared, device=device, threads=threads or torch.get_num_threads())


@dataclass(frozen=True)
class ThresholdChoice:
    """A rule's threshold with its pooled brain-mask voxel sensitivity and specificity, the Youden point (the
    method's, kept for comparison whatever the rule) and, for ``"lesion-froc"``, the sweep it chose from."""

    rule: str
    threshold: float
    sensitivity: float
    specificity: float
    youden_threshold: float
    sweep: tuple[OperatingPoint, ...] = ()


@dataclass(frozen=True)
class Calibration:
    threshold: float
    sensitivity: float
    specificity: float
    per_combination: dict[str, list[PatientMetrics]]
    rule: str
    youden_threshold: float  # the method's rule on the same cases, for comparison
    sweep: tuple[OperatingPoint, ...] = ()

    def validation_table(self) -> dict[str, dict[str, float]]:
        """``CheckpointMeta.validation``: per combination mean AUC, mean Dice and pooled lesion sensitivity."""
        out = {}
        for key, patients in self.per_combination.items():
            s = summarise(patients)
            entry = {"auc": s["auc"]["mean"], "dice": s["dice"]["mean"],
                     "lesion_sensitivity": s["pooled_lesion_sensitivity"]}
            out[key] = {k: float(v) for k, v in entry.items() if np.isfinite(v)}
        return out


def evaluate_cases(model: ILDDeepLabV3, cases: Sequence[CachedCase], threshold: float,
                   combos: Sequence[Sequence[str]], *, device: torch.device | str = "cpu", progress: bool = True,
                   desc: str = "evaluate") -> Iterator[tuple[str, PatientMetrics, np.ndarray]]:
    """Per combination and case (cases lacking one of the combination's roles are skipped): the key, the
    patient's metrics at ``threshold``, and the probability map."""
    jobs = [(c, case) for c in combos for case in cases if all(case.volumes.get(r) is not None for r in c)]
    for combo, case in tqdm(jobs, desc=desc, unit="case", disable=not progress):
        prob = predict_case(model, case, combo, device)
        yield combination_key(combo), evaluate_patient(prob, np.asarray(case.label) > 0, np.asarray(case.brain) > 0,
                                                       case.spacing_mm, threshold, case_id=case.case_id), prob


def full_role_maps(model: ILDDeepLabV3, cases: Sequence[CachedCase], *, device: torch.device | str = "cpu",
                   progress: bool = True) -> list[tuple[CachedCase, np.ndarray]]:
    """(case, probability map) of every case that has all the roles the model takes, predicted with all of them."""
    roles = tuple(model.config.roles)
    full = [c for c in cases if all(c.volumes.get(r) is not None for r in roles)]
    if not full:
        raise ValueError(f"no validation case has every role the model takes ({list(roles)})")
    return [(case, predict_case(model, case, roles, device))
            for case in tqdm(full, desc="threshold", unit="case", disable=not progress)]


def choose_threshold(maps: Sequence[tuple[CachedCase, np.ndarray]], rule: str) -> ThresholdChoice:
    """``rule``'s threshold on ``maps`` (:func:`full_role_maps`); see the module doc for the rules."""
    if rule not in _RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; expected one of {list(_RULES)}")
    brains = [np.asarray(case.brain) > 0 for case, _ in maps]
    scores = np.concatenate([prob[b] for (_, prob), b in zip(maps, brains)])
    labels = np.concatenate([np.asarray(case.label)[b] > 0 for (case, _), b in zip(maps, brains)])
    youden = youden_threshold(scores, labels)[0]
    if rule in _VOXEL_RULES:
        threshold, sens, spec = _VOXEL_RULES[rule](scores, labels)
        return ThresholdChoice(rule, float(threshold), float(sens), float(spec), float(youden))
    points = tuple(sweep([(prob, case.label, case.spacing_mm) for case, prob in maps]))
    threshold = lesion_froc_point(points).threshold
    counts = confusion(scores >= np.asarray(threshold, dtype=scores.dtype), labels)
    return ThresholdChoice(rule, threshold, counts.sensitivity, counts.specificity, float(youden), points)


def pooled_threshold(model: ILDDeepLabV3, cases: Sequence[CachedCase], *, rule: str = "youden",
                     device: torch.device | str = "cpu", progress: bool = True) -> tuple[float, float, float]:
    """(threshold, sensitivity, specificity) of ``rule`` on ``cases`` predicted with every role the model takes
    (cases lacking one are left out); sensitivity and specificity of the brain-mask voxels pooled."""
    c = choose_threshold(full_role_maps(model, cases, device=device, progress=progress), rule)
    return c.threshold, c.sensitivity, c.specificity


def calibrate(model: ILDDeepLabV3, cases: Sequence[CachedCase], *, device: torch.device | str = "cpu",
              progress: bool = True, rule: str = "lesion-froc") -> Calibration:
    """Threshold (``rule``, see the module doc), the Youden point and the per-combination figures on ``cases``
    (validation)."""
    if rule not in _RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; expected one of {list(_RULES)}")
    choice = choose_threshold(full_role_maps(model, cases, device=device, progress=progress), rule)
    per: dict[str, list[PatientMetrics]] = {}
    for key, metrics, _ in evaluate_cases(model, cases, choice.threshold, model_combinations(model), device=device,
                                          progress=progress, desc="combinations"):
        per.setdefault(key, []).append(metrics)
    return Calibration(threshold=choice.threshold, sensitivity=float(choice.sensitivity),
                       specificity=float(choice.specificity), per_combination=per, rule=rule,
                       youden_threshold=choice.youden_threshold, sweep=choice.sweep)


def calibrate_and_save(model: ILDDeepLabV3, cases: Sequence[CachedCase], path: Path, *, name: str, version: str,
                       training_data: str, run_uid: str | None = None, grid: GridSettings = GridSettings(),
                       report_path: Path | None = None, device: torch.device | str = "cpu", progress: bool = True,
                       rule: str = "lesion-froc") -> CheckpointMeta:
    """:func:`calibrate`, then write the checkpoint (threshold, its rule, the Youden point and the validation table
    in its metadata)
    and, when ``report_path`` is given, a JSON report with every patient's figures. ``grid`` is the model grid the
    cases were prepared on (recorded in the checkpoint)."""
    cal = calibrate(model, cases, device=device, progress=progress, rule=rule)
    # the threshold must lie strictly inside (0, 1) for the checkpoint (a degenerate model could give 1.0)
    threshold, youden = (float(np.clip(t, 1e-6, 1 - 1e-6)) for t in (cal.threshold, cal.youden_threshold))
    meta = CheckpointMeta(model_name=name, model_version=version, threshold=threshold,
                          normalisation=NORMALISATION_NAME, normalisation_version=NORMALISATION_VERSION,
                          training_data=training_data, validation=cal.validation_table(),
                          training_run_uid=run_uid or str(generate_uid()), in_plane_size=grid.size,
                          through_plane_mm=grid.through_plane_mm, threshold_rule=rule, youden_threshold=youden)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, model.to("cpu"), meta)
    if report_path is not None:
        report = {"threshold": threshold, "threshold_rule": rule, "youden_threshold": youden,
                  "sensitivity": cal.sensitivity, "specificity": cal.specificity, "validation": cal.validation_table(),
                  "patients": {k: [m.to_dict() for m in v] for k, v in cal.per_combination.items()},
                  "summary": {k: summarise(v) for k, v in cal.per_combination.items()}}
        if cal.sweep:  # the lesion-wise rule's curve, all roles given: what it chose from
            report["max_fp_10_per_patient"] = FROC_MAX_FP_PER_PATIENT
            report["sweep"] = [p.to_dict() for p in cal.sweep]
        report_path.write_text(json.dumps(report, indent=1, default=float))
    return meta
