"""The test-set figures of a trained model (and optionally a baseline), for its model card.

``dicom-node model-card --config models/ild-demo.train.yaml --model models/ild-demo.safetensors
[--baseline models/baseline-demo.safetensors] --out models/evaluation`` evaluates on the held-out test split of
the config (``<output.dir>/splits.json``) at each checkpoint's own threshold: every role combination the model
takes (15 for the ILD model, its one for a baseline), and writes ``<out>.json`` (per patient and summaries)
and ``<out>.md`` (the method spec's table layout: mean +/- SD over patients; lesion sensitivity pooled over
lesions; FP per patient). Progress bars on stderr.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.checkpoint import CheckpointMeta, load_checkpoint
from pipeline.model import ILDDeepLabV3, combination_key
from training.calibrate import choose_threshold, evaluate_cases, full_role_maps, model_combinations
from training.config import TrainConfig
from training.data.cache import CachedCase
from training.formatting import fixed, mean_sd
from training.metrics import PatientMetrics, count_group, evaluate_patient, summarise
from training.splits import read_splits
from training.trainer import load_cases

__all__ = ["evaluate_model", "markdown_table", "plot_training_curves", "write_model_card_figures"]

#: The method spec's published figures (study 2, real multicentre data; mean +/- SD), as rows of the same table.
PUBLISHED_ROWS = (
    "| *paper: study 2 ILD, test site missing BRAVO (real data)* | | 0.989 +/- 0.029 | 0.795 +/- 0.105 | "
    "0.561 +/- 0.225 | 0.671 | 0.790 | 12.3 | 3.6 | | |\n"
    "| *paper: study 2 DeepLab V3 baseline (real data)* | | 0.989 +/- 0.023 | 0.774 +/- 0.104 | "
    "0.492 +/- 0.186 | 0.631 | 0.722 | 26.3 | 7.0 | | |\n"
)

#: Short names of the combinations in tables.
_SHORT = {"t1_bravo_post": "BRAVO", "t1_cube_pre": "CUBE pre", "t1_cube_post": "CUBE post", "flair": "FLAIR"}


def short_name(key: str) -> str:
    return " + ".join(_SHORT[r] for r in key.split("+"))


#: The paper's test condition (no BRAVO) and the full set: also scored at other thresholds, to show how much
#: of the overlap and false-positive figures is the threshold rule's choice rather than the ranking (AUC).
_THRESHOLD_STUDY = ("t1_cube_pre+t1_cube_post+flair", "t1_bravo_post+t1_cube_pre+t1_cube_post+flair")


def evaluate_model(model: ILDDeepLabV3, meta: CheckpointMeta, cases: Sequence[CachedCase], *,
                   progress: bool = True, other_thresholds: Sequence[float] = (0.5,)) -> dict[str, Any]:
    """Per combination: the patients' metrics and their summary at the checkpoint's threshold (``threshold_rule``);
    for the no-BRAVO and four-role combinations also at ``other_thresholds`` (same predictions)."""
    per: dict[str, list[PatientMetrics]] = {}
    other: dict[str, dict[float, list[PatientMetrics]]] = {}
    t0 = time.perf_counter()
    n_slices = 0
    for key, m, prob in evaluate_cases(model, cases, meta.threshold, model_combinations(model),
                                       progress=progress, desc=meta.model_name):
        per.setdefault(key, []).append(m)
        n_slices += prob.shape[0]
        if key in _THRESHOLD_STUDY:
            case = next(c for c in cases if c.case_id == m.case_id)
            for t in other_thresholds:
                other.setdefault(key, {}).setdefault(t, []).append(evaluate_patient(
                    prob, np.asarray(case.label) > 0, np.asarray(case.brain) > 0, case.spacing_mm, t,
                    case_id=case.case_id))
    seconds = time.perf_counter() - t0
    return {"model_name": meta.model_name, "model_version": meta.model_version, "threshold": meta.threshold,
            "threshold_rule": meta.threshold_rule,
            "architecture": model.config.to_dict(), "seconds": seconds, "slices": n_slices,
            "combinations": {k: {"summary": summarise(v), "patients": [p.to_dict() for p in v]}
                             for k, v in per.items()},
            "other_thresholds": {k: {str(t): summarise(v) for t, v in d.items()} for k, d in other.items()}}


def markdown_table(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """The spec's table (AUC, Dice, IoU, recall, precision, FP/pt) plus lesion sensitivity, one row per entry."""
    head = ("| | n | AUC | Dice | IoU | recall | precision | FP/pt (none) | FP/pt (>=10 mm^3) | lesion sens. | "
            "lesion sens. >= 65 mm^3 |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for name, s in rows:
        lines.append(f"| {name} | {s['n_patients']} | {mean_sd(s, 'auc')} | {mean_sd(s, 'dice')} | "
                     f"{mean_sd(s, 'iou')} | {mean_sd(s, 'recall')} | {mean_sd(s, 'precision')} | "
                     f"{fixed(s['fp_per_patient'], 1)} | {fixed(s['fp_10_per_patient'], 1)} | "
                     f"{fixed(s['pooled_lesion_sensitivity'])} | {fixed(s['pooled_lesion_sensitivity_ge_65mm3'])} |")
    return head + "\n".join(lines) + "\n"


def _groups_table(name: str, s: dict[str, Any]) -> str:
    rows = [(f"{name}, {g} lesions", s["groups"][g]) for g in ("1-3", "4-10", ">10") if s["groups"][g]["n_patients"]]
    return markdown_table(rows)


def plot_training_curves(runs: dict[str, Path], png: Path) -> Path:
    """Training loss, validation loss and validation Dice at 0.5 per epoch of each run's ``metrics.csv``."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for label, csv_path in runs.items():
        rows = list(csv.DictReader(csv_path.open()))
        epochs = [int(r["epoch"]) for r in rows]
        for ax, key in zip(axes, ("train_loss", "val_loss", "val_dice")):
            ax.plot(epochs, [float(r[key]) for r in rows], marker="o", label=label)
    for ax, title in zip(axes, ("training loss", "validation loss", "validation Dice at 0.5 (64 slices)")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


def write_model_card_figures(cfg: TrainConfig, model_path: Path, baseline_path: Path | None, out: Path, *,
                             progress: bool = True, baseline_cfg: TrainConfig | None = None) -> str:
    """Evaluate on the test split of ``cfg`` and write ``<out>.json``, ``<out>.md`` and, from the runs'
    ``metrics.csv``, ``<out>-training.png``; returns the markdown."""
    cases = load_cases(cfg, progress=progress)
    test_ids = read_splits(cfg.output.dir / "splits.json")["test"]
    if not test_ids:
        raise ValueError(f"{cfg.output.dir / 'splits.json'}: the split has no test case")
    test = [cases[c] for c in test_ids]
    results = {}
    for label, path in (("model", model_path), ("baseline", baseline_path)):
        if path is None:
            continue
        model, meta = load_checkpoint(path)
        if (meta.in_plane_size, meta.through_plane_mm) != (cfg.model.in_plane_size, cfg.model.through_plane_mm):
            raise ValueError(f"{path}: trained on a {meta.in_plane_size} px / {meta.through_plane_mm} mm grid, the "
                             f"config prepares {cfg.model.in_plane_size} px / {cfg.model.through_plane_mm} mm")
        # the other rules on the validation split, for comparison: the method's Youden point (stored in the
        # checkpoint since #17; chosen here for older ones) and the max-Dice point, then 0.5
        validation = [cases[c] for c in read_splits(cfg.output.dir / "splits.json")["validation"]]
        maps = full_role_maps(model, validation, progress=progress)
        named = {"youden": meta.youden_threshold or choose_threshold(maps, "youden").threshold,
                 "max-dice": choose_threshold(maps, "max-dice").threshold, "fixed": 0.5}
        del maps
        named = {k: t for k, t in named.items() if not (k == meta.threshold_rule and t == meta.threshold)}
        results[label] = evaluate_model(model, meta, test, progress=progress, other_thresholds=tuple(named.values()))
        results[label]["other_threshold_rules"] = {str(t): k for k, t in named.items()}
    doc = {"test_cases": test_ids, "lesion_counts": {c: cases[c].n_lesions for c in test_ids}, **results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1, default=float))

    ild = results["model"]
    no_bravo = combination_key(["t1_cube_pre", "t1_cube_post", "flair"])
    md = [f"Held-out synthetic test set: {len(test)} studies (lesion-count groups: "
          + ", ".join(f"{g}: {sum(1 for c in test if count_group(c.n_lesions) == g)}" for g in ("1-3", "4-10", ">10"))
          + "). Mean +/- SD over patients; lesion sensitivity pooled over lesions; FP = predicted components "
            "touching no true lesion (26-connected).\n"]
    rows = [(f"{ild['model_name']} (ILD), BRAVO missing", ild["combinations"][no_bravo]["summary"])]
    if "baseline" in results:
        b = results["baseline"]
        rows.append((f"{b['model_name']} (baseline DeepLab V3, same roles)", b["combinations"][no_bravo]["summary"]))
    full = combination_key(ild["architecture"]["roles"])
    rows.append((f"{ild['model_name']} (ILD), all four", ild["combinations"][full]["summary"]))
    md.append("### Paper's test condition (BRAVO missing) and all four sequences\n\n" + markdown_table(rows)
              + PUBLISHED_ROWS)
    md.append("### ILD model, every role combination\n\n" + markdown_table(
        [(short_name(k), v["summary"]) for k, v in ild["combinations"].items()]))
    md.append("### By number of lesions (BRAVO missing)\n\n"
              + _groups_table(ild["model_name"], ild["combinations"][no_bravo]["summary"]))
    thr_rows = [(f"{r['model_name']}, {short_name(k)}, {r['other_threshold_rules'][t]} {float(t):.3g}", d[t])
                for r in results.values() for k, d in r["other_thresholds"].items() for t in d]
    if thr_rows:
        md.append("### The same predictions at other thresholds (not the model's operating point)\n\n"
                  + "youden: the method's rule, the maximum Youden index of the pooled voxel ROC on the validation "
                    "split (`dicom-node validate --threshold youden`, node `model.threshold: youden`); max-dice: the "
                    "maximum pooled voxel Dice on the validation split (`dicom-node calibrate --rule max-dice`); "
                    "fixed: 0.5.\n\n" + markdown_table(thr_rows))
    for r in results.values():
        md.append(f"{r['model_name']}: threshold {r['threshold']:.3g} ({r['threshold_rule']}); evaluation "
                  f"{r['seconds']:.0f} s for "
                  f"{r['slices']} slices ({1000 * r['seconds'] / max(r['slices'], 1):.1f} ms/slice incl. metrics).\n")
    runs = {c.model.name: c.output.dir / "metrics.csv" for c in (cfg, baseline_cfg) if c is not None}
    runs = {k: v for k, v in runs.items() if v.is_file()}
    if runs:
        png = plot_training_curves(runs, out.with_name(out.name + "-training.png"))
        md.append(f"![training curves]({png.name})\n")
    text = "\n".join(md)
    out.with_suffix(".md").write_text(text)
    return text
