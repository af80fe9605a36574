"""Boundary distance of two masks: how far a predicted outline lies from the true one (mm).

* Surface of a mask = its voxels with at least one 6-neighbour (face) outside it (outside the array counts as
  outside).
* Mean symmetric surface distance = the mean, over the surface voxels of BOTH masks, of the Euclidean distance
  (mm, voxel centre to voxel centre, ``spacing_mm`` per axis) to the nearest surface voxel of the other mask:
  0 for identical masks; a contour one voxel off everywhere gives about one voxel spacing.

Arrays are numpy (slice, row, column); ``spacing_mm`` is the voxel size in the same order. The distance
transforms run on the bounding box of the two masks (every surface voxel lies in it, so distances are exact).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from training.metrics.lesion import validate_spacing
from training.metrics.voxel import as_bool

__all__ = ["mean_surface_distance", "surface_distances"]


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1), border_value=0)


def surface_distances(pred: npt.ArrayLike, truth: npt.ArrayLike, spacing_mm: Sequence[float]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(distances of ``pred``'s surface voxels to ``truth``'s surface, of ``truth``'s to ``pred``'s), mm.

    Both masks must be non-empty and share one 3D shape (``ValueError`` otherwise)."""
    p, t = as_bool("pred", pred), as_bool("truth", truth)
    if p.ndim != 3 or p.shape != t.shape:
        raise ValueError(f"pred and truth must be 3D arrays of one shape, got {p.shape} and {t.shape}")
    spacing = validate_spacing(spacing_mm)
    if not p.any() or not t.any():
        raise ValueError("both masks need at least one voxel")
    box = ndimage.find_objects((p | t).astype(np.uint8))[0]
    p, t = _surface(p[box]), _surface(t[box])
    to_truth = ndimage.distance_transform_edt(~t, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~p, sampling=spacing)
    return np.asarray(to_truth[p], dtype=np.float64), np.asarray(to_pred[t], dtype=np.float64)


def mean_surface_distance(pred: npt.ArrayLike, truth: npt.ArrayLike, spacing_mm: Sequence[float]) -> float:
    """Mean symmetric surface distance (mm) of ``pred`` and ``truth`` (see the module doc); 0 when both are
    empty, ``inf`` when only one is."""
    p, t = as_bool("pred", pred), as_bool("truth", truth)
    if not p.any() or not t.any():
        return 0.0 if not p.any() and not t.any() else math.inf
    a, b = surface_distances(p, t, spacing_mm)
    return float((a.sum() + b.sum()) / (a.size + b.size))
