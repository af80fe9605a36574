"""Lesions of a probability map: threshold, 26-connected components, per-lesion measurements.

Conventions (see ``../shared/spec/ild-method.md``, "Metrics"):

* A voxel is foreground when ``probability >= threshold`` (the Youden-point threshold of the model checkpoint),
  compared in the map's own floating-point precision.
* Lesions are connected components with 26-connectivity (faces, edges or corners touch).
* Volume = voxel count x voxel volume of the image grid (mm^3).
* Centroid = mean of the voxel centres, mapped to LPS mm through the image's origin, spacing and direction.
* Maximum diameter = the largest distance (mm) between two voxel centres of the component. It is computed on
  the vertices of the convex hull of the boundary voxel centres (an interior voxel, whose 6 face neighbours are
  all in the component, is the midpoint of two of them and so never a hull vertex): exact and fast.
* Lesions are numbered 1..N by decreasing volume (ties: raster order of their first voxel), and the ``labels``
  image (uint16, same grid as the input) holds that number.
* ``count_ge_10mm3`` counts lesions with volume >= ``min_volume_mm3_for_count`` (10 mm^3 by default, the
  spec's limit for the "FP >= 10 mm^3" figures).

Pure functions and frozen dataclasses only; nothing here knows about DICOM.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist

__all__ = ["MAX_LESIONS", "STRUCTURE_26", "Lesion", "LesionResult", "find_lesions"]

STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)
"""26-connectivity structuring element for :func:`scipy.ndimage.label`."""

_STRUCTURE_6 = ndimage.generate_binary_structure(3, 1)

MAX_LESIONS = int(np.iinfo(np.uint16).max)
"""The ``labels`` image is uint16: more components than this raise ``ValueError``."""

_PDIST_DIRECT_MAX = 64  # below this many boundary points, skip the hull and compare all pairs


@dataclass(frozen=True)
class Lesion:
    """One connected component of the thresholded probability map."""

    number: int  # 1..N by decreasing volume; the value in ``LesionResult.labels``
    voxel_count: int
    volume_mm3: float
    centroid_lps_mm: tuple[float, float, float]
    max_diameter_mm: float
    mean_probability: float
    max_probability: float
    bbox_index: tuple[tuple[int, int], ...]  # ((z0, z1), (y0, y1), (x0, x1)) half-open, numpy (slice, row, col) order


@dataclass(frozen=True)
class LesionResult:
    """All lesions of one probability map at one threshold."""

    labels: sitk.Image  # uint16, same grid as the probability; 0 = background, n = Lesion.number
    lesions: tuple[Lesion, ...]  # ordered by number (decreasing volume)
    count_all: int
    count_ge_10mm3: int  # lesions with volume_mm3 >= min_volume_mm3_for_count
    total_volume_mm3: float
    threshold: float
    min_volume_mm3_for_count: float = 10.0


def _index_to_lps(image: sitk.Image, zyx: np.ndarray) -> np.ndarray:
    """(N, 3) numpy (z, y, x) indices (float allowed) -> (N, 3) LPS mm."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    origin = np.asarray(image.GetOrigin(), dtype=float)
    xyz = np.asarray(zyx, dtype=float)[:, ::-1]
    return origin + (xyz * spacing) @ direction.T


def _max_distance(points: np.ndarray) -> float:
    """Largest pairwise Euclidean distance of (N, 3) points (0 for a single point)."""
    if len(points) < 2:
        return 0.0
    if len(points) > _PDIST_DIRECT_MAX:
        try:
            # QJ joggles degenerate (flat, collinear) inputs; vertices index the original, exact coordinates.
            points = points[ConvexHull(points, qhull_options="QJ").vertices]
        except (QhullError, ValueError):
            pass
    return float(pdist(points).max())


def find_lesions(
    probability: sitk.Image, threshold: float, *, min_volume_mm3_for_count: float = 10.0
) -> LesionResult:
    """Threshold ``probability`` (``>= threshold``) and measure its 26-connected components.

    ``probability`` is a 3D scalar image (any real pixel type; a binary 0/1 mask works too). Returns the
    lesions numbered 1..N by decreasing volume and a uint16 label image on the same grid.
    """
    if probability.GetDimension() != 3 or probability.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("probability must be a 3D scalar image")
    threshold = float(threshold)
    native = sitk.GetArrayFromImage(probability)
    # Compare in the map's own precision: a float32 map holding 0.76 is at the threshold 0.76.
    limit = np.asarray(threshold, dtype=native.dtype) if np.issubdtype(native.dtype, np.floating) else threshold
    raw, n = ndimage.label(native >= limit, structure=STRUCTURE_26)
    prob = native.astype(np.float64, copy=False)
    if n > MAX_LESIONS:
        raise ValueError(f"{n} connected components do not fit a uint16 label image (max {MAX_LESIONS})")
    voxel_mm3 = float(np.prod(probability.GetSpacing()))

    objects = ndimage.find_objects(raw)
    counts = np.bincount(raw.ravel(), minlength=n + 1)[1:]
    # Decreasing volume; ties keep scipy's raster order of first appearance (stable sort).
    order = np.argsort(-counts, kind="stable")

    lesions: list[Lesion] = []
    lut = np.zeros(n + 1, dtype=np.uint16)
    for number, k in enumerate(order, start=1):
        raw_label = int(k) + 1
        lut[raw_label] = number
        box = objects[k]
        mask = raw[box] == raw_label
        offset = np.array([s.start for s in box])
        voxels = np.argwhere(mask)
        values = prob[box][mask]
        centroid = _index_to_lps(probability, (voxels.mean(axis=0) + offset)[None, :])[0]
        boundary = mask & ~ndimage.binary_erosion(mask, structure=_STRUCTURE_6, border_value=0)
        surface = _index_to_lps(probability, np.argwhere(boundary) + offset)
        lesions.append(Lesion(
            number=number,
            voxel_count=int(counts[k]),
            volume_mm3=float(counts[k]) * voxel_mm3,
            centroid_lps_mm=(float(centroid[0]), float(centroid[1]), float(centroid[2])),
            max_diameter_mm=_max_distance(surface),
            mean_probability=float(values.mean()),
            max_probability=float(values.max()),
            bbox_index=tuple((int(s.start), int(s.stop)) for s in box),
        ))

    labels = sitk.GetImageFromArray(lut[raw])
    labels.CopyInformation(probability)
    return LesionResult(
        labels=labels,
        lesions=tuple(lesions),
        count_all=len(lesions),
        count_ge_10mm3=sum(1 for les in lesions if les.volume_mm3 >= min_volume_mm3_for_count),
        total_volume_mm3=float(counts.sum()) * voxel_mm3,
        threshold=threshold,
        min_volume_mm3_for_count=float(min_volume_mm3_for_count),
    )
