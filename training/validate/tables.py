"""The report's tables, built once from the ``metrics.json`` document and rendered by both the HTML and the PDF.

The summary and subgroup tables are :func:`training.model_card.markdown_table`'s (the method spec's layout:
mean +/- SD over patients, lesion sensitivity pooled over lesions, FP components per patient), so the model
card and the validation report cannot drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from training.formatting import fixed, mean_sd
from training.metrics import COUNT_GROUPS
from training.model_card import markdown_table, short_name
from training.validate.run import AS_ACQUIRED, primary_combination

__all__ = ["Table", "all_tables", "dataset_table", "models_table", "row_name", "skipped_table", "summary_table",
           "worst_table"]


@dataclass(frozen=True)
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""


def _from_markdown(title: str, text: str, note: str = "") -> Table:
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    return Table(title, cells[0], cells[2:], note)


def _combo(key: str) -> str:
    return "as acquired" if key == AS_ACQUIRED else short_name(key)


def row_name(model: dict[str, Any], key: str) -> str:
    return f"{model['name']} {model['version']} ({model['kind']}), {_combo(key)}"


def summary_table(doc: dict[str, Any]) -> Table:
    rows = [(row_name(m, primary_combination(m)), m["combinations"][primary_combination(m)]["summary"])
            for m in doc["models"].values() if m["combinations"]]
    return _from_markdown("Summary (papers' layout)", markdown_table(rows),
                          "Mean +/- SD over patients; lesion sensitivity pooled over lesions (26-connected); FP = "
                          "predicted components touching no true lesion, per patient, any size and >= 10 mm^3.")


def _operating_point(doc: dict[str, Any]) -> Table:
    rows = []
    for m in doc["models"].values():
        for key, c in m["combinations"].items():
            s, roc = c["summary"], c["roc"]
            ci = roc["auc_ci95"]
            rows.append([row_name(m, key), f"{m['threshold']:.4g}", mean_sd(s, "sensitivity"),
                         mean_sd(s, "specificity"), mean_sd(s, "fpr", 5), fixed(roc["auc"], 4),
                         f"{ci[0]:.4f} - {ci[1]:.4f}" if math.isfinite(ci[0]) else "n/a"])
    return Table("Voxel operating point and pooled ROC",
                 ["", "threshold", "sensitivity", "specificity", "FPR", "pooled AUC", "95% CI (bootstrap)"], rows,
                 "Sensitivity/specificity in the brain mask at the operating threshold (per patient, mean +/- SD); "
                 "FPR = FP voxels / negative voxels (whole volume); pooled AUC over all patients' brain voxels.")


def _per_combination(doc: dict[str, Any]) -> Table | None:
    rows = []
    for m in doc["models"].values():
        if len(m["combinations"]) > 1:
            rows += [(row_name(m, k), c["summary"]) for k, c in m["combinations"].items()]
        elif m["by_roles"]:
            rows += [(f"{m['name']} ({m['kind']}), given {short_name(k)}", s) for k, s in m["by_roles"].items()]
    if not rows:
        return None
    return _from_markdown("Per role combination", markdown_table(rows),
                          "As acquired: grouped by the roles each case actually gave the model.")


def _groups(doc: dict[str, Any]) -> Table:
    rows = []
    for m in doc["models"].values():
        if m["combinations"]:
            s = m["combinations"][primary_combination(m)]["summary"]
            rows += [(f"{row_name(m, primary_combination(m))}, {g} lesions", s["groups"][g]) for g in COUNT_GROUPS
                     if s["groups"][g]["n_patients"]]
    return _from_markdown("By number of lesions (1-3, 4-10, >10)", markdown_table(rows),
                          "Patients without lesions count in the overall figures only.")


def _size_bins(doc: dict[str, Any]) -> Table:
    header, rows = [""], []
    for m in doc["models"].values():
        if not m["combinations"]:
            continue
        bins = m["combinations"][primary_combination(m)]["size_bins"]
        header = [""] + [f"[{b['low_mm3']:g}, {b['high_mm3']:g}) mm^3" for b in bins]
        rows.append([row_name(m, primary_combination(m))]
                    + [f"{b['n_hit']}/{b['n_true']} ({fixed(b['sensitivity'], 2)})" for b in bins])
    return Table("Lesion sensitivity by lesion volume", header, rows,
                 "GT lesions hit / GT lesions per volume bin, pooled over patients (65 mm^3 ~ a 5 mm sphere).")


def _comparison(doc: dict[str, Any]) -> list[Table]:
    out = []
    names = [f"{m['name']} {m['version']}" for m in doc["models"].values()]
    for key, per in doc["comparison"].items():
        rows = [[name, str(r["n"]), fixed(r["mean_a"], 4), fixed(r["mean_b"], 4), _p(r["p_ranksum"]),
                 _p(r["p_signed_rank"]), "yes" if r["significant"] else "no"] for name, r in per.items()]
        out.append(Table(f"Comparison, {_combo(key)}: {names[0]} vs {names[1]}",
                         ["metric", "pairs", "mean " + names[0], "mean " + names[1], "p rank-sum (papers)",
                          "p signed-rank (paired)", "p <= 0.05"], rows,
                         "Per patient. Rank-sum: the papers' test (treats the models' values as independent). "
                         "Signed-rank: the correct test for paired cases; 'p <= 0.05' uses it."))
    return out


def _p(p: float) -> str:
    return "n/a" if not math.isfinite(p) else f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def _stored(m: dict[str, Any]) -> str:
    """The checkpoint's own threshold and rule, and its Youden point (the method's rule) where it records one."""
    youden = m.get("checkpoint_youden_threshold")
    return (f"{m['checkpoint_threshold']:.6g} ({m['checkpoint_threshold_rule']}); Youden point "
            + ("not recorded" if youden is None else f"{youden:.6g}"))


def models_table(doc: dict[str, Any]) -> Table:
    rows = [[label, m["name"], m["version"], m["kind"], m["device_uid"], f"{m['threshold']:.6g}",
             m["threshold_source"], _stored(m), m["sha256_16"]] for label, m in doc["models"].items()]
    return Table("Models", ["", "name", "version", "kind", "device UID (training run)", "threshold",
                            "threshold from", "checkpoint's threshold (rule); Youden point", "file SHA-256 (16)"],
                 rows)


def dataset_table(doc: dict[str, Any]) -> Table:
    d = doc["dataset"]
    roles = ", ".join(f"{short_name(r)} {n}" for r, n in d["roles_present"].items())
    groups = ", ".join(f"{g}: {n}" for g, n in d["count_groups"].items())
    return Table("Data set", ["folder", "layout", "cases", "GT lesions", "cases per role", "cases per lesion count"],
                 [[d["folder"], d["kind"], str(d["n_cases"]), str(d["n_lesions"]), roles, groups]])


def worst_table(worst: Sequence[dict[str, Any]]) -> Table:
    rows = [[w["case_id"], short_name("+".join(w["roles"])), str(w["n_lesions"]), str(w["n_hit"]), str(w["fp"]),
             fixed(w["dice"]), fixed(w["iou"])] for w in worst]
    return Table("Worst cases (lowest Dice)", ["case", "roles given", "GT lesions", "hit", "FP", "Dice", "IoU"], rows)


def skipped_table(doc: dict[str, Any]) -> Table | None:
    rows = [[m["name"], s["case_id"], _combo(s["combination"]), s["reason"]]
            for m in doc["models"].values() for s in m["skipped"]]
    return Table("Cases not evaluated", ["model", "case", "combination", "why"], rows) if rows else None


def all_tables(doc: dict[str, Any]) -> list[Table]:
    """The report's tables after the first page's, in order (``None`` entries left out)."""
    tables = [_operating_point(doc), _per_combination(doc), _groups(doc), _size_bins(doc), *_comparison(doc),
              skipped_table(doc)]
    return [t for t in tables if t is not None]
