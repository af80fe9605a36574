"""Header reading, series grouping and feature extraction, on the real scanner corpus and on small files."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_node.headers import (
    SeriesFeatures,
    group_series,
    read_instance_features,
    scan_directory,
    why_not_dicom,
)

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-dicom"
needs_real = pytest.mark.skipif(not (REAL / "manifest.json").is_file(), reason="shared/data/real-dicom not checked out")


@pytest.fixture(scope="module")
def real() -> dict[str, SeriesFeatures]:
    """Every real series once per module, keyed by its folder relative to the corpus root."""
    if not (REAL / "manifest.json").is_file():
        pytest.skip("shared/data/real-dicom not checked out")
    by_folder: dict[str, SeriesFeatures] = {}
    for f in scan_directory(REAL):
        folders = {str(Path(p).parent.relative_to(REAL)) for p in f.source}
        assert len(folders) == 1, f"series {f.series_instance_uid} spans folders {folders}"
        by_folder[folders.pop()] = f
    return by_folder


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((REAL / "manifest.json").read_text())


# --------------------------------------------------------------------------- real corpus


@needs_real
def test_one_series_per_manifest_entry_grouped_by_uid(real: dict[str, SeriesFeatures], manifest: dict) -> None:
    expected = {s["path"]: s for s in manifest["series"]}
    assert set(real) == set(expected)
    for path, entry in expected.items():
        f = real[path]
        assert f.series_instance_uid == entry["series_instance_uid"]
        assert f.study_instance_uid == entry["study_instance_uid"]
        assert f.n_instances == entry["n_files"], path
        assert f.series_description == entry["series_description"]
    assert sum(len(f.source) for f in real.values()) == 643


@needs_real
def test_same_number_and_description_stay_separate(real: dict[str, SeriesFeatures]) -> None:
    mr = real["dcm_qa_xa30i/19001_Perfusion_Weighted_MR"]
    sc = real["dcm_qa_xa30i/19001_Perfusion_Weighted_SC"]
    assert (
        (mr.series_number, mr.series_description)
        == (sc.series_number, sc.series_description)
        == (
            19001,
            "Perfusion_Weighted",
        )
    )
    assert mr.series_instance_uid != sc.series_instance_uid
    assert sc.sop_class_uid == "1.2.840.10008.5.1.4.1.1.7" and sc.modality == "MR"
    assert sc.n_slices == 0 and sc.orientation == "" and not sc.parallel_stack
    assert mr.inversion_time == 1800.0 and mr.image_type[0] == "DERIVED"


@needs_real
def test_slice_positions_and_stacks_match_manifest(real: dict[str, SeriesFeatures], manifest: dict) -> None:
    for entry in manifest["series"]:
        f = real[entry["path"]]
        # The manifest writes null where a series has no ImagePositionPatient (SC, SR).
        assert f.n_slices == (entry.get("n_distinct_positions") or 0), entry["path"]
    assert real["dcm_qa_ge/01_Ax_DWI_TENSOR_R2"].n_slices == 2  # 2 positions x 7 volumes
    ts = real["dcm_qa_ts/ax_asc_35sl"]
    assert (ts.n_instances, ts.n_slices, ts.parallel_stack) == (9, 1, False)
    mpr = real["dcm_qa_xa30i/2001_AAHead_Scout"]
    assert (mpr.n_slices, mpr.parallel_stack) == (5, False)  # 4 distinct IOPs
    for path in ("dcm_qa_deident/10_Accelerated_SAG_IR-SPGR", "dcm_qa_xa30i/1001_AAHead_Scout"):
        assert real[path].parallel_stack


@needs_real
def test_orientation_plane(real: dict[str, SeriesFeatures]) -> None:
    assert real["dcm_qa_deident/10_Accelerated_SAG_IR-SPGR"].orientation == "sagittal"
    assert real["dcm_qa_xa30/6_anat-T1w_acq-tfl"].orientation == "sagittal"
    # 13.2 degrees off z is still an (oblique) axial acquisition.
    assert real["dcm_qa_ge/05_3D_Ax_T1_MP_RAGE_R22"].orientation == "axial"
    assert real["dcm_qa_ge/01_Ax_DWI_TENSOR_R2"].orientation == "axial"


@needs_real
def test_ge_private_pulse_sequence_and_files_without_extension(real: dict[str, SeriesFeatures]) -> None:
    irspgr = real["dcm_qa_deident/10_Accelerated_SAG_IR-SPGR"]
    assert irspgr.vendor_sequence_name == "efgre3d"
    assert irspgr.protocol_name == "" and irspgr.sequence_name == ""
    assert irspgr.scanning_sequence == ("GR",) and irspgr.sequence_variant == ("SS", "SP", "SK")
    assert irspgr.inversion_time == 400.0 and irspgr.inversion_recovery  # IR only shows in TI
    mprage = real["dcm_qa_ge/05_3D_Ax_T1_MP_RAGE_R22"]
    assert mprage.vendor_sequence_name == "MP-RAGE"
    assert mprage.scanning_sequence == ("RM", "IR") and "IR_GEMS" in mprage.scan_options
    assert mprage.n_instances == 130 and not any(p.endswith(".dcm") for p in mprage.source)


@needs_real
def test_enhanced_maps_to_the_same_features_as_its_classic_twin(real: dict[str, SeriesFeatures]) -> None:
    classic = real["dcm_qa_xa30i/6001_anat-T1w_acq-tfl"]
    enhanced = real["dcm_qa_xa30/6_anat-T1w_acq-tfl"]
    assert enhanced.enhanced and not classic.enhanced
    assert (enhanced.n_instances, enhanced.n_frames) == (1, 96)
    for name in (
        "mr_acquisition_type",
        "inversion_time",
        "inversion_recovery",
        "repetition_time",
        "echo_time",
        "flip_angle",
        "slice_thickness",
        "n_slices",
        "parallel_stack",
        "orientation",
        "series_description",
    ):
        assert getattr(enhanced, name) == getattr(classic, name), name
    assert enhanced.pulse_sequence_name == classic.sequence_name == "*tfl3d1_16ns"
    assert enhanced.sequence_names == classic.sequence_names
    # No top-level ScanningSequence in enhanced objects: derived from EchoPulseSequence/InversionRecovery.
    assert enhanced.echo_pulse_sequence == "GRADIENT"
    assert enhanced.scanning_sequence == ("GR", "IR") and "GR" in classic.scanning_sequence
    assert enhanced.image_type[:2] == ("ORIGINAL", "PRIMARY")
    assert enhanced.acquisition_datetime == "2022-07-11T12:05:17.042500"


@needs_real
def test_non_image_objects_are_read_but_have_no_geometry(real: dict[str, SeriesFeatures]) -> None:
    sr = real["dcm_qa_xa30i/99_Phoenix_Document"]
    assert sr.sop_class_uid == "1.2.840.10008.5.1.4.1.1.88.22" and sr.modality == "SR"
    assert sr.n_slices == 0 and sr.inversion_time is None


@needs_real
def test_features_hold_no_patient_identity(real: dict[str, SeriesFeatures]) -> None:
    text = json.dumps([f.to_dict() for f in real.values()])
    for identity in ("FRUIT", "Development", "XAtest_sub-July11"):
        assert identity not in text


@needs_real
def test_from_dataset_with_counts_rebuilds_scanned_features(real: dict[str, SeriesFeatures]) -> None:
    """The node stores one header plus counts per series; rebuilding must equal the scan."""
    scanned = real["dcm_qa_xa30i/6001_anat-T1w_acq-tfl"]
    first = min(scanned.source)
    ds = pydicom.dcmread(first, stop_before_pixels=True)
    rebuilt = SeriesFeatures.from_dataset(
        ds,
        n_instances=scanned.n_instances,
        n_slices=scanned.n_slices,
        parallel_stack=scanned.parallel_stack,
        acquisition_datetime=scanned.acquisition_datetime,
        source=scanned.source,
    )
    assert rebuilt == scanned
    alone = SeriesFeatures.from_dataset(ds)
    assert (alone.n_instances, alone.n_slices, alone.parallel_stack) == (1, 1, False)


@needs_real
def test_to_dict_is_json_and_round_trips(real: dict[str, SeriesFeatures]) -> None:
    for f in real.values():
        data = json.loads(json.dumps(f.to_dict()))
        assert SeriesFeatures.from_dict(data) == f
        assert SeriesFeatures.from_dict(data).source == f.source
    with pytest.raises(ValueError, match="unknown SeriesFeatures fields"):
        SeriesFeatures.from_dict({**next(iter(real.values())).to_dict(), "patient_name": "x"})


@needs_real
def test_non_dicom_files_in_the_corpus_are_skipped() -> None:
    assert why_not_dicom(REAL / "MANIFEST.md") == "no DICM preamble"
    assert read_instance_features(REAL / "MANIFEST.md") is None
    assert read_instance_features(REAL / "dcm_qa_ge" / "LICENSE") is None


# --------------------------------------------------------------------------- small synthetic files


def _mr(series_uid: str, study_uid: str, z: float, number: int, **kw: object) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "MR"
    ds.PatientName = "Synthetic^Patient"
    ds.SeriesNumber = 3
    ds.SeriesDescription = "Ax T2 FSE"
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [-120.0, -120.0, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.AcquisitionDate = "20240102"
    ds.AcquisitionTime = f"1010{number:02d}"
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def test_scan_reads_files_without_extension_and_skips_junk(tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    for i in range(4):
        pydicom.dcmwrite(
            tmp_path / f"i{100 + 7 * i}.MRDC.{i}", _mr(series, study, 5.0 * i, 4 - i), enforce_file_format=True
        )
    (tmp_path / "notes.txt").write_text("not dicom")
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "short").write_bytes(b"\x00" * 140)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "fake.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"garbage")
    assert read_instance_features(tmp_path / "notes.txt") is None
    assert read_instance_features(tmp_path / "empty") is None
    assert read_instance_features(tmp_path / "sub" / "fake.dcm") is None
    [f] = scan_directory(tmp_path)
    assert (f.n_instances, f.n_slices, f.parallel_stack, f.orientation) == (4, 4, True, "axial")
    # Earliest acquisition time in the series, whatever the file order.
    assert f.acquisition_datetime == "2024-01-02T10:10:01.000000"


def test_grouping_ignores_series_number_and_description(tmp_path: Path) -> None:
    study = generate_uid()
    a, b = generate_uid(), generate_uid()
    for i in range(3):
        pydicom.dcmwrite(tmp_path / f"a{i}", _mr(a, study, float(i), i + 1), enforce_file_format=True)
        pydicom.dcmwrite(tmp_path / f"b{i}", _mr(b, study, float(i), i + 1), enforce_file_format=True)
    series = scan_directory(tmp_path)
    assert sorted(f.series_instance_uid for f in series) == sorted([a, b])
    assert all(f.n_instances == 3 for f in series)


def test_duplicate_instances_are_counted_once(tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    ds = _mr(series, study, 0.0, 1)
    pydicom.dcmwrite(tmp_path / "x1", ds, enforce_file_format=True)
    pydicom.dcmwrite(tmp_path / "x1-copy", ds, enforce_file_format=True)
    headers = [read_instance_features(tmp_path / n) for n in ("x1", "x1-copy")]
    [f] = group_series(h for h in headers if h is not None)
    assert f.n_instances == 1


def test_missing_series_uid_is_skipped(tmp_path: Path) -> None:
    ds = _mr(generate_uid(), generate_uid(), 0.0, 1)
    del ds.SeriesInstanceUID
    pydicom.dcmwrite(tmp_path / "x", ds, enforce_file_format=True)
    assert read_instance_features(tmp_path / "x") is None


def test_contrast_agent_placeholders_and_usage_sequence() -> None:
    ds = _mr(generate_uid(), generate_uid(), 0.0, 1, ContrastBolusAgent="NONE")
    assert SeriesFeatures.from_dataset(ds).contrast_agent == ""
    ds.ContrastBolusAgent = "Gadavist 7.5 ml"
    assert SeriesFeatures.from_dataset(ds).contrast_agent == "Gadavist 7.5 ml"
    del ds.ContrastBolusAgent
    item = Dataset()
    item.ContrastBolusAgentNumber = 1
    item.ContrastBolusAgentAdministered = "NO"
    ds.ContrastBolusUsageSequence = [item]
    assert SeriesFeatures.from_dataset(ds).contrast_administered is False
    item.ContrastBolusAgentAdministered = "YES"
    assert SeriesFeatures.from_dataset(ds).contrast_administered is True
    agent = Dataset()
    agent.CodeValue, agent.CodingSchemeDesignator, agent.CodeMeaning = "C0771343", "UMLS", "gadobutrol"
    ds.ContrastBolusAgentSequence = [agent]
    assert SeriesFeatures.from_dataset(ds).contrast_agent == "gadobutrol"


def test_private_pulse_sequence_without_creator_is_still_read() -> None:
    ds = _mr(generate_uid(), generate_uid(), 0.0, 1, Manufacturer="GE MEDICAL SYSTEMS")
    ds.add_new((0x0019, 0x109C), "LO", "efgre3d")  # private creator stripped by an anonymiser
    assert SeriesFeatures.from_dataset(ds).vendor_sequence_name == "efgre3d"
    ph = _mr(generate_uid(), generate_uid(), 0.0, 1, Manufacturer="Philips Medical Systems")
    ph.private_block(0x2001, "Philips Imaging DD 001", create=True).add_new(0x20, "LO", "T1TFE")
    assert SeriesFeatures.from_dataset(ph).vendor_sequence_name == "T1TFE"
