"""The whole validation: which role combinations each model is run on, predictions through the cache, the
evaluation, the comparison and the document that ``metrics.json`` holds (everything the reports show).

Role combinations (``mode``):

* ``as-acquired`` (default): each case with the roles it actually has among those the model takes, as the
  node would run it; a baseline (no input-level dropout) only on the cases that have all of its roles;
* ``roles``: the given subset for every case (cases lacking one of its roles are skipped and listed);
* ``all``: every combination the model can run (:func:`training.calibrate.model_combinations`: 15 for a
  four-role ILD model, one for a baseline).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from dicom_node import __version__
from pipeline.checkpoint import CheckpointMeta
from pipeline.model import ILDDeepLabV3, combination_key
from pipeline.roles import ROLES
from pipeline.study import StudySettings, algorithm_info
from training.calibrate import model_combinations
from training.data.cache import CachedCase
from training.metrics import COUNT_GROUPS, count_group, summarise
from training.validate.compare import compare_models
from training.validate.evaluate import (
    FROC_THRESHOLDS,
    CaseEvaluation,
    evaluate_case,
    summarise_group,
)
from training.validate.predictions import PredictionCache

__all__ = ["AS_ACQUIRED", "N_WORST", "Mode", "ModelRun", "Validation", "describe_dataset", "plan",
           "primary_combination", "validate"]

Mode = Literal["as-acquired", "roles", "all"]
AS_ACQUIRED = "as-acquired"
N_WORST = 5  # cases in the report's worst-case table


def primary_combination(model: dict[str, Any]) -> str:
    """The combination a model (its ``metrics.json`` entry) is summarised by: its only one, else all of its roles
    (``all`` mode)."""
    keys = list(model["combinations"])
    full = combination_key(model["roles"])
    return full if full in keys else keys[0]


@dataclass
class ModelRun:
    """A model under validation: ``label`` "model" or "baseline"; ``threshold`` the operating threshold used
    and ``threshold_source`` where it came from (checkpoint, --threshold, or calibrated on a folder). Its device
    UID is the one the node writes into every SEG and SR made with it (:func:`pipeline.study.algorithm_info`)."""

    label: str
    path: Path
    net: ILDDeepLabV3
    meta: CheckpointMeta
    threshold: float
    threshold_source: str
    cache: PredictionCache

    def describe(self) -> dict[str, Any]:
        return {"file": self.path.name, "sha256_16": self.cache.folder.name, "name": self.meta.model_name,
                "version": self.meta.model_version, "device_uid": algorithm_info(self.meta, StudySettings()).device_uid,
                "kind": "ILD" if self.net.config.ild else "baseline", "roles": list(self.net.config.roles),
                "threshold": self.threshold, "threshold_source": self.threshold_source,
                "checkpoint_threshold": self.meta.threshold, "checkpoint_threshold_rule": self.meta.threshold_rule,
                "checkpoint_youden_threshold": self.meta.youden_threshold,
                "training_data": self.meta.training_data}


@dataclass
class Validation:
    """The outcome: ``doc`` (the ``metrics.json`` document) and every case evaluation."""

    doc: dict[str, Any]
    evaluations: list[CaseEvaluation] = field(default_factory=list)


def plan(net: ILDDeepLabV3, cases: Sequence[CachedCase], mode: Mode, roles: Sequence[str] = ()
         ) -> tuple[list[tuple[str, tuple[str, ...], CachedCase]], list[dict[str, str]]]:
    """(jobs as (combination label, roles given, case), skipped as {case_id, combination, reason})."""
    takes = tuple(net.config.roles)
    if mode == "as-acquired":
        wanted: list[tuple[str, tuple[str, ...] | None]] = [(AS_ACQUIRED, None)]
    elif mode == "roles":
        wanted = [(combination_key(roles), tuple(r for r in ROLES if r in roles))]
    else:
        wanted = [(combination_key(c), tuple(c)) for c in model_combinations(net)]
    jobs, skipped = [], []
    for label, combo in wanted:
        for case in cases:
            given = tuple(r for r in takes if r in (case.roles_present if combo is None else combo))
            missing = [r for r in given if r not in case.roles_present]
            lacking = [] if net.config.ild else [r for r in takes if r not in given]
            if missing or not given or lacking:
                reason = (f"lacks {missing}" if missing else "has none of the model's roles" if not given
                          else f"the baseline needs {lacking}")
                skipped.append({"case_id": case.case_id, "combination": label, "reason": reason})
            else:
                jobs.append((label, given, case))
    return jobs, skipped


def describe_dataset(cases: Sequence[CachedCase], folder: str, kind: str) -> dict[str, Any]:
    """Folder name, layout, number of cases and GT lesions, cases per role and per lesion-count group."""
    return {"folder": folder, "kind": kind, "n_cases": len(cases),
            "n_lesions": sum(c.n_lesions for c in cases),
            "roles_present": {r: sum(r in c.roles_present for c in cases) for r in ROLES},
            "count_groups": {g: sum(count_group(c.n_lesions) == g for c in cases) for g in ("0", *COUNT_GROUPS)}}


def validate(runs: Sequence[ModelRun], cases: Sequence[CachedCase], *, mode: Mode = "as-acquired",
             roles: Sequence[str] = (), dataset: dict[str, Any], bootstrap: int = 1000, seed: int = 0,
             device: torch.device | str = "cpu", progress: bool = True) -> Validation:
    """Predict (through each run's cache), evaluate and summarise; with two runs, compare them on every
    combination both have (with ``all``: the baseline's roles); list the first run's worst cases (lowest Dice)."""
    evaluations: list[CaseEvaluation] = []
    models: dict[str, Any] = {}
    for run in runs:
        jobs, skipped = plan(run.net, cases, mode, roles)
        evals = []
        for label, given, case in tqdm(jobs, desc=run.meta.model_name, unit="case", disable=not progress):
            prob = run.cache.get(run.net, case, given, device)
            froc = run.cache.load_froc(case, given, FROC_THRESHOLDS)
            evals.append(evaluate_case(prob, case, run.threshold, model=run.label, combination=label,
                                       roles=given, froc=froc))
            if froc is None:
                run.cache.store_froc(case, given, FROC_THRESHOLDS, evals[-1].froc)
        evaluations += evals
        combos: dict[str, Any] = {}
        for label in dict.fromkeys(e.combination for e in evals):
            group = [e for e in evals if e.combination == label]
            combos[label] = summarise_group(group, bootstrap=bootstrap, seed=seed)
        by_roles = {}
        if mode == "as-acquired":
            for key in dict.fromkeys(combination_key(e.roles) for e in evals):
                by_roles[key] = summarise([e.metrics for e in evals if combination_key(e.roles) == key])
        models[run.label] = {**run.describe(), "combinations": combos, "by_roles": by_roles, "skipped": skipped,
                             "inferred": run.cache.n_inferred}
    doc: dict[str, Any] = {
        "software": {"name": "dicom-node", "version": __version__},
        "date_utc": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "mode": mode, "roles": list(roles), "bootstrap": bootstrap, "seed": seed, "dataset": dataset,
        "models": models, "comparison": {}, "worst_cases": []}
    first = models[runs[0].label]
    if first["combinations"]:
        key = primary_combination(first)
        ranked = sorted((e for e in evaluations if e.model == runs[0].label and e.combination == key),
                        key=lambda e: (e.metrics.dice, -e.metrics.fp))
        doc["worst_cases"] = [{"model": e.model, "combination": key, "roles": list(e.roles), **e.metrics.to_dict()}
                              for e in ranked[:N_WORST]]
    if len(runs) == 2:
        a, b = runs[0].label, runs[1].label
        # a baseline's one combination (its roles) has the same key as the ILD model's matching one
        for label in (k for k in models[b]["combinations"] if k in models[a]["combinations"]):
            ma = [e.metrics for e in evaluations if e.model == a and e.combination == label]
            mb = [e.metrics for e in evaluations if e.model == b and e.combination == label]
            doc["comparison"][label] = compare_models(ma, mb)
    return Validation(doc=doc, evaluations=evaluations)
