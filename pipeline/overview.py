"""A PNG overview of a :class:`~pipeline.result.StudyResult` for a person to look at (not for diagnosis).

Up to four panels, one per largest lesion: the axial slice (radiological view: patient's right on the image's
left, anterior on top) of the reference series (the post-contrast T1) through the slice where that lesion is
largest, with every lesion's contour (red) and the panel's lesion (yellow), titled with its number, volume and
maximum diameter. Without lesions: three axial slices (25/50/75 % of the extent) and "no lesion". The reference
and the labels are resampled onto an axial grid of the reference (256 x 256, 1 mm slices) for display only;
the title carries counts, threshold and model, never patient data.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from pipeline.preprocess import model_grid, resample_to_grid

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from pipeline.lesions import Lesion
    from pipeline.result import StudyResult

__all__ = ["MAX_PANELS", "display_window", "draw_overview", "figure_rgb", "overview_rgb", "pyplot",
           "write_overview"]

MAX_PANELS = 4


def display_window(img: np.ndarray) -> tuple[float, float]:
    """Grey window (low, high) of an MR volume: the 1st and 99.5th percentiles of its foreground (> 0)."""
    fg = img[img > 0]
    if fg.size < 16:
        return 0.0, 1.0
    lo, hi = np.percentile(fg, (1.0, 99.5))
    return float(lo), float(max(hi, lo + 1e-6))


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the Agg backend (no display: the node and the CLI draw headless)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def figure_rgb(fig: Figure) -> np.ndarray:
    """The drawn ``fig`` as a (rows, columns, 3) uint8 RGB array, one element per output pixel."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()  # type: ignore[attr-defined]


def write_overview(result: StudyResult, path: str | PathLike[str]) -> Path:
    """Draw the overview of ``result`` (see the module docstring) and save it as a PNG at ``path``."""
    plt = pyplot()
    fig = draw_overview(result)
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def overview_rgb(result: StudyResult) -> np.ndarray:
    """The overview of ``result`` as a (rows, columns, 3) uint8 RGB array (the Secondary Capture summary)."""
    fig = draw_overview(result)
    try:
        return figure_rgb(fig)
    finally:
        pyplot().close(fig)


def draw_overview(result: StudyResult) -> Figure:
    """The overview figure of ``result`` (1000 px wide at 100 dpi); the caller closes it."""
    plt = pyplot()
    grid = model_grid(result.reference_image, size=256, through_plane_mm=1.0)
    ref = resample_to_grid(result.reference_image, grid)
    labels = sitk.GetArrayFromImage(sitk.Resample(result.lesions.labels, grid, sitk.Transform(3, sitk.sitkIdentity),
                                                  sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16))
    lesions = result.lesions.lesions[:MAX_PANELS]
    panels: list[tuple[int, Lesion | None]] = []
    if lesions:
        for lesion in lesions:
            area = (labels == lesion.number).sum(axis=(1, 2))
            k = int(np.argmax(area)) if area.max() > 0 else _nearest_slice(grid, lesion.centroid_lps_mm)
            panels.append((k, lesion))
    else:
        n = ref.shape[0]
        panels = [(int(n * f), None) for f in (0.25, 0.5, 0.75)]

    ncols = min(len(panels), 2) if len(panels) > 1 else 1
    nrows = (len(panels) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.0 * ncols, 5.4 * nrows + 0.6), squeeze=False,
                             layout="constrained")
    lo, hi = display_window(ref)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (k, les) in zip(axes.ravel(), panels):
        ax.imshow(ref[k], cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        sl = labels[k]
        if sl.any():
            ax.contour(sl > 0, levels=[0.5], colors="red", linewidths=0.8)
        if les is not None:
            mine = sl == les.number
            if mine.any():
                ax.contour(mine, levels=[0.5], colors="yellow", linewidths=1.4)
            ax.set_title(f"#{les.number}: {les.volume_mm3:.0f} mm³, max diam. {les.max_diameter_mm:.1f} mm\n"
                         f"mean p {les.mean_probability:.2f}, z = {les.centroid_lps_mm[2]:.1f} mm (LPS)",
                         fontsize=9)
        else:
            ax.set_title(f"axial slice {k + 1}/{ref.shape[0]}: no lesion", fontsize=9)
        ax.text(2, 12, "R", color="white", fontsize=9)
        ax.text(ref.shape[2] - 10, 12, "L", color="white", fontsize=9)
    res = result.lesions
    fig.suptitle(
        f"{result.meta.model_name} {result.meta.model_version} - threshold {res.threshold:.2f} - "
        f"{res.count_all} lesion(s), {res.count_ge_10mm3} >= 10 mm³, total {res.total_volume_mm3:.0f} mm³\n"
        f"reference {result.reference_role}; roles used: {', '.join(result.inference.roles_used)} - "
        "RESEARCH USE ONLY", fontsize=9)
    return fig


def _nearest_slice(grid: sitk.Image, point: tuple[float, float, float]) -> int:
    idx = grid.TransformPhysicalPointToContinuousIndex(tuple(float(v) for v in point))
    return int(np.clip(round(idx[2]), 0, grid.GetSize()[2] - 1))
