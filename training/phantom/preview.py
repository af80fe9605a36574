"""A PNG montage of a synthetic study for eyeballing: every present sequence (co-registered) through the largest
lesion, axial on the first row and coronal on the second, with the ground-truth contour."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray

from training.phantom.types import ROLES, SyntheticStudy

_FOV_MM = 240.0
_PIXEL_MM = 0.75
# display frames (column, row) in LPS: radiological axial (patient left on the right, anterior up) and coronal
_CUTS = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
}


def _cut(image: sitk.Image, centre: NDArray[np.float64], plane: str, interpolator: int) -> NDArray[np.float32]:
    """A 2D slice (rows, columns) through ``centre`` (LPS mm) in a display plane, whatever the image's grid."""
    col, row = (np.asarray(v) for v in _CUTS[plane])
    n = int(_FOV_MM / _PIXEL_MM)
    ref = sitk.Image(n, n, 1, sitk.sitkFloat32)
    ref.SetSpacing((_PIXEL_MM, _PIXEL_MM, 1.0))
    ref.SetDirection(tuple(np.column_stack([col, row, np.cross(col, row)]).ravel()))
    ref.SetOrigin(tuple(centre - (col + row) * (n - 1) / 2.0 * _PIXEL_MM))
    out = sitk.Resample(image, ref, sitk.Transform(), interpolator, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)[0]


def _focus(study: SyntheticStudy, plane: str) -> NDArray[np.float64]:
    """Centre (LPS mm) of a display cut: the reference grid's centre moved onto the largest lesion along the
    cut's normal, so the cut passes through the lesion and the head stays in the middle of the picture."""
    size = np.asarray(study.label.GetSize(), dtype=np.float64)
    centre = np.asarray(study.label.TransformContinuousIndexToPhysicalPoint(tuple((size - 1) / 2.0)))
    if not study.lesions:
        return centre
    lesion = np.asarray(max(study.lesions, key=lambda t: t.volume_mm3).centroid_lps_mm)
    u, v = (np.asarray(d, dtype=float) for d in _CUTS[plane])
    normal = np.cross(u, v)
    return centre + normal * float(np.dot(lesion - centre, normal))


def render_preview(study: SyntheticStudy, path: Path) -> Path:
    """Write a PNG montage of ``study`` to ``path`` (created with parents) and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    roles = [r for r in ROLES if r in study.coregistered]
    fig, axes = plt.subplots(2, len(roles), figsize=(3.6 * len(roles), 7.4), squeeze=False, facecolor="black")
    for j, role in enumerate(roles):
        img = study.coregistered[role]
        for i, plane in enumerate(_CUTS):
            ax = axes[i, j]
            centre = _focus(study, plane)
            sl = _cut(img, centre, plane, sitk.sitkLinear)
            lab = _cut(study.label, centre, plane, sitk.sitkNearestNeighbor)
            inside = sl[sl > 0]
            lo, hi = (np.percentile(inside, [0.5, 99.5]) if inside.size else (0.0, 1.0))
            ax.imshow(sl, cmap="gray", vmin=lo, vmax=max(hi, lo + 1.0), interpolation="bilinear")
            if lab.max() > 0:
                ax.contour(lab > 0, levels=[0.5], colors=["#ff3030"], linewidths=0.7)
            ax.set_title(f"{role} ({plane})", color="white", fontsize=9)
            ax.axis("off")
    n = len(study.lesions)
    fig.suptitle(
        f"seed {study.seed} | {study.vendor.value} | reference {study.reference_kind.value} | {n} lesion(s)",
        color="white", fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90, facecolor="black")
    plt.close(fig)
    return path
