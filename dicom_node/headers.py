"""Read DICOM headers, group instances into series and extract the features the series rules need.

Everything here works from headers only (``stop_before_pixels``). The output is a flat
:class:`SeriesFeatures` record of plain types so that the DICOM node can store it as database
columns or JSON and rebuild the very same record later (:meth:`SeriesFeatures.from_dict`).

Classic MR objects and Enhanced MR objects are mapped onto one normalized feature set: an
Enhanced MR Image has no top-level ScanningSequence, SequenceVariant or InversionTime, so those
are derived from EchoPulseSequence, InversionRecovery, InversionTimes and friends found in the
shared and first per-frame functional groups.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError

from pipeline.dicom_basics import files_under, functional_group

log = logging.getLogger(__name__)

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
LEGACY_CONVERTED_ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.4"
ENHANCED_SOP_CLASSES = frozenset(
    {ENHANCED_MR_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_MR_IMAGE_STORAGE, "1.2.840.10008.5.1.4.1.1.4.3"}
)
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"

# Positions closer than this (mm) are the same slice position; scanners write IPP with ~1e-5 jitter.
_POSITION_TOLERANCE_MM = 0.01
# IOP direction cosines that differ by less than this are the same orientation.
_ORIENTATION_TOLERANCE = 1e-3
# A slice whose position strays further than this off the stack normal is not part of a parallel stack.
_STACK_OFFAXIS_TOLERANCE_MM = 0.5
# A normal within ~35 degrees of a patient axis names that plane; beyond it the plane is "oblique".
_PLANE_COSINE = math.cos(math.radians(35.0))

_GE_ACQU_CREATOR = "GEMS_ACQU_01"
_PHILIPS_IMAGING_CREATOR = "Philips Imaging DD 001"

# What pydicom raises converting a malformed raw value (an IS of "INF" overflows int(), an unknown VR
# is NotImplementedError, an unknown character set a LookupError, an FD of 2 bytes BytesLengthException):
# such a header is malformed, not a crash.
_VALUE_ERRORS = (ValueError, TypeError, AttributeError, LookupError, ArithmeticError, NotImplementedError,
                 BytesLengthException)

# Values technologists or scanners put in ContrastBolusAgent that mean "no agent".
_NO_AGENT_VALUES = frozenset({"", "NONE", "NO", "N/A", "NA", "0", "-", "NIL", "NULL", "UNKNOWN"})


@dataclass(frozen=True)
class SeriesFeatures:
    """Normalized per-series header features; flat plain types so it maps to DB columns and JSON."""

    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    modality: str = ""
    manufacturer: str = ""
    manufacturer_model: str = ""
    series_number: int | None = None
    series_description: str = ""
    protocol_name: str = ""
    sequence_name: str = ""  # (0018,0024) SequenceName, e.g. Siemens "*tfl3d1_16ns"
    pulse_sequence_name: str = ""  # (0018,9005) PulseSequenceName (enhanced objects, some Philips classic)
    vendor_sequence_name: str = ""  # GE (0019,109C) pulse sequence, Philips (2001,1020) scanning technique
    scanning_sequence: tuple[str, ...] = ()
    sequence_variant: tuple[str, ...] = ()
    scan_options: tuple[str, ...] = ()
    mr_acquisition_type: str = ""
    image_type: tuple[str, ...] = ()
    echo_pulse_sequence: str = ""
    acquisition_contrast: str = ""
    inversion_recovery: bool = False
    inversion_time: float | None = None
    repetition_time: float | None = None
    echo_time: float | None = None
    flip_angle: float | None = None
    slice_thickness: float | None = None
    spacing_between_slices: float | None = None
    n_instances: int = 1
    n_frames: int = 1
    n_slices: int = 0  # distinct slice positions (per frame for multi-frame objects)
    parallel_stack: bool = False
    orientation: str = ""  # axial / sagittal / coronal / oblique, "" without IOP
    contrast_agent: str = ""
    contrast_administered: bool | None = None  # from the Contrast/Bolus Usage Sequence, None if absent
    acquisition_datetime: str | None = None  # ISO 8601, earliest in the series
    max_b_value: float | None = None
    enhanced: bool = False
    source: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_dataset(
        cls,
        ds: Dataset,
        *,
        n_instances: int = 1,
        n_frames: int | None = None,
        n_slices: int | None = None,
        parallel_stack: bool | None = None,
        acquisition_datetime: str | None = None,
        max_b_value: float | None = None,
        source: Sequence[str] = (),
    ) -> SeriesFeatures:
        """Build features from one instance's header; counts default to what that instance alone shows.

        The DICOM node passes the counts it stored per series (instances, distinct positions,
        whether they stack) so that the features equal what :func:`scan_directory` computes.
        """
        geometry = _instance_geometry(ds)
        own_slices, own_parallel = _stack_properties(geometry.positions, geometry.orientations)
        features = _features_from_dataset(
            ds,
            n_instances=n_instances,
            n_frames=n_frames if n_frames is not None else n_instances * max(1, _int(ds.get("NumberOfFrames")) or 1),
            n_slices=own_slices if n_slices is None else n_slices,
            parallel_stack=own_parallel if parallel_stack is None else parallel_stack,
            orientation=_plane(geometry.orientations[0]) if geometry.orientations else "",
            source=tuple(str(s) for s in source),
        )
        # Series-level aggregates the caller stored override what this one instance shows.
        updates: dict[str, Any] = {}
        if acquisition_datetime is not None:
            updates["acquisition_datetime"] = acquisition_datetime
        if max_b_value is not None:
            updates["max_b_value"] = max_b_value
        return dataclasses.replace(features, **updates) if updates else features

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SeriesFeatures:
        """Inverse of :meth:`to_dict`; unknown keys are rejected so schema drift is loud."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown SeriesFeatures fields: {sorted(unknown)}")
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)

    @property
    def names(self) -> tuple[str, ...]:
        """Every free-text name of the series: description, protocol and sequence names."""
        return tuple(
            n
            for n in (
                self.series_description,
                self.protocol_name,
                self.sequence_name,
                self.pulse_sequence_name,
                self.vendor_sequence_name,
            )
            if n
        )

    @property
    def sequence_names(self) -> tuple[str, ...]:
        """Sequence names from the standard, enhanced and vendor-private attributes."""
        return tuple(n for n in (self.sequence_name, self.pulse_sequence_name, self.vendor_sequence_name) if n)


