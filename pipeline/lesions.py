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
* Longest in-plane diameter (RANO-BM's unidimensional measurement) and its perpendicular short axis: per slice of
  the image grid (the reference images' plane, axial for an axial reference series), see
  :func:`in_plane_diameters`; the lesion's :class:`InPlaneDiameter` is the one of the slice where it is longest.
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
from scipy.spatial.distance import pdist, squareform

__all__ = ["MAX_LESIONS", "STRUCTURE_26", "InPlaneDiameter", "Lesion", "LesionResult", "find_lesions", "in_plane_diameters"]

STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)
"""26-connectivity structuring element for :func:`scipy.ndimage.label`."""

_STRUCTURE_6 = ndimage.generate_binary_structure(3, 1)

MAX_LESIONS = int(np.iinfo(np.uint16).max)
"""The ``labels`` image is uint16: more components than this raise ``ValueError``."""

_PDIST_DIRECT_MAX = 64  # below this many boundary points, skip the hull and compare all pairs


@dataclass(frozen=True)
class InPlaneDiameter:
    """A lesion's longest diameter within one slice and the short axis perpendicular to it.

    Points are (row, column) pixel indices of the slice, 0-based, at pixel CENTRES (numpy axes 1 and 2 of the
    label array; continuous values for the short axis). Lengths in mm. DICOM SCOORD image coordinates are
    (column + 0.5, row + 0.5): see :func:`pipeline.dicom_out.sr.write_sr`.
    """

    slice_index: int  # numpy axis 0 of the label array (the slice where the long axis is longest)
    long_axis_mm: float  # between two voxel centres of the slice's component; 0 for a single-voxel slice
    long_axis: tuple[tuple[float, float], tuple[float, float]]  # ((row, col), (row, col)) end points
    short_axis_mm: float  # 0 when nothing of the slice lies across the long axis (one voxel wide)
    short_axis: tuple[tuple[float, float], tuple[float, float]] | None  # None when short_axis_mm is 0


@dataclass(frozen=True)
class Lesion:
    """One connected component of the thresholded probability map."""

    number: int  # 1..N by decreasing volume; the value in ``LesionResult.labels``
    voxel_count: int
    volume_mm3: float
    centroid_lps_mm: tuple[float, float, float]
    max_diameter_mm: float
    in_plane: InPlaneDiameter  # longest in-plane diameter (RANO-BM), in bbox-independent slice/pixel indices
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


def _farthest_pair(points: np.ndarray) -> tuple[int, int, float]:
    """Indices (i, j) into ``points`` ((N, D) coordinates, D = 2 or 3) of the two farthest apart, and their
    Euclidean distance ((0, 0, 0.0) for a single point)."""
    if len(points) < 2:
        return 0, 0, 0.0
    candidates = np.arange(len(points))
    if len(points) > _PDIST_DIRECT_MAX:
        try:
            # QJ joggles degenerate (flat, collinear) inputs; vertices index the original, exact coordinates.
            candidates = ConvexHull(points, qhull_options="QJ").vertices
        except (QhullError, ValueError):
            pass
    distances = squareform(pdist(points[candidates]))
    a, b = np.unravel_index(int(np.argmax(distances)), distances.shape)
    return int(candidates[a]), int(candidates[b]), float(distances[a, b])


def _max_distance(points: np.ndarray) -> float:
    """Largest pairwise Euclidean distance of (N, 3) points (0 for a single point)."""
    return _farthest_pair(points)[2]


def _short_axis(pixels_mm: np.ndarray, a: np.ndarray, b: np.ndarray, step_mm: float
                ) -> tuple[float, np.ndarray, np.ndarray] | None:
    """Longest extent of ``pixels_mm`` ((N, 2) pixel centres, mm) perpendicular to the segment a-b, measured in
    strips ``step_mm`` wide across it; (length, end 1, end 2) in mm, or None when no strip is wider than 0."""
    u = (b - a) / np.linalg.norm(b - a)
    v = np.array([-u[1], u[0]])
    t = (pixels_mm - a) @ u
    s = (pixels_mm - a) @ v
    strip = np.rint(t / step_mm).astype(np.int64)
    strip -= strip.min()
    lo = np.full(strip.max() + 1, np.inf)
    hi = np.full(strip.max() + 1, -np.inf)
    np.minimum.at(lo, strip, s)
    np.maximum.at(hi, strip, s)
    widths = hi - lo
    k = int(np.argmax(widths))
    if widths[k] <= 0:
        return None
    t0 = float(t[strip == k].mean())  # both ends at one position along a-b: exactly perpendicular
    return float(widths[k]), a + t0 * u + lo[k] * v, a + t0 * u + hi[k] * v


def in_plane_diameters(mask: np.ndarray, spacing_mm: tuple[float, float]) -> InPlaneDiameter:
    """Longest in-plane diameter of ``mask`` and the perpendicular short axis, on the slice where it is longest.

    ``mask``: (slice, row, col) boolean array holding one lesion (any connectivity). ``spacing_mm``: (row
    spacing, column spacing) in mm, i.e. DICOM PixelSpacing order (SimpleITK spacing[1], spacing[0]).
    Per slice, the long axis is the largest distance between two pixel centres of the slice's foreground (on
    the convex hull of its boundary pixels, as :func:`find_lesions`' 3D diameter); the slice with the longest
    one wins (ties: the larger area, then the lower index). The short axis is the longest extent of the slice's
    pixel centres perpendicular to the long axis, measured in strips one pixel (the smaller spacing) wide
    across the long axis; both its ends lie on one line perpendicular to it. Raises ``ValueError`` for an
    empty mask.
    """
    if mask.ndim != 3 or not mask.any():
        raise ValueError("mask must be a non-empty 3D array")
    scale = np.asarray(spacing_mm, dtype=float)
    best: tuple[float, int, int] | None = None  # (length, area, -slice)
    best_pair: tuple[np.ndarray, np.ndarray] = (np.zeros(2), np.zeros(2))
    for z in np.flatnonzero(mask.any(axis=(1, 2))):
        plane = mask[z]
        edge = plane & ~ndimage.binary_erosion(plane, border_value=0)
        points = np.argwhere(edge) * scale
        i, j, length = _farthest_pair(points)
        key = (length, int(plane.sum()), -int(z))
        if best is None or key > best:
            best, best_pair = key, (points[i], points[j])
    assert best is not None
    length, _, minus_z = best
    best_z = -minus_z
    a, b = best_pair
    short = _short_axis(np.argwhere(mask[best_z]) * scale, a, b, float(scale.min())) if length > 0 else None

    def index(point_mm: np.ndarray) -> tuple[float, float]:
        row, col = point_mm / scale
        return float(row), float(col)

    return InPlaneDiameter(
        slice_index=best_z,
        long_axis_mm=length,
        long_axis=(index(a), index(b)),
        short_axis_mm=short[0] if short else 0.0,
        short_axis=(index(short[1]), index(short[2])) if short else None,
    )


def _offset(d: InPlaneDiameter, offset: np.ndarray) -> InPlaneDiameter:
    """``d`` of a bounding-box crop moved to the indices of the full array (``offset`` = crop start, z y x)."""
    z0, r0, c0 = (int(v) for v in offset)

    def move(pair: tuple[tuple[float, float], tuple[float, float]]) -> tuple[tuple[float, float], tuple[float, float]]:
        return (pair[0][0] + r0, pair[0][1] + c0), (pair[1][0] + r0, pair[1][1] + c0)

    return InPlaneDiameter(slice_index=d.slice_index + z0, long_axis_mm=d.long_axis_mm, long_axis=move(d.long_axis),
                           short_axis_mm=d.short_axis_mm, short_axis=move(d.short_axis) if d.short_axis else None)


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
    spacing_rc = (float(probability.GetSpacing()[1]), float(probability.GetSpacing()[0]))

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
            in_plane=_offset(in_plane_diameters(mask, spacing_rc), offset),
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
