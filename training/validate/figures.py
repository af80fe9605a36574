"""The report's plots (matplotlib, Agg): ROC curves with bootstrap bands, box plots, FROC, worst-case slices.

Each function returns a Figure; :mod:`training.validate.report` embeds it as PNG, :mod:`training.validate.pdf`
draws it on a page. Plots carry case ids and figures only, never patient data.
"""

from __future__ import annotations

import math
from typing import Any

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from training.data.cache import CachedCase
from training.validate.tables import row_name

__all__ = ["box_figure", "case_figure", "froc_figure", "roc_figure"]

_MAX_COLS = 4


def _groups(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(row_name(m, k), c) for m in doc["models"].values() for k, c in m["combinations"].items()]


def roc_figure(doc: dict[str, Any]) -> Figure:
    """One panel per model and combination: pooled ROC (log FPR axis) with its 95 % bootstrap band."""
    groups = _groups(doc)
    ncols = min(_MAX_COLS, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(3.6 * ncols, 8.0), 3.2 * nrows + 0.4), squeeze=False,
                             layout="constrained")
    for ax in axes.ravel()[len(groups):]:
        ax.axis("off")
    for ax, (name, c) in zip(axes.ravel(), groups):
        roc = c["roc"]
        fpr, tpr = np.asarray(roc["fpr"]), np.asarray(roc["tpr"], dtype=float)
        keep = fpr > 0  # log axis
        ax.fill_between(fpr[keep], np.asarray(roc["tpr_low"], dtype=float)[keep],
                        np.asarray(roc["tpr_high"], dtype=float)[keep], alpha=0.3, label="95% band")
        ax.plot(fpr[keep], tpr[keep], lw=1.5, label=f"AUC {roc['auc']:.4f}")
        ax.set_xscale("log")
        ax.set_xlim(1e-5, 1)
        ax.set_ylim(0, 1.01)
        ax.set_title(name, fontsize=7)
        ax.set_xlabel("false positive rate (voxels)", fontsize=7)
        ax.set_ylabel("true positive rate", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Voxel ROC pooled over patients, 95% band: bootstrap over patients ({doc['bootstrap']} "
                 f"resamples, seed {doc['seed']})", fontsize=9)
    return fig


def box_figure(doc: dict[str, Any]) -> Figure:
    """Per-patient Dice, IoU and FP components (any size) per model and combination."""
    groups = _groups(doc)
    fig, axes = plt.subplots(1, 3, figsize=(12, 0.9 + 0.32 * max(len(groups), 3)), layout="constrained")
    names = [n for n, _ in groups]
    for ax, (field, title) in zip(axes, (("dice", "Dice"), ("iou", "IoU"), ("fp", "FP / patient (any size)"))):
        data = [[p[field] for p in c["patients"]] for _, c in groups]
        ax.boxplot(data, orientation="horizontal", tick_labels=names if ax is axes[0] else [""] * len(names))
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.invert_yaxis()
        ax.grid(alpha=0.3, axis="x")
    return fig


def froc_figure(doc: dict[str, Any]) -> Figure:
    """Pooled lesion sensitivity vs mean FP components per patient over the threshold sweep; dot = operating
    threshold."""
    fig, ax = plt.subplots(figsize=(7, 4.6), layout="constrained")
    for name, c in _groups(doc):
        pts = sorted(c["froc"], key=lambda p: p["fp_per_patient"])
        line, = ax.plot([p["fp_per_patient"] for p in pts], [p["lesion_sensitivity"] for p in pts], marker=".",
                        lw=1, label=name)
        op = c["operating_point"]
        ax.plot([op["fp_per_patient"]], [op["lesion_sensitivity"]], "o", color=line.get_color(), ms=7)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("mean FP components per patient (any size)")
    ax.set_ylabel("lesion sensitivity (pooled)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="lower right")
    ax.set_title("FROC (threshold sweep); large dot = operating threshold", fontsize=9)
    return fig


def case_figure(case: CachedCase, prob: np.ndarray, threshold: float, title: str) -> Figure:
    """The slice with the most wrong voxels (else the most lesion): the case's reference image on the model grid,
    truth contour green, prediction (``prob >= threshold``) red."""
    truth = np.asarray(case.label) > 0
    pred = prob >= np.float32(threshold)
    wrong = (truth ^ pred).reshape(truth.shape[0], -1).sum(axis=1)
    k = int(np.argmax(wrong)) if wrong.any() else int(np.argmax(truth.reshape(truth.shape[0], -1).sum(axis=1)))
    ref = np.asarray(case.volumes[case.meta["reference_role"]], dtype=np.float32)
    fig, ax = plt.subplots(figsize=(3.4, 3.6), layout="constrained")
    ax.imshow(ref[k], cmap="gray", interpolation="nearest")
    for mask, color in ((truth[k], "lime"), (pred[k], "red")):
        if mask.any() and not mask.all():
            ax.contour(mask, levels=[0.5], colors=color, linewidths=0.9)
    ax.set_title(f"{title}\nslice {k + 1}/{truth.shape[0]}: truth green, prediction red", fontsize=7)
    ax.axis("off")
    return fig
