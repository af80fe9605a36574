"""Load one DICOM MR series into a SimpleITK image with correct patient geometry.

Conventions
-----------
* Geometry is DICOM patient space, LPS, in millimetres (the same space SimpleITK uses).
* The returned image is float32. ``sitk.GetArrayFromImage`` gives a (slice, row, column) array.
  Direction columns: the row direction (IOP[0:3], increasing column index), the column direction
  (IOP[3:6], increasing row index) and the slice normal ``n = row_dir x col_dir``. The direction is always right-handed.
  Origin: ImagePositionPatient of the first slice, i.e. the centre of voxel (0, 0, 0).
* Slices are sorted by their position projected on ``n``. The slice spacing comes from the
  ImagePositionPatient differences, never from SliceThickness or SpacingBetweenSlices.
* Pixel values are stored values x RescaleSlope + RescaleIntercept (classic: top-level attributes;
  enhanced: PixelValueTransformationSequence, per-frame overriding shared). MONOCHROME1 is not inverted.
* Classic single-frame and (Enhanced) multi-frame instances are handled alike: every frame is one slice.
* Pixel decoding uses pydicom's handlers, plus the pylibjpeg plugins for JPEG, JPEG-LS and JPEG 2000.

Errors are :class:`SeriesLoadError` (a ``ValueError``). Messages and logs name the series by
SeriesInstanceUID and SeriesDescription only, never by patient attributes.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from pipeline.dicom_basics import files_under, functional_group

__all__ = [
    "DuplicatePositionError",
    "LoadedSeries",
    "MissingSliceError",
    "MixedOrientationError",
    "MixedSeriesError",
    "MixedSizeError",
    "NonOrthogonalStackError",
    "NotAnImageError",
    "SeriesLoadError",
    "SingleSliceError",
    "SourceRef",
    "group_files",
    "load_series",
    "load_series_dir",
    "read_pixels",
]

log = logging.getLogger(__name__)

ORIENTATION_TOL = 1e-4
"""Largest difference (direction cosine units) between two IOPs that are still "the same orientation"."""
DUPLICATE_TOL_MM = 1e-3
"""Two slices closer than this along the normal are at the same position (mm)."""
GAP_FACTOR = 1.5
"""A step larger than this times the median step means a missing slice."""
IRREGULAR_WARN = 0.01
"""Steps deviating from the mean step by more than this fraction log a warning."""
SHEAR_TOL = 0.05
"""Largest in-plane drift of slice positions, as a fraction of the in-plane pixel spacing."""

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


# ------------------------------------------------------------------------------------------------------------
# Public types


class SeriesLoadError(ValueError):
    """A series that cannot be built into one 3D volume; names the series, never the patient."""

    def __init__(self, problem: str, series_instance_uid: str = "", description: str = "") -> None:
        self.problem = problem
        self.series_instance_uid = series_instance_uid
        self.description = description
        super().__init__(f"series {series_instance_uid or '<unknown UID>'} ({description!r}): {problem}")


class MixedSeriesError(SeriesLoadError):
    """The files span several SeriesInstanceUIDs."""


class NotAnImageError(SeriesLoadError):
    """An instance has no pixel data, no image-plane geometry or is not single-sample (e.g. RGB)."""


class MixedOrientationError(SeriesLoadError):
    """Slices with different ImageOrientationPatient."""


class MixedSizeError(SeriesLoadError):
    """Slices with different Rows/Columns/PixelSpacing (or FrameOfReferenceUID)."""


class SingleSliceError(SeriesLoadError):
    """Only one distinct slice position: not a volume."""


class DuplicatePositionError(SeriesLoadError):
    """Several slices at one position (e.g. DWI volumes, multi-echo, repeated acquisitions)."""


class MissingSliceError(SeriesLoadError):
    """A gap between neighbouring slices larger than 1.5x the median step."""


class NonOrthogonalStackError(SeriesLoadError):
    """Parallel slices whose positions drift in-plane (sheared/tilted stack): no rectilinear volume."""


@dataclass(frozen=True)
class SourceRef:
    """One source image of a slice: the instance, and for multi-frame instances the 1-based frame number."""

    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int | None = None


@dataclass(frozen=True, eq=False)
class LoadedSeries:
    """A loaded series.

    ``image``: float32, LPS mm, array order (slice, row, column). ``source_instances[k]`` is the source
    of slice ``k``. ``header``: the first instance in slice order, without pixel data (patient/study
    attributes for derived objects).
    """

    image: sitk.Image
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str
    description: str
    sop_class_uid: str
    source_instances: tuple[SourceRef, ...]
    header: Dataset


# ------------------------------------------------------------------------------------------------------------
# Pixels


def _is_multiframe(ds: Dataset) -> bool:
    """Enhanced (functional groups) or more than one frame; a classic image with NumberOfFrames 1 is not."""
    return "PerFrameFunctionalGroupsSequence" in ds or int(ds.get("NumberOfFrames", 1) or 1) > 1


def _frame_item(ds: Dataset, frame: int, keyword: str) -> Dataset | None:
    """First item of functional group ``keyword`` for 0-based ``frame``."""
    macro = functional_group(ds, keyword, frame)
    return macro[0] if macro else None


def _rescale(ds: Dataset, n_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame (slope, intercept) arrays; identity when absent."""
    slopes = np.ones(n_frames, dtype=np.float64)
    intercepts = np.zeros(n_frames, dtype=np.float64)
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        for f in range(n_frames):
            item = _frame_item(ds, f, "PixelValueTransformationSequence")
            src = item if item is not None else ds
            slopes[f] = float(src.get("RescaleSlope", 1.0) or 1.0)
            intercepts[f] = float(src.get("RescaleIntercept", 0.0) or 0.0)
    else:
        slopes[:] = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercepts[:] = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    return slopes, intercepts


