"""Issue #8: property-based fuzzing (hypothesis) of the header parser and the rules engine.

What may go wrong is documented, and nothing else may:

- :func:`dicom_node.receiver.read_header` on received bytes raises (the receiver answers 0xC210 for
  any exception); on what it returns, :func:`~dicom_node.receiver.content_problem` never raises, and
  :func:`~dicom_node.headers.instance_header_from_dataset` raises only ``ValueError`` (its
  ``MalformedHeaderError`` included); the features it returns survive the JSON round trip the index
  makes.
- :func:`dicom_node.headers.read_instance_features` on any file returns a header or None.
- :func:`dicom_node.rules.assign_roles` / :func:`~dicom_node.rules.classify_series` on any feature
  values return a decision for every series and never raise.

Bounded for CI: the ``ci`` profile is derandomized (the same examples every run, whatever
``--hypothesis-seed``) with a fixed number of examples and a per-example deadline, a few seconds per
test on one core. ``DICOM_NODE_FUZZ=long`` runs a randomized search of 3000 examples per test (minutes) locally.
"""

from __future__ import annotations

import json
import math
import os
import struct
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.uid import MRImageStorage

from dicom_node.headers import (
    SeriesFeatures,
    instance_header_from_dataset,
    read_instance_features,
)
from dicom_node.receiver import content_problem, file_meta_bytes, read_header
from dicom_node.rules import StudyAssignment, assign_roles, classify_series, load_rules

settings.register_profile("ci", max_examples=150, deadline=timedelta(seconds=2), derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
                          print_blob=True)
settings.register_profile("long", parent=settings.get_profile("ci"), max_examples=3000, derandomize=False)
PROFILE = settings.get_profile(os.environ.get("DICOM_NODE_FUZZ", "ci"))

RULES = load_rules()
EXPLICIT_LE = "1.2.840.10008.1.2.1"

# Every attribute the feature extraction reads, plus the identity and pixel module.
KEYWORDS = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "Manufacturer",
    "ManufacturerModelName", "SeriesNumber", "InstanceNumber", "SeriesDescription", "ProtocolName", "SequenceName",
    "PulseSequenceName", "ScanningSequence", "SequenceVariant", "ScanOptions", "MRAcquisitionType", "ImageType",
    "EchoPulseSequence", "AcquisitionContrast", "InversionRecovery", "InversionTime", "RepetitionTime", "EchoTime",
    "FlipAngle", "SliceThickness", "SpacingBetweenSlices", "NumberOfFrames", "ImagePositionPatient",
    "ImageOrientationPatient", "ContrastBolusAgent", "AcquisitionDate", "AcquisitionTime", "AcquisitionDateTime",
    "SeriesDate", "SeriesTime", "ContentDate", "ContentTime", "DiffusionBValue", "Rows", "Columns",
    "BitsAllocated", "SamplesPerPixel", "PatientID",
)
SEQUENCES = ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence", "PlanePositionSequence",
             "PlaneOrientationSequence", "MRTimingAndRelatedParametersSequence", "ContrastBolusUsageSequence",
             "MRDiffusionSequence", "ContrastBolusAgentSequence")
_TAGS = {k: tag_for_keyword(k) for k in (*KEYWORDS, *SEQUENCES)}
_LONG_VRS = {"OB", "OW", "OF", "OD", "OL", "OV", "SQ", "UC", "UN", "UR", "UT"}

# Text that looks like DICOM values (numbers, multi-values, dates, UIDs) and some that does not.
value_text = st.one_of(
    st.text(alphabet="0123456789.-+eE\\ ", max_size=24),
    st.text(max_size=16),
    st.sampled_from(["NaN", "inf", "-inf", "1e999", "", "\\", "1\\2\\3", "0\\0\\0\\0\\0\\0", "YES", "NONE",
                     MRImageStorage, "20240230", "256060", "9" * 40]),
)


def _element(tag: int, vr: str, value: bytes) -> bytes:
    if len(value) % 2:
        value += b" "
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode()
    if vr in _LONG_VRS:
        return head + struct.pack("<HI", 0, len(value)) + value
    return head + struct.pack("<H", len(value) & 0xFFFF) + value[:0xFFFF]