@dataclass(frozen=True)
class InstanceHeader:
    """One file's identity, geometry and single-instance features, as read from its header."""

    path: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    instance_number: int | None
    positions: tuple[tuple[float, float, float], ...]  # one per frame
    orientations: tuple[tuple[float, ...], ...]  # one per frame (or one shared)
    features: SeriesFeatures


@dataclass(frozen=True)
class _Geometry:
    positions: tuple[tuple[float, float, float], ...]
    orientations: tuple[tuple[float, ...], ...]


# --------------------------------------------------------------------------- reading


def why_not_dicom(path: str | os.PathLike[str]) -> str | None:
    """Return why a file cannot be used as a DICOM instance, or None if it looks like one."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    if len(head) == 132 and head[128:132] == b"DICM":
        return None
    # Old exports omit the Part 10 preamble; let read_instance_features try a forced parse.
    return "no DICM preamble"


def read_instance_features(path: str | os.PathLike[str]) -> InstanceHeader | None:
    """Read one file's header; None (reason logged at DEBUG) when it is not a usable DICOM instance."""
    # pydicom warns about invalid values with the value in the message, which may be a patient
    # name: keep those warnings out of logs and terminals.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _read_instance(str(path))


def _read_instance(path: str) -> InstanceHeader | None:
    reason = why_not_dicom(path)
    if reason is not None and reason != "no DICM preamble":
        log.debug("skip %s: %s", path, reason)
        return None
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=reason is not None)
    except (InvalidDicomError, OSError, EOFError, *_VALUE_ERRORS) as exc:
        log.debug("skip %s: not DICOM (%s)", path, type(exc).__name__)
        return None
    try:
        sop_class = str(ds.get("SOPClassUID", "") or "")
    except _VALUE_ERRORS as exc:
        log.debug("skip %s: unreadable SOPClassUID (%s)", path, type(exc).__name__)
        return None
    if reason is not None and not sop_class:
        # A forced parse of random bytes "succeeds" with garbage; require the basic identity.
        log.debug("skip %s: no DICM preamble and no SOPClassUID", path)
        return None
    try:
        return instance_header_from_dataset(ds, path)
    except MalformedHeaderError as exc:
        # Malformed values inside an otherwise valid file: skip it rather than abort a whole scan.
        log.warning("skip %s: %s", path, exc)
    except ValueError as exc:
        log.debug("skip %s: %s", path, exc)
    return None