def read_pixels(ds: Dataset) -> np.ndarray:
    """Decoded, rescaled pixels of one instance as float32.

    Shape (rows, cols) for a single-frame instance, (frames, rows, cols) for a multi-frame one
    (a trailing samples axis when SamplesPerPixel > 1). Any transfer syntax pydicom or the pylibjpeg
    plugins decode; big-endian data comes back in native byte order.
    """
    if not any(kw in ds for kw in _PIXEL_KEYWORDS):
        raise NotAnImageError("instance has no pixel data", str(ds.get("SeriesInstanceUID", "")),
                              str(ds.get("SeriesDescription", "")))
    arr = np.asarray(ds.pixel_array)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    multiframe = _is_multiframe(ds)
    frame_ndim = 2 if samples == 1 else 3
    if multiframe and arr.ndim == frame_ndim:
        arr = arr[np.newaxis]
    n_frames = arr.shape[0] if multiframe else 1
    slopes, intercepts = _rescale(ds, n_frames)
    out = arr.astype(np.float32)  # also converts big-endian input to native order
    if np.all(slopes == 1.0) and np.all(intercepts == 0.0):
        return out
    if multiframe:
        shape = (n_frames,) + (1,) * (out.ndim - 1)
        out *= slopes.astype(np.float32).reshape(shape)
        out += intercepts.astype(np.float32).reshape(shape)
    else:
        out *= np.float32(slopes[0])
        out += np.float32(intercepts[0])
    return out


# ------------------------------------------------------------------------------------------------------------
# Reading and grouping