def _value(vr: str, text: str, raw: bytes, use_raw: bool) -> bytes:
    if use_raw:
        return raw
    if vr in ("US", "UL", "SS", "SL", "FL", "FD"):
        size = {"US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "FD": 8}[vr]
        return raw[: size * max(1, len(raw) // size)] if len(raw) >= size else raw.ljust(size, b"\x00")
    return text.encode("utf-8", "replace")


@st.composite
def elements(draw: st.DrawFn, depth: int = 0) -> bytes:
    """An explicit VR little endian data set of feature attributes with arbitrary values, sorted by tag
    (some unsorted or repeated on purpose), with functional-group sequences nested up to two levels."""
    out: list[tuple[int, bytes]] = []
    for keyword in draw(st.lists(st.sampled_from(KEYWORDS), max_size=12)):
        tag = _TAGS[keyword]
        vr = dictionary_VR(tag).split(" ")[0]
        out.append((tag, _element(tag, vr, _value(vr, draw(value_text), draw(st.binary(max_size=24)),
                                                  draw(st.booleans())))))
    if depth < 2:
        for keyword in draw(st.lists(st.sampled_from(SEQUENCES), max_size=3)):
            items = draw(st.lists(elements(depth + 1), max_size=2))
            body = b"".join(struct.pack("<HHI", 0xFFFE, 0xE000, len(i)) + i for i in items)
            out.append((_TAGS[keyword], _element(_TAGS[keyword], "SQ", body)))
    ordered = sorted(out, key=lambda t: t[0]) if draw(st.booleans()) or depth else out
    return b"".join(e for _, e in ordered)


def _json_equal(f: SeriesFeatures) -> bool:
    return SeriesFeatures.from_dict(json.loads(json.dumps(f.to_dict(), allow_nan=False))) == f


@settings(PROFILE)
@given(stream=elements(), pixels=st.one_of(st.none(), st.binary(max_size=64)))
def test_header_parser_on_arbitrary_attribute_values(stream: bytes, pixels: bytes | None) -> None:
    if pixels is not None:
        stream += _element(0x7FE00010, "OW", pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            header = read_header(stream, EXPLICIT_LE)
        except Exception:
            return
        for routable in (True, False):
            problem = content_problem(header, EXPLICIT_LE, routable)
            assert problem is None or isinstance(problem, str)
        try:
            h = instance_header_from_dataset(header.dataset, "x.dcm")
        except ValueError:
            return
    assert _json_equal(h.features)
    assert all(math.isfinite(v) for p in h.positions for v in p)


@settings(PROFILE)
@given(data=st.binary(max_size=512), preamble=st.booleans(), prefix=elements())
def test_read_instance_features_on_arbitrary_files(tmp_path: Path, data: bytes, preamble: bool, prefix: bytes) -> None:
    path = tmp_path / "fuzz.dcm"
    body = prefix + data
    path.write_bytes(file_meta_bytes(MRImageStorage, "1.2.3", EXPLICIT_LE, "FUZZ") + body if preamble else body)
    h = read_instance_features(path)
    assert h is None or _json_equal(h.features)


finite = st.floats(allow_nan=False, allow_infinity=False, width=32)
optional_number = st.one_of(st.none(), finite, st.sampled_from([0.0, -1.0, 1e30]))
codes = st.lists(st.sampled_from(["SE", "GR", "IR", "EP", "SP", "MP", "SK", "OSP", "ORIGINAL", "DERIVED", "PRIMARY",
                                  "M", "MPR", "LOCALIZER", "FS", "IR_GEMS", "EPI_GEMS", ""]), max_size=4).map(tuple)
free_text = st.one_of(st.text(max_size=20), st.sampled_from(
    ["AX T1 POST", "FLAIR", "3D BRAVO +C", "CUBE T1 pre", "Sag T1", "DWI", "ADC", "localizer", "*tfl3d1_16ns",
     "T1 FSE +GAD", "no contrast", "C+", "Ax T2 FLAIR", "mprage_gd", "(", "[", "\\"]))


@st.composite
def features(draw: st.DrawFn, study: str) -> SeriesFeatures:
    return SeriesFeatures(
        study_instance_uid=study,
        series_instance_uid=draw(st.sampled_from(["1.2.3.1", "1.2.3.2", "1.2.3.3", "1.2.3.4", "1.2.3.5"])),
        sop_class_uid=draw(st.sampled_from([MRImageStorage, "1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.7",
                                            "", "not a uid"])),
        modality=draw(st.sampled_from(["MR", "CT", "SR", "OT", ""])),
        manufacturer=draw(st.sampled_from(["GE MEDICAL SYSTEMS", "SIEMENS", "Philips", "", "x"])),
        series_number=draw(st.one_of(st.none(), st.integers(-5, 10_000))),
        **{k: draw(free_text) for k in ("series_description", "protocol_name", "sequence_name", "pulse_sequence_name",
                                        "vendor_sequence_name", "contrast_agent")},
        **{k: draw(codes) for k in ("scanning_sequence", "sequence_variant", "scan_options", "image_type")},
        **{k: draw(optional_number) for k in ("inversion_time", "repetition_time", "echo_time", "flip_angle",
                                              "slice_thickness", "spacing_between_slices", "max_b_value")},
        **{k: draw(st.integers(0, 2000)) for k in ("n_instances", "n_frames", "n_slices")},
        mr_acquisition_type=draw(st.sampled_from(["2D", "3D", "", "4D"])),
        echo_pulse_sequence=draw(st.sampled_from(["GRADIENT", "SPIN", "BOTH", ""])),
        acquisition_contrast=draw(st.sampled_from(["T1", "T2", "FLAIR", "PROTON_DENSITY", "DIFFUSION", ""])),
        inversion_recovery=draw(st.booleans()),
        parallel_stack=draw(st.booleans()),
        orientation=draw(st.sampled_from(["axial", "sagittal", "coronal", "oblique", ""])),
        contrast_administered=draw(st.one_of(st.none(), st.booleans())),
        acquisition_datetime=draw(st.one_of(st.none(), st.sampled_from(
            ["2024-01-01T10:00:00", "2024-01-01T10:05:00", "2024-01-01T09:00:00", "", "garbage"]))),
        enhanced=draw(st.booleans()),
    )


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the fuzzed "not a uid" SOP class
@settings(PROFILE)
@given(series=st.lists(features("1.2.3"), max_size=6, unique_by=lambda f: f.series_instance_uid))
def test_rules_engine_on_arbitrary_feature_values(series: list[SeriesFeatures]) -> None:
    assignment = assign_roles(series, RULES)
    assert isinstance(assignment, StudyAssignment)
    assert [d.series_instance_uid for d in assignment.decisions] == [f.series_instance_uid for f in series]
    uids = {f.series_instance_uid for f in series}
    assert all(c.series_instance_uid in uids for c in assignment.chosen.values())
    assert set(assignment.chosen) | set(assignment.missing_roles) == set(RULES.roles)
    json.dumps(assignment.to_dict())  # the router stores it as JSON
    for f in series:
        assert classify_series(f, RULES, series).series_instance_uid == f.series_instance_uid