class MalformedHeaderError(ValueError):
    """A header whose values cannot be read into features (raised by :func:`instance_header_from_dataset`)."""


def instance_header_from_dataset(ds: Dataset, path: str, series: SeriesFeatures | None = None) -> InstanceHeader:
    """Build the :class:`InstanceHeader` of an already-read dataset (pixel data not needed).

    ``path`` is recorded as the instance's path and source. ``series``: the features of an earlier
    instance of the same series; then only the per-instance values (geometry, acquisition time,
    b-value, frames) are read, which is what the receiver needs at network speed (the series-level
    features come from the first instance, as :func:`group_series` does). Raises ``ValueError`` with
    a short reason when the dataset cannot be used as an instance: a DICOMDIR, no SeriesInstanceUID,
    or (:class:`MalformedHeaderError`) values that cannot be read into features.
    """
    try:
        sop_class = str(ds.get("SOPClassUID", "") or "")
        is_dicomdir = sop_class == _DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds
        series_uid = str(ds.get("SeriesInstanceUID", "") or "")
    except _VALUE_ERRORS as exc:
        raise MalformedHeaderError(f"malformed header ({type(exc).__name__}: {exc})") from exc
    if is_dicomdir:
        raise ValueError("DICOMDIR")
    if not series_uid:
        raise ValueError("no SeriesInstanceUID")
    try:
        geometry = _instance_geometry(ds)
        n_frames = max(1, _int(ds.get("NumberOfFrames")) or 1)
        if series is not None and series.series_instance_uid == series_uid:
            features = dataclasses.replace(series, n_frames=n_frames, acquisition_datetime=_acquisition_datetime(ds),
                                           max_b_value=_b_value(ds), source=(path,))
        else:
            n_slices, parallel = _stack_properties(geometry.positions, geometry.orientations)
            features = _features_from_dataset(
                ds,
                n_instances=1,
                n_frames=n_frames,
                n_slices=n_slices,
                parallel_stack=parallel,
                orientation=_plane(geometry.orientations[0]) if geometry.orientations else "",
                source=(path,),
            )
        sop_uid = str(ds.get("SOPInstanceUID", "") or "")
        instance_number = _int(ds.get("InstanceNumber"))
    except _VALUE_ERRORS as exc:
        raise MalformedHeaderError(f"malformed header ({type(exc).__name__}: {exc})") from exc
    return InstanceHeader(
        path=path,
        sop_instance_uid=sop_uid,
        study_instance_uid=features.study_instance_uid,
        series_instance_uid=series_uid,
        instance_number=instance_number,
        positions=geometry.positions,
        orientations=geometry.orientations,
        features=features,
    )


def scan_directory(root: str | os.PathLike[str]) -> list[SeriesFeatures]:
    """Read every DICOM file under root and return one SeriesFeatures per SeriesInstanceUID.

    Grouping is by SeriesInstanceUID only: SeriesNumber and SeriesDescription are not unique
    (a Siemens ASL map and its secondary capture share both).
    """
    headers = [h for h in (read_instance_features(p) for p in files_under(root)) if h is not None]
    return group_series(headers)