def _read(path: Path, *, headers_only: bool) -> Dataset | None:
    """The dataset, or None (DEBUG log) when the file is not DICOM."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=headers_only)
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        log.debug("skipping non-DICOM file %s (%s)", path.name, type(exc).__name__)
        return None


def group_files(root: str | PathLike[str]) -> dict[str, list[Path]]:
    """DICOM files under ``root`` (recursive) grouped by SeriesInstanceUID.

    Reads headers only (``stop_before_pixels``); files that are not DICOM, or have no SeriesInstanceUID
    (e.g. DICOMDIR), are skipped with a DEBUG log. Files within a group are in path order.
    """
    groups: dict[str, list[Path]] = defaultdict(list)
    for path in files_under(Path(root)):
        ds = _read(path, headers_only=True)
        if ds is None:
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid:
            log.debug("skipping DICOM file without SeriesInstanceUID: %s", path.name)
            continue
        groups[uid].append(path)
    return dict(groups)


# ------------------------------------------------------------------------------------------------------------
# Geometry and stacking


@dataclass
class _Slice:
    instance: int  # index into the datasets
    frame: int | None  # 0-based frame in a multi-frame instance
    position: np.ndarray  # IPP (mm)
    orientation: np.ndarray  # IOP (6)
    spacing: tuple[float, float]  # PixelSpacing (row spacing, column spacing) mm
    rows: int
    cols: int


def _floats(value: Any, n: int) -> np.ndarray | None:
    if value is None:
        return None
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return out if out.size == n and np.all(np.isfinite(out)) else None


class _Series:
    """Identity of the series for error messages."""

    def __init__(self, first: Dataset) -> None:
        self.uid = str(first.get("SeriesInstanceUID", "") or "")
        self.description = str(first.get("SeriesDescription", "") or "")

    def error(self, cls: type[SeriesLoadError], problem: str) -> SeriesLoadError:
        return cls(problem, self.uid, self.description)


def _slices_of(datasets: Sequence[Dataset], series: _Series) -> list[_Slice]:
    slices: list[_Slice] = []
    for i, ds in enumerate(datasets):
        if not any(kw in ds for kw in _PIXEL_KEYWORDS):
            raise series.error(NotAnImageError, f"instance {i + 1} has no pixel data")
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise series.error(NotAnImageError, "not a greyscale image (SamplesPerPixel != 1)")
        rows, cols = int(ds.Rows), int(ds.Columns)
        if "PerFrameFunctionalGroupsSequence" in ds:
            n_frames = int(ds.get("NumberOfFrames", 1) or 1)
            for f in range(n_frames):
                pos = _frame_item(ds, f, "PlanePositionSequence")
                ori = _frame_item(ds, f, "PlaneOrientationSequence")
                meas = _frame_item(ds, f, "PixelMeasuresSequence")
                ipp = _floats(pos.get("ImagePositionPatient") if pos else None, 3)
                iop = _floats(ori.get("ImageOrientationPatient") if ori else None, 6)
                ps = _floats(meas.get("PixelSpacing") if meas else None, 2)
                if ipp is None or iop is None or ps is None:
                    raise series.error(NotAnImageError, f"frame {f + 1} lacks plane position/orientation/spacing")
                slices.append(_Slice(i, f, ipp, iop, (ps[0], ps[1]), rows, cols))
        else:
            ipp = _floats(ds.get("ImagePositionPatient"), 3)
            iop = _floats(ds.get("ImageOrientationPatient"), 6)
            ps = _floats(ds.get("PixelSpacing"), 2)
            if ipp is None or iop is None or ps is None:
                raise series.error(NotAnImageError, "instance lacks ImagePositionPatient/ImageOrientationPatient/"
                                                    "PixelSpacing (no image plane geometry)")
            n_frames = int(ds.get("NumberOfFrames", 1) or 1)
            if n_frames != 1:
                raise series.error(NotAnImageError, "multi-frame instance without functional groups")
            slices.append(_Slice(i, None, ipp, iop, (ps[0], ps[1]), rows, cols))
    return slices


def _stack(slices: list[_Slice], series: _Series) -> tuple[list[_Slice], np.ndarray, np.ndarray, float]:
    """Sort and validate; returns (sorted slices, direction matrix (columns r, c, n), origin, slice step)."""
    ref = slices[0]
    for s in slices[1:]:
        if np.max(np.abs(s.orientation - ref.orientation)) > ORIENTATION_TOL:
            distinct: list[np.ndarray] = []
            for x in slices:
                if all(np.max(np.abs(x.orientation - d)) > ORIENTATION_TOL for d in distinct):
                    distinct.append(x.orientation)
            n_distinct = len(distinct)
            raise series.error(MixedOrientationError,
                               f"slices have different ImageOrientationPatient ({n_distinct} distinct)")
        if (s.rows, s.cols) != (ref.rows, ref.cols):
            raise series.error(MixedSizeError, f"slices have different sizes ({ref.rows}x{ref.cols} and "
                                               f"{s.rows}x{s.cols})")
        if not np.allclose(s.spacing, ref.spacing, rtol=1e-4, atol=1e-5):
            raise series.error(MixedSizeError, f"slices have different PixelSpacing ({list(ref.spacing)} and "
                                               f"{list(s.spacing)})")
    row = ref.orientation[:3] / np.linalg.norm(ref.orientation[:3])
    col = ref.orientation[3:] / np.linalg.norm(ref.orientation[3:])
    normal = np.cross(row, col)
    norm = np.linalg.norm(normal)
    if norm < 0.5:
        raise series.error(NotAnImageError, "ImageOrientationPatient row and column directions are not orthogonal")
    normal /= norm

    dist = np.array([float(np.dot(s.position, normal)) for s in slices])
    order = np.argsort(dist, kind="stable")
    slices = [slices[k] for k in order]
    dist = dist[order]
    n_distinct = 1 + int(np.sum(np.diff(dist) > DUPLICATE_TOL_MM))
    if n_distinct == 1:
        raise series.error(SingleSliceError, f"single-slice series: {len(slices)} image(s) at one position, "
                                             "not a volume")
    steps = np.diff(dist)
    if np.any(steps <= DUPLICATE_TOL_MM):
        raise series.error(DuplicatePositionError,
                           f"{len(slices)} images at only {n_distinct} distinct positions (duplicate positions: "
                           "several volumes, echoes or repeats in one series)")
    median = float(np.median(steps))
    if np.any(steps > GAP_FACTOR * median):
        worst = float(np.max(steps))
        raise series.error(MissingSliceError, f"missing slice(s): gap of {worst:.3f} mm between neighbouring "
                                              f"slices, median step {median:.3f} mm")
    step = float((dist[-1] - dist[0]) / (len(slices) - 1))
    if np.max(np.abs(steps - step)) > IRREGULAR_WARN * step:
        log.warning("series %s: irregular slice spacing (steps %.4f..%.4f mm); using the mean %.4f mm",
                    series.uid, float(steps.min()), float(steps.max()), step)
    # Positions must lie on a line along the normal (no in-plane drift / shear).
    origin = slices[0].position
    expected = origin[None, :] + (dist - dist[0])[:, None] * normal[None, :]
    drift = float(np.max(np.linalg.norm(np.array([s.position for s in slices]) - expected, axis=1)))
    if drift > SHEAR_TOL * min(ref.spacing):
        raise series.error(NonOrthogonalStackError, f"slice positions drift {drift:.3f} mm in-plane (sheared or "
                                                  "tilted stack), cannot form a volume")
    direction = np.column_stack([row, col, normal])
    return slices, direction, origin, step


def _build(datasets: list[Dataset]) -> LoadedSeries:
    if not datasets:
        raise SeriesLoadError("no DICOM instances")
    series = _Series(datasets[0])
    uids = {str(ds.get("SeriesInstanceUID", "") or "") for ds in datasets}
    if len(uids) > 1:
        raise series.error(MixedSeriesError, f"files span {len(uids)} SeriesInstanceUIDs")
    fors = {str(ds.get("FrameOfReferenceUID", "") or "") for ds in datasets}
    if len(fors) > 1:
        raise series.error(MixedSizeError, "instances have different FrameOfReferenceUIDs")

    slices, direction, origin, step = _stack(_slices_of(datasets, series), series)
    ref = slices[0]
    volume = np.empty((len(slices), ref.rows, ref.cols), dtype=np.float32)
    where: dict[int, list[tuple[int, int | None]]] = defaultdict(list)
    for k, s in enumerate(slices):
        where[s.instance].append((k, s.frame))
    for i, targets in where.items():
        ds = datasets[i]
        try:
            pixels = read_pixels(ds)
        except SeriesLoadError:
            raise
        except Exception as exc:  # decoder errors: missing plugin, corrupt stream
            raise series.error(SeriesLoadError, f"cannot decode pixel data of instance {i + 1} "
                                                f"({type(exc).__name__}: {exc})") from exc
        if pixels.ndim == 2:
            pixels = pixels[np.newaxis]
        for k, frame in targets:
            volume[k] = pixels[frame or 0]

    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((float(ref.spacing[1]), float(ref.spacing[0]), step))
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetDirection(tuple(float(v) for v in direction.ravel()))

    refs = tuple(
        SourceRef(str(datasets[s.instance].SOPClassUID), str(datasets[s.instance].SOPInstanceUID),
                  None if s.frame is None else s.frame + 1)
        for s in slices)
    first = datasets[ref.instance]
    header = first  # read by this module, so it is ours to strip
    for kw in _PIXEL_KEYWORDS:
        if kw in header:
            delattr(header, kw)
    return LoadedSeries(
        image=image,
        series_instance_uid=series.uid,
        study_instance_uid=str(first.get("StudyInstanceUID", "") or ""),
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "") or ""),
        description=series.description,
        sop_class_uid=str(first.SOPClassUID),
        source_instances=refs,
        header=header,
    )


def load_series(paths: Iterable[str | PathLike[str]]) -> LoadedSeries:
    """Load the files of ONE series (each file read once) into a float32 LPS volume.

    Raises :class:`SeriesLoadError` if a file is not DICOM, the files span several series, or the
    slices do not form one regular volume (see the subclasses).
    """
    datasets = []
    for p in paths:
        path = Path(p)
        ds = _read(path, headers_only=False)
        if ds is None:
            raise SeriesLoadError(f"not a DICOM file: {path.name}")
        datasets.append(ds)
    return _build(datasets)


def load_series_dir(path: str | PathLike[str]) -> LoadedSeries:
    """Load the one series stored under ``path`` (recursive; non-DICOM files skipped with a DEBUG log)."""
    datasets = [ds for f in files_under(Path(path)) if (ds := _read(f, headers_only=False)) is not None]
    if not datasets:
        raise SeriesLoadError(f"no DICOM files under the folder {Path(path).name!r}")
    return _build(datasets)