def group_series(headers: Iterable[InstanceHeader]) -> list[SeriesFeatures]:
    """Group instance headers by SeriesInstanceUID and aggregate counts and geometry."""
    by_series: dict[str, list[InstanceHeader]] = defaultdict(list)
    for h in headers:
        by_series[h.series_instance_uid].append(h)
    out: list[SeriesFeatures] = []
    for items in by_series.values():
        # Duplicate SOPInstanceUIDs (a file received twice) must not inflate the counts.
        unique: dict[str, InstanceHeader] = {}
        for h in sorted(items, key=lambda h: (h.instance_number is None, h.instance_number or 0, h.path)):
            unique.setdefault(h.sop_instance_uid or h.path, h)
        members = list(unique.values())
        first = members[0].features
        positions = [p for h in members for p in h.positions]
        orientations = [o for h in members for o in h.orientations]
        n_slices, parallel = _stack_properties(positions, orientations)
        times = [h.features.acquisition_datetime for h in members if h.features.acquisition_datetime]
        b_values = [h.features.max_b_value for h in members if h.features.max_b_value is not None]
        out.append(
            dataclasses.replace(
                first,
                n_instances=len(members),
                n_frames=sum(h.features.n_frames for h in members),
                n_slices=n_slices,
                parallel_stack=parallel,
                acquisition_datetime=min(times) if times else None,
                max_b_value=max(b_values) if b_values else None,
                source=tuple(h.path for h in members),
            )
        )
    out.sort(
        key=lambda f: (f.study_instance_uid, f.acquisition_datetime or "", f.series_number or 0, f.series_instance_uid)
    )
    return out


# --------------------------------------------------------------------------- feature extraction


def _features_from_dataset(
    ds: Dataset,
    *,
    n_instances: int,
    n_frames: int,
    n_slices: int,
    parallel_stack: bool,
    orientation: str,
    source: tuple[str, ...],
) -> SeriesFeatures:
    sop_class = str(ds.get("SOPClassUID", "") or "")
    enhanced = sop_class in ENHANCED_SOP_CLASSES or "SharedFunctionalGroupsSequence" in ds
    manufacturer = _str(ds.get("Manufacturer"))

    scanning_sequence = _multi(ds.get("ScanningSequence"))
    sequence_variant = _multi(ds.get("SequenceVariant"))
    scan_options = _multi(ds.get("ScanOptions"))
    echo_pulse = _str(ds.get("EchoPulseSequence")) or _str(
        _fg(ds, "MRTimingAndRelatedParametersSequence", "EchoPulseSequence")
    )
    inversion_flag = _str(ds.get("InversionRecovery")) or _str(_fg(ds, "MRModifierSequence", "InversionRecovery"))
    if enhanced and not scanning_sequence:
        scanning_sequence, sequence_variant = _enhanced_sequence_codes(ds, echo_pulse, inversion_flag)

    inversion_time = _float(ds.get("InversionTime"))
    if inversion_time is None:
        inversion_time = _first_float(_fg(ds, "MRModifierSequence", "InversionTimes"))
    repetition_time = _classic_or_enhanced(ds, "RepetitionTime", "MRTimingAndRelatedParametersSequence")
    echo_time = _classic_or_enhanced(ds, "EchoTime", "MREchoSequence", "EffectiveEchoTime")
    flip_angle = _classic_or_enhanced(ds, "FlipAngle", "MRTimingAndRelatedParametersSequence")
    slice_thickness = _classic_or_enhanced(ds, "SliceThickness", "PixelMeasuresSequence")
    spacing = _classic_or_enhanced(ds, "SpacingBetweenSlices", "PixelMeasuresSequence")

    image_type = _multi(ds.get("ImageType"))
    frame_type = _multi(_fg(ds, "MRImageFrameTypeSequence", "FrameType"))
    if frame_type and (not image_type or "MIXED" in image_type):
        image_type = frame_type
    acquisition_contrast = _str(ds.get("AcquisitionContrast")) or _str(
        _fg(ds, "MRImageFrameTypeSequence", "AcquisitionContrast")
    )

    inversion_recovery = (
        "IR" in scanning_sequence
        or "IR" in scan_options
        or "IR_GEMS" in scan_options
        or inversion_flag.upper() == "YES"
        or (inversion_time is not None and inversion_time > 0)
    )

    return SeriesFeatures(
        study_instance_uid=_str(ds.get("StudyInstanceUID")),
        series_instance_uid=_str(ds.get("SeriesInstanceUID")),
        sop_class_uid=sop_class,
        modality=_str(ds.get("Modality")),
        manufacturer=manufacturer,
        manufacturer_model=_str(ds.get("ManufacturerModelName")),
        series_number=_int(ds.get("SeriesNumber")),
        series_description=_str(ds.get("SeriesDescription")),
        protocol_name=_str(ds.get("ProtocolName")),
        sequence_name=_str(ds.get("SequenceName")),
        pulse_sequence_name=_str(ds.get("PulseSequenceName")),
        vendor_sequence_name=_vendor_sequence_name(ds, manufacturer),
        scanning_sequence=scanning_sequence,
        sequence_variant=sequence_variant,
        scan_options=scan_options,
        mr_acquisition_type=_str(ds.get("MRAcquisitionType")).upper(),
        image_type=image_type,
        echo_pulse_sequence=echo_pulse.upper(),
        acquisition_contrast=acquisition_contrast.upper(),
        inversion_recovery=inversion_recovery,
        inversion_time=inversion_time,
        repetition_time=repetition_time,
        echo_time=echo_time,
        flip_angle=flip_angle,
        slice_thickness=slice_thickness,
        spacing_between_slices=spacing,
        n_instances=n_instances,
        n_frames=n_frames,
        n_slices=n_slices,
        parallel_stack=parallel_stack,
        orientation=orientation,
        contrast_agent=_contrast_agent(ds),
        contrast_administered=_contrast_administered(ds),
        acquisition_datetime=_acquisition_datetime(ds),
        max_b_value=_b_value(ds),
        enhanced=enhanced,
        source=source,
    )


def _enhanced_sequence_codes(
    ds: Dataset, echo_pulse: str, inversion_flag: str
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Map Enhanced MR sequence attributes onto classic ScanningSequence / SequenceVariant codes."""
    ss: list[str] = []
    ep = echo_pulse.upper()
    if ep in ("SPIN", "BOTH"):
        ss.append("SE")
    if ep in ("GRADIENT", "BOTH"):
        ss.append("GR")
    if inversion_flag.upper() == "YES":
        ss.append("IR")
    if _str(ds.get("EchoPlanarPulseSequence")).upper() == "YES":
        ss.append("EP")
    sv: list[str] = []
    if _str(ds.get("SegmentedKSpaceTraversal")).upper() in ("PARTIAL", "FULL"):
        sv.append("SK")
    if _str(ds.get("SteadyStatePulseSequence")).upper() not in ("", "NONE"):
        sv.append("SS")
    if _str(_fg(ds, "MRModifierSequence", "Spoiling")).upper() in ("RF", "GRADIENT", "RF_AND_GRADIENT"):
        sv.append("SP")
    if inversion_flag.upper() == "YES" or _str(_fg(ds, "MRModifierSequence", "T2Preparation")).upper() == "YES":
        sv.append("MP")
    if _str(ds.get("OversamplingPhase")).upper() not in ("", "NONE"):
        sv.append("OSP")
    return tuple(ss), tuple(sv)


def _vendor_sequence_name(ds: Dataset, manufacturer: str) -> str:
    """GE private pulse-sequence name (0019,109C) or Philips scanning technique (2001,1020)."""
    for group, creator, offset in ((0x0019, _GE_ACQU_CREATOR, 0x9C), (0x2001, _PHILIPS_IMAGING_CREATOR, 0x20)):
        try:
            value = _str(ds.private_block(group, creator)[offset].value)
        except (KeyError, ValueError):
            value = ""
        if value:
            return value
    # Some exports strip private creators but keep the element at its usual slot.
    m = manufacturer.upper()
    if m.startswith("GE") and (0x0019, 0x109C) in ds:
        return _str(ds[0x0019, 0x109C].value)
    if "PHILIPS" in m and (0x2001, 0x1020) in ds:
        return _str(ds[0x2001, 0x1020].value)
    return ""


def _contrast_agent(ds: Dataset) -> str:
    """ContrastBolusAgent text or the first agent code meaning; "" when absent or a 'none' placeholder."""
    agent = _str(ds.get("ContrastBolusAgent"))
    if agent.upper() in _NO_AGENT_VALUES:
        agent = ""
    if not agent:
        for item in ds.get("ContrastBolusAgentSequence") or ():
            meaning = _str(item.get("CodeMeaning")) or _str(item.get("CodeValue"))
            if meaning and meaning.upper() not in _NO_AGENT_VALUES:
                return meaning
    return agent


def _contrast_administered(ds: Dataset) -> bool | None:
    """True/False from ContrastBolusAgentAdministered in the Contrast/Bolus Usage Sequence, else None."""
    usage = _fg(ds, "ContrastBolusUsageSequence", None) or ds.get("ContrastBolusUsageSequence")
    if not usage:
        return None
    answers = [_str(item.get("ContrastBolusAgentAdministered")).upper() for item in usage]
    if "YES" in answers:
        return True
    if answers and all(a == "NO" for a in answers):
        return False
    return None


def _acquisition_datetime(ds: Dataset) -> str | None:
    """Earliest known acquisition moment as ISO 8601; falls back to series then content time."""
    raw = _str(ds.get("AcquisitionDateTime")) or _str(_fg(ds, "FrameContentSequence", "FrameAcquisitionDateTime"))
    if raw:
        return _iso(raw[:8], raw[8:])
    for date_kw, time_kw in (
        ("AcquisitionDate", "AcquisitionTime"),
        ("SeriesDate", "SeriesTime"),
        ("ContentDate", "ContentTime"),
    ):
        t = _str(ds.get(time_kw))
        d = _str(ds.get(date_kw)) or _str(ds.get("StudyDate"))
        if t:
            return _iso(d, t)
    return None


def _iso(date: str, time: str) -> str | None:
    """'20230113', '193647.295' -> '2023-01-13T19:36:47.295000' (no timezone; study-local comparisons only)."""
    date = date.strip()
    time = time.strip().split("+")[0].split("-")[0]
    if time and not time.replace(".", "").isdigit():
        return None
    hh, mm, ss = time[0:2] or "00", time[2:4] or "00", time[4:6] or "00"
    frac = time.split(".")[1] if "." in time else ""
    frac = (frac + "000000")[:6]
    day = f"{date[0:4]}-{date[4:6]}-{date[6:8]}" if len(date) >= 8 and date[:8].isdigit() else "0000-00-00"
    return f"{day}T{hh}:{mm}:{ss}.{frac}"


def _b_value(ds: Dataset) -> float | None:
    b = _float(ds.get("DiffusionBValue"))
    if b is None:
        b = _float(_fg(ds, "MRDiffusionSequence", "DiffusionBValue"))
    return b


# --------------------------------------------------------------------------- geometry


def _instance_geometry(ds: Dataset) -> _Geometry:
    """Slice positions and orientations of every frame (classic: one)."""
    positions: list[tuple[float, float, float]] = []
    orientations: list[tuple[float, ...]] = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame:
        shared = _first(ds.get("SharedFunctionalGroupsSequence"))
        shared_iop = _iop_from_group(shared)
        for item in per_frame:
            pos = _first(item.get("PlanePositionSequence"))
            ipp = _vector(pos.get("ImagePositionPatient")) if pos is not None else None
            if ipp is not None and len(ipp) == 3:
                positions.append((ipp[0], ipp[1], ipp[2]))
            iop = _iop_from_group(item) or shared_iop
            if iop is not None:
                orientations.append(iop)
    else:
        ipp = _vector(ds.get("ImagePositionPatient"))
        if ipp is not None and len(ipp) == 3:
            positions.append((ipp[0], ipp[1], ipp[2]))
        classic_iop = _vector(ds.get("ImageOrientationPatient"))
        if classic_iop is not None and len(classic_iop) == 6:
            orientations.append(tuple(classic_iop))
    return _Geometry(tuple(positions), tuple(orientations))


def _iop_from_group(group: Dataset | None) -> tuple[float, ...] | None:
    if group is None:
        return None
    item = _first(group.get("PlaneOrientationSequence"))
    iop = _vector(item.get("ImageOrientationPatient")) if item is not None else None
    return tuple(iop) if iop is not None and len(iop) == 6 else None


def _stack_properties(
    positions: Sequence[tuple[float, float, float]], orientations: Sequence[tuple[float, ...]]
) -> tuple[int, bool]:
    """(number of distinct positions, whether they form one parallel stack along the slice normal)."""
    distinct: list[tuple[float, float, float]] = []
    for p in positions:
        if not any(all(abs(a - b) <= _POSITION_TOLERANCE_MM for a, b in zip(p, q, strict=True)) for q in distinct):
            distinct.append(p)
    n = len(distinct)
    if n < 2 or not orientations:
        return n, False
    ref = orientations[0]
    if any(max(abs(a - b) for a, b in zip(o, ref, strict=True)) > _ORIENTATION_TOLERANCE for o in orientations):
        return n, False
    normal = _cross(ref[:3], ref[3:])
    p0 = distinct[0]
    for p in distinct[1:]:
        d = [a - b for a, b in zip(p, p0, strict=True)]
        along = sum(a * b for a, b in zip(d, normal, strict=True))
        off = math.sqrt(max(0.0, sum(x * x for x in d) - along * along))
        if off > _STACK_OFFAXIS_TOLERANCE_MM:
            return n, False
    return n, True


def _plane(iop: Sequence[float]) -> str:
    """Name the acquisition plane from the slice normal: axial, sagittal, coronal or oblique."""
    if len(iop) != 6:
        return ""
    normal = _cross(iop[:3], iop[3:])
    norm = math.sqrt(sum(x * x for x in normal)) or 1.0
    comps = [abs(x) / norm for x in normal]
    axis = max(range(3), key=lambda i: comps[i])
    if comps[axis] < _PLANE_COSINE:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def _cross(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


# --------------------------------------------------------------------------- value helpers


def _classic_or_enhanced(ds: Dataset, keyword: str, sequence: str, group_keyword: str | None = None) -> float | None:
    """A numeric classic top-level attribute, else its Enhanced MR functional-group counterpart."""
    value = _float(ds.get(keyword))
    return value if value is not None else _float(_fg(ds, sequence, group_keyword or keyword))


def _fg(ds: Dataset, sequence: str, keyword: str | None) -> Any:
    """Attribute ``keyword`` of functional group macro ``sequence`` of the first frame (see
    :func:`pipeline.io.functional_group`); with keyword None, the macro sequence itself (e.g.
    ContrastBolusUsageSequence)."""
    macro = functional_group(ds, sequence)
    if keyword is None:
        return macro
    item = _first(macro)
    return item.get(keyword) if item is not None and keyword in item else None


def _first(seq: Any) -> Dataset | None:
    try:
        return seq[0] if seq else None
    except (TypeError, IndexError):
        return None


def _value(v: Any) -> Any:
    return v.value if hasattr(v, "value") and hasattr(v, "tag") else v


def _str(v: Any) -> str:
    v = _value(v)
    if v is None:
        return ""
    if isinstance(v, bytes):
        v = v.decode("latin-1", errors="replace")
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        return "\\".join(str(x) for x in v).strip(" \x00")
    return str(v).strip(" \x00")


def _multi(v: Any) -> tuple[str, ...]:
    """Multi-valued CS as upper-case tuple; tolerates a single backslash-joined string."""
    v = _value(v)
    if v is None or v == "":
        return ()
    if isinstance(v, bytes):
        v = v.decode("latin-1", errors="replace")
    items = v.split("\\") if isinstance(v, str) else [str(x) for x in v]
    return tuple(s.strip().upper() for s in items if s and s.strip())


def _float(v: Any) -> float | None:
    v = _value(v)
    if v is None or v == "":
        return None
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        return _first_float(v)
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _first_float(v: Any) -> float | None:
    v = _value(v)
    if v is None or v == "":
        return None
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        return _float(v[0]) if len(v) else None
    return _float(v)


def _int(v: Any) -> int | None:
    f = _float(v)
    return int(f) if f is not None else None


def _vector(v: Any) -> list[float] | None:
    v = _value(v)
    if v is None or v == "":
        return None
    try:
        return [float(x) for x in v]
    except (TypeError, ValueError):
        return None
