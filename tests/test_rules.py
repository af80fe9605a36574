"""Series rules: the shipped presets on real scanner series and on synthetic GE / Siemens / Philips studies."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_node.headers import SeriesFeatures, scan_directory
from dicom_node.rules import (
    RulesError,
    RuleSet,
    StudyAssignment,
    assign_roles,
    assign_studies,
    classify_series,
    default_rules_path,
    explicit_contrast,
    load_rules,
    score_series,
)

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-dicom"
MR = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
GE, SIEMENS, PHILIPS = "GE MEDICAL SYSTEMS", "SIEMENS", "Philips Medical Systems"
IOP = {
    "sagittal": [0.0, 1.0, 0.0, 0.0, 0.0, -1.0],
    "axial": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
    "coronal": [1.0, 0.0, 0.0, 0.0, 0.0, -1.0],
}
AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}


@pytest.fixture(scope="module")
def rules() -> RuleSet:
    return load_rules(default_rules_path())


# --------------------------------------------------------------------------- synthetic DICOM writers


def _base(study_uid: str, series_uid: str, sop_class: str, number: int, description: str, time: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.PatientName = "Synthetic^Rules"
    ds.PatientID = "SYN-RULES-001"
    ds.PatientBirthDate = "19700101"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "MR"
    ds.SeriesNumber = number
    ds.SeriesDescription = description
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = "20240315"
    ds.SeriesTime = ds.AcquisitionTime = time
    return ds


def write_series(
    root: Path,
    study_uid: str,
    number: int,
    description: str,
    *,
    time: str,
    manufacturer: str,
    n: int = 6,
    plane: str = "sagittal",
    thickness: float = 1.0,
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "OTHER"),
    ge_psd: str | None = None,
    philips_technique: str | None = None,
    planes: tuple[str, ...] | None = None,
    **attrs: Any,
) -> str:
    """Write a small classic MR series (n slices, no pixel data) the way the named vendor labels it."""
    series_uid = generate_uid()
    folder = root / f"{number:04d}"
    folder.mkdir(parents=True)
    for i in range(n):
        p = (planes or (plane,))[i % len(planes or (plane,))]
        ds = _base(study_uid, series_uid, MR, number, description, time)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.Manufacturer = manufacturer
        ds.InstanceNumber = i + 1
        ds.ImageType = list(image_type)
        ds.SliceThickness = thickness
        pos = [-100.0, -110.0, -60.0]
        pos[AXIS[p]] += i * thickness
        ds.ImagePositionPatient = pos
        ds.ImageOrientationPatient = IOP[p]
        ds.Rows = ds.Columns = 256
        ds.PixelSpacing = [1.0, 1.0]
        for k, v in attrs.items():
            setattr(ds, k, v)
        if ge_psd:
            block = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)
            block.add_new(0x9C, "LO", ge_psd)
        if philips_technique:
            block = ds.private_block(0x2001, "Philips Imaging DD 001", create=True)
            block.add_new(0x20, "LO", philips_technique)
        # GE-style names: no extension, not in instance order.
        name = f"i{7919 * (i + 3) % 1000:04d}.MRDC.{i}" if manufacturer == GE else f"IM_{i:04d}.dcm"
        pydicom.dcmwrite(folder / name, ds, enforce_file_format=True)
    return series_uid


def write_enhanced_t1tfe(
    root: Path, study_uid: str, number: int, description: str, *, datetime: str, administered: str | None
) -> str:
    """A Philips Enhanced MR 3D T1 TFE: sequence facts only in functional groups and enhanced attributes."""
    series_uid = generate_uid()
    ds = _base(study_uid, series_uid, ENHANCED_MR, number, description, datetime[8:])
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Manufacturer = PHILIPS
    ds.ImageType = ["ORIGINAL", "PRIMARY", "T1", "NONE"]
    ds.AcquisitionDateTime = datetime
    ds.MRAcquisitionType = "3D"
    ds.PulseSequenceName = "T1TFE"
    ds.EchoPulseSequence = "GRADIENT"
    ds.AcquisitionContrast = "T1"
    ds.SteadyStatePulseSequence = "NONE"
    ds.EchoPlanarPulseSequence = "NO"
    ds.SegmentedKSpaceTraversal = "PARTIAL"
    ds.NumberOfFrames = 8
    shared = Dataset()
    mod = Dataset()
    mod.InversionRecovery = "YES"
    mod.InversionTimes = [1000.0]
    mod.Spoiling = "RF"
    timing = Dataset()
    timing.RepetitionTime = 8.1
    timing.FlipAngle = 8
    echo = Dataset()
    echo.EffectiveEchoTime = 3.7
    measures = Dataset()
    measures.SliceThickness = 1.0
    measures.PixelSpacing = [1.0, 1.0]
    orient = Dataset()
    orient.ImageOrientationPatient = IOP["sagittal"]
    shared.MRModifierSequence = [mod]
    shared.MRTimingAndRelatedParametersSequence = [timing]
    shared.MREchoSequence = [echo]
    shared.PixelMeasuresSequence = [measures]
    shared.PlaneOrientationSequence = [orient]
    if administered is not None:
        usage = Dataset()
        usage.ContrastBolusAgentNumber = 1
        usage.ContrastBolusAgentAdministered = administered
        shared.ContrastBolusUsageSequence = [usage]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for i in range(8):
        fg = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = [-90.0 + i, -110.0, 80.0]
        content = Dataset()
        content.FrameAcquisitionDateTime = datetime
        ftype = Dataset()
        ftype.FrameType = ["ORIGINAL", "PRIMARY", "T1", "NONE"]
        fg.PlanePositionSequence = [pos]
        fg.FrameContentSequence = [content]
        fg.MRImageFrameTypeSequence = [ftype]
        frames.append(fg)
    ds.PerFrameFunctionalGroupsSequence = frames
    folder = root / f"{number:04d}"
    folder.mkdir(parents=True)
    pydicom.dcmwrite(folder / "IM_0001", ds, enforce_file_format=True)
    return series_uid


def ge_study(root: Path) -> dict[str, str]:
    """GE SIGNA brain-mets exam: CUBE T1 pre (no evidence) / post (ContrastBolusAgent), BRAVO +C (keyword)."""
    s = generate_uid()
    ge = {"manufacturer": GE, "ProtocolName": "BRAIN MET W/WO"}  # exam-level protocol, as GE writes it
    uids = {
        "loc": write_series(
            root,
            s,
            1,
            "3Plane Loc SSFSE",
            time="100000",
            planes=("axial", "sagittal", "coronal"),
            image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
            ScanningSequence="SE",
            SequenceVariant="SK",
            MRAcquisitionType="2D",
            RepetitionTime=1200,
            EchoTime=80,
            ge_psd="ssfse",
            **ge,
        ),
        "dwi": write_series(
            root,
            s,
            4,
            "Ax DWI",
            time="100200",
            plane="axial",
            thickness=5,
            n=4,
            ScanningSequence=["EP", "SE"],
            SequenceVariant="NONE",
            ScanOptions=["EPI_GEMS", "ACC_GEMS", "FS"],
            MRAcquisitionType="2D",
            RepetitionTime=6000,
            EchoTime=75,
            DiffusionBValue=1000,
            ge_psd="epi2",
            **ge,
        ),
        "adc": write_series(
            root,
            s,
            400,
            "Apparent Diffusion Coefficient (mm2/s)",
            time="100200",
            plane="axial",
            thickness=5,
            n=4,
            image_type=("DERIVED", "PRIMARY", "ADC"),
            ScanningSequence=["EP", "SE"],
            MRAcquisitionType="2D",
            **ge,
        ),
        "flair2d": write_series(
            root,
            s,
            5,
            "Ax T2 FLAIR",
            time="100500",
            plane="axial",
            thickness=5,
            n=8,
            ScanningSequence=["SE", "IR"],
            SequenceVariant=["SK", "OSP"],
            ScanOptions=["FAST_GEMS", "IR_GEMS", "EDR_GEMS"],
            MRAcquisitionType="2D",
            InversionTime=2250,
            RepetitionTime=9000,
            EchoTime=140,
            ge_psd="fsefr",
            **ge,
        ),
        "flair3d": write_series(
            root,
            s,
            6,
            "Sag CUBE FLAIR",
            time="100800",
            thickness=1.2,
            n=10,
            ScanningSequence=["SE", "IR"],
            SequenceVariant=["SK", "MP", "OSP"],
            ScanOptions=["FAST_GEMS", "EDR_GEMS", "IR_GEMS", "ACC_GEMS"],
            MRAcquisitionType="3D",
            InversionTime=1836,
            RepetitionTime=6000,
            EchoTime=119,
            FlipAngle=90,
            ge_psd="Cube",
            **ge,
        ),
        "cube_pre": write_series(
            root,
            s,
            7,
            "Sag T1 CUBE",
            time="101200",
            thickness=1.0,
            n=10,
            ScanningSequence="SE",
            SequenceVariant=["SK", "MP", "OSP"],
            ScanOptions=["FAST_GEMS", "EDR_GEMS", "ACC_GEMS"],
            MRAcquisitionType="3D",
            RepetitionTime=602,
            EchoTime=12.6,
            FlipAngle=90,
            ge_psd="Cube",
            **ge,
        ),
        "t1flair": write_series(
            root,
            s,
            8,
            "Ax T1 FLAIR",
            time="101500",
            plane="axial",
            thickness=5,
            n=8,
            ScanningSequence=["SE", "IR"],
            SequenceVariant=["SK", "OSP"],
            ScanOptions=["FAST_GEMS", "IR_GEMS"],
            MRAcquisitionType="2D",
            InversionTime=860,
            RepetitionTime=2500,
            EchoTime=24,
            ge_psd="fsefr",
            **ge,
        ),
        "cube_post": write_series(
            root,
            s,
            9,
            "Sag T1 CUBE",
            time="102000",
            thickness=1.0,
            n=10,
            ContrastBolusAgent="GADAVIST",
            ContrastBolusRoute="IV",
            ScanningSequence="SE",
            SequenceVariant=["SK", "MP", "OSP"],
            ScanOptions=["FAST_GEMS", "EDR_GEMS", "ACC_GEMS"],
            MRAcquisitionType="3D",
            RepetitionTime=602,
            EchoTime=12.6,
            FlipAngle=90,
            ge_psd="Cube",
            **ge,
        ),
        "bravo": write_series(
            root,
            s,
            10,
            "Ax 3D BRAVO +C",
            time="102600",
            plane="axial",
            thickness=1.0,
            n=12,
            ScanningSequence="GR",
            SequenceVariant=["SS", "SP", "SK"],
            ScanOptions=["FAST_GEMS", "EDR_GEMS", "IR_GEMS", "ACC_GEMS"],
            MRAcquisitionType="3D",
            InversionTime=450,
            RepetitionTime=8.2,
            EchoTime=3.2,
            FlipAngle=12,
            ge_psd="efgre3d",
            **ge,
        ),
        "bravo_mpr": write_series(
            root,
            s,
            1010,
            "Ax 3D BRAVO +C Reformat",
            time="102600",
            plane="coronal",
            thickness=1.0,
            n=20,
            image_type=("DERIVED", "SECONDARY", "REFORMATTED"),
            ScanningSequence="GR",
            SequenceVariant=["SS", "SP", "SK"],
            MRAcquisitionType="3D",
            InversionTime=450,
            RepetitionTime=8.2,
            EchoTime=3.2,
            ge_psd="efgre3d",
            **ge,
        ),
    }
    return uids


def siemens_study(root: Path) -> dict[str, str]:
    """Siemens exam: MPRAGE pre (unlabelled) / post (KM), SPACE T1 pair resolved by time only, VIBE post."""
    s = generate_uid()
    sm = {"manufacturer": SIEMENS}
    mprage = dict(
        ScanningSequence=["GR", "IR"],
        SequenceVariant=["SK", "SP", "MP"],
        ScanOptions=["IR", "PFP"],
        MRAcquisitionType="3D",
        SequenceName="*tfl3d1_16ns",
        InversionTime=900,
        RepetitionTime=2300,
        EchoTime=2.32,
        FlipAngle=8,
        **sm,
    )
    space_t1 = dict(
        ScanningSequence="SE",
        SequenceVariant=["SK", "SP", "OSP"],
        ScanOptions="PFP",
        MRAcquisitionType="3D",
        SequenceName="*spc_88ns",
        RepetitionTime=700,
        EchoTime=12,
        FlipAngle=120,
        ProtocolName="t1_space_sag_p2_iso",
        thickness=0.9,
        n=10,
        **sm,
    )
    return {
        "loc": write_series(
            root,
            s,
            1,
            "localizer",
            time="090000",
            planes=("sagittal", "coronal", "axial"),
            image_type=("ORIGINAL", "PRIMARY", "M", "NORM", "DIS2D"),
            ScanningSequence="GR",
            SequenceVariant="SP",
            MRAcquisitionType="2D",
            SequenceName="*fl2d1",
            RepetitionTime=8.6,
            EchoTime=4,
            ProtocolName="localizer",
            **sm,
        ),
        "flair": write_series(
            root,
            s,
            2,
            "t2_space_dark-fluid_sag_p2_iso",
            time="090200",
            n=10,
            ScanningSequence=["SE", "IR"],
            SequenceVariant=["SK", "SP", "MP", "OSP"],
            ScanOptions=["IR", "PFP"],
            MRAcquisitionType="3D",
            SequenceName="*spcir_282ns",
            InversionTime=1800,
            RepetitionTime=5000,
            EchoTime=387,
            FlipAngle=120,
            ProtocolName="t2_space_dark-fluid_sag_p2_iso",
            **sm,
        ),
        "mprage_pre": write_series(
            root, s, 3, "t1_mprage_sag_p2_iso", time="090500", n=10, ProtocolName="t1_mprage_sag_p2_iso", **mprage
        ),
        "space_pre": write_series(root, s, 4, "t1_space_sag_p2_iso", time="090800", **space_t1),
        "t2space": write_series(
            root,
            s,
            5,
            "t2_space_sag_p2_iso",
            time="091000",
            n=10,
            ScanningSequence="SE",
            SequenceVariant=["SK", "SP", "OSP"],
            MRAcquisitionType="3D",
            SequenceName="*spc_151ns",
            RepetitionTime=3200,
            EchoTime=408,
            FlipAngle=120,
            ProtocolName="t2_space_sag_p2_iso",
            **sm,
        ),
        "trace": write_series(
            root,
            s,
            6,
            "ep2d_diff_3scan_trace_p2_TRACEW",
            time="091200",
            plane="axial",
            thickness=5,
            n=4,
            image_type=("ORIGINAL", "PRIMARY", "DIFFUSION", "TRACEW", "ND"),
            ScanningSequence="EP",
            SequenceVariant=["SK", "SP"],
            MRAcquisitionType="2D",
            SequenceName="*ep_b1000t",
            ProtocolName="ep2d_diff_3scan_trace_p2",
            **sm,
        ),
        "adc": write_series(
            root,
            s,
            7,
            "ep2d_diff_3scan_trace_p2_ADC",
            time="091200",
            plane="axial",
            thickness=5,
            n=4,
            image_type=("DERIVED", "PRIMARY", "DIFFUSION", "ADC", "ND"),
            ScanningSequence="EP",
            MRAcquisitionType="2D",
            SequenceName="*ep_b0_1000",
            ProtocolName="ep2d_diff_3scan_trace_p2",
            **sm,
        ),
        "mprage_post": write_series(
            root,
            s,
            8,
            "t1_mprage_tra_p2_iso_KM",
            time="092000",
            plane="axial",
            n=12,
            ProtocolName="t1_mprage_tra_p2_iso_KM",
            **mprage,
        ),
        "space_post": write_series(root, s, 9, "t1_space_sag_p2_iso", time="092600", **space_t1),
        "vibe": write_series(
            root,
            s,
            10,
            "t1_vibe_fs_tra_post",
            time="093000",
            plane="axial",
            n=16,
            ScanningSequence="GR",
            SequenceVariant=["SP", "OSP"],
            ScanOptions=["PFP", "FS"],
            MRAcquisitionType="3D",
            SequenceName="*fl3d1",
            RepetitionTime=6.2,
            EchoTime=2.46,
            FlipAngle=12,
            ProtocolName="t1_vibe_fs_tra_post",
            **sm,
        ),
        "mpr": write_series(
            root,
            s,
            11,
            "t1_mprage_tra_p2_iso_KM_MPR_cor",
            time="092000",
            plane="coronal",
            n=12,
            image_type=("DERIVED", "PRIMARY", "MPR", "NORM", "DIS3D"),
            ProtocolName="t1_mprage_tra_p2_iso_KM",
            **{k: v for k, v in mprage.items()},
        ),
        "stir": write_series(
            root,
            s,
            12,
            "t2_tirm_cor_stir",
            time="093500",
            plane="coronal",
            thickness=4,
            n=8,
            ScanningSequence=["SE", "IR"],
            SequenceVariant=["SK", "SP", "MP"],
            MRAcquisitionType="2D",
            SequenceName="*tir2d1_13",
            InversionTime=150,
            RepetitionTime=4000,
            EchoTime=50,
            ProtocolName="t2_tirm_cor_stir",
            **sm,
        ),
    }


def philips_study(root: Path) -> dict[str, str]:
    """Philips Ingenia exam: enhanced 3D T1 TFE post (usage sequence only), VISTA T1 'pre' keyword then unlabelled."""
    s = generate_uid()
    ph = {"manufacturer": PHILIPS}
    vista = dict(
        ScanningSequence="SE",
        SequenceVariant="SK",
        ScanOptions="FS",
        MRAcquisitionType="3D",
        RepetitionTime=500,
        EchoTime=26,
        FlipAngle=90,
        philips_technique="TSE",
        n=10,
        **ph,
    )
    return {
        "survey": write_series(
            root,
            s,
            101,
            "Survey",
            time="080000",
            planes=("axial", "sagittal", "coronal"),
            image_type=("ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"),
            ScanningSequence="GR",
            SequenceVariant="SP",
            MRAcquisitionType="2D",
            RepetitionTime=11,
            EchoTime=4.6,
            ProtocolName="Survey",
            philips_technique="FFE",
            **ph,
        ),
        "flair": write_series(
            root,
            s,
            201,
            "3D FLAIR",
            time="080300",
            n=10,
            ScanningSequence=["SE", "IR"],
            SequenceVariant=["SK", "MP"],
            MRAcquisitionType="3D",
            InversionTime=1650,
            RepetitionTime=4800,
            EchoTime=310,
            FlipAngle=90,
            ProtocolName="3D_FLAIR",
            philips_technique="TSE",
            **ph,
        ),
        "vista_pre": write_series(
            root, s, 301, "T1W_3D_VISTA pre", time="080800", ProtocolName="T1W_3D_VISTA pre", **vista
        ),
        "dwi": write_series(
            root,
            s,
            401,
            "DWI",
            time="081000",
            plane="axial",
            thickness=4,
            n=4,
            ScanningSequence="SE",
            SequenceVariant="SK",
            ScanOptions="FS",
            MRAcquisitionType="2D",
            DiffusionBValue=1000,
            RepetitionTime=3000,
            EchoTime=80,
            ProtocolName="DWI",
            philips_technique="DwiSE",
            **ph,
        ),
        "t2": write_series(
            root,
            s,
            501,
            "T2W_TSE",
            time="081300",
            plane="axial",
            thickness=4,
            n=8,
            ScanningSequence="SE",
            SequenceVariant="SK",
            MRAcquisitionType="2D",
            RepetitionTime=3000,
            EchoTime=80,
            ProtocolName="T2W_TSE",
            philips_technique="TSE",
            **ph,
        ),
        "tfe": write_enhanced_t1tfe(root, s, 601, "T1W_3D_TFE", datetime="20240315082000.00", administered="YES"),
        "vista_post": write_series(root, s, 701, "T1W_3D_VISTA", time="082600", ProtocolName="T1W_3D_VISTA", **vista),
    }


@pytest.fixture(scope="module")
def vendor_studies(tmp_path_factory: pytest.TempPathFactory, rules: RuleSet) -> dict[str, Any]:
    """vendor -> (role-name -> SeriesInstanceUID, assignment by the shipped rules, scanned series)."""
    out: dict[str, Any] = {}
    for vendor, build in (("ge", ge_study), ("siemens", siemens_study), ("philips", philips_study)):
        root = tmp_path_factory.mktemp(vendor)
        uids = build(root)
        series = scan_directory(root)
        assert len(series) == len(uids)
        out[vendor] = (uids, assign_roles(series, rules), series)
    return out


# --------------------------------------------------------------------------- real series: the documented answers

# (folder, role, matcher, reason fragment, also-excluded-by)
REAL_EXPECTED = [
    (
        "dcm_qa_deident/10_Accelerated_SAG_IR-SPGR",
        None,
        "t1_gre/ge_bravo",
        "T1 GRE candidate (BRAVO family) without contrast evidence",
        (),
    ),
    (
        "dcm_qa_ge/05_3D_Ax_T1_MP_RAGE_R22",
        None,
        "t1_gre/ge_bravo",
        "T1 GRE candidate (BRAVO family) without contrast evidence",
        (),
    ),
    ("dcm_qa_ge/01_Ax_DWI_TENSOR_R2", None, "exclusion:diffusion", "diffusion", ("epi", "not_a_volume")),
    (
        "dcm_qa_xa30i/6001_anat-T1w_acq-tfl",
        None,
        "t1_gre/siemens_mprage",
        "T1 GRE candidate (BRAVO family) without contrast evidence",
        (),
    ),
    (
        "dcm_qa_xa30/6_anat-T1w_acq-tfl",
        None,
        "t1_gre/siemens_mprage",
        "T1 GRE candidate (BRAVO family) without contrast evidence",
        (),
    ),
    ("dcm_qa_xa30i/1001_AAHead_Scout", None, "exclusion:localizer", "localizer", ()),
    ("dcm_qa_xa30i/2001_AAHead_Scout", None, "exclusion:derived", "derived", ("reformat", "not_a_volume")),
    ("dcm_qa_xa30i/12001_DWI_dir80_AP", None, "exclusion:derived", "derived", ("diffusion", "epi")),
    ("dcm_qa_xa30i/19001_Perfusion_Weighted_MR", None, "exclusion:derived", "derived", ("perfusion", "epi")),
    ("dcm_qa_xa30i/19001_Perfusion_Weighted_SC", None, "exclusion:secondary_capture", "secondary capture", ()),
    ("dcm_qa_xa30i/99_Phoenix_Document", None, "exclusion:non_image", "not an MR image object", ()),
    ("dcm_qa_ts/ax_asc_35sl", None, "exclusion:epi", "echo-planar", ("not_a_volume",)),
]


@pytest.fixture(scope="module")
def real_decisions(rules: RuleSet) -> dict[str, Any]:
    if not (REAL / "manifest.json").is_file():
        pytest.skip("shared/data/real-dicom not checked out")
    series = scan_directory(REAL)
    decisions = {d.series_instance_uid: d for a in assign_studies(series, rules) for d in a.decisions}
    by_folder = {}
    for f in series:
        folder = str(Path(f.source[0]).parent.relative_to(REAL))
        by_folder[folder] = (f, decisions[f.series_instance_uid])
    return by_folder


@pytest.mark.parametrize("folder,role,matcher,reason,also", REAL_EXPECTED, ids=[e[0] for e in REAL_EXPECTED])
def test_real_series_get_the_documented_answer(
    real_decisions: dict[str, Any], folder: str, role: str | None, matcher: str, reason: str, also: tuple[str, ...]
) -> None:
    _f, d = real_decisions[folder]
    assert d.role == role
    assert d.matcher == matcher, d.reason
    assert reason in d.reason
    for name in also:
        assert name in d.excluded_by, (name, d.excluded_by)
    if matcher.startswith("t1_gre/"):
        # A T1 GRE candidate, not post-contrast, and never taken for FSE or FLAIR.
        assert d.family == "t1_gre" and d.contrast == "unknown" and d.candidate_role is None
        assert d.contrast_evidence == "no contrast evidence"


def test_real_corpus_fills_no_role(real_decisions: dict[str, Any]) -> None:
    assert len(real_decisions) == 12
    assert all(d.role is None for _, d in real_decisions.values())


def test_real_localizer_is_also_refused_without_its_name(real_decisions: dict[str, Any], rules: RuleSet) -> None:
    """The 3D scout is ORIGINAL and stacks cleanly; renamed, its sequence still fits no T1.

    (*fl3d1_ns, TR 3 ms, no inversion, no fat saturation: not an MPRAGE, not a VIBE.)
    """
    f, _ = real_decisions["dcm_qa_xa30i/1001_AAHead_Scout"]
    renamed = dataclasses.replace(f, series_description="t1_3d_sag", protocol_name="t1_3d_sag")
    d = classify_series(renamed, rules)
    assert d.role is None and d.family is None and d.matcher == "no rule"


def test_real_enhanced_and_classic_twins_decide_alike(real_decisions: dict[str, Any]) -> None:
    _, classic = real_decisions["dcm_qa_xa30i/6001_anat-T1w_acq-tfl"]
    _, enhanced = real_decisions["dcm_qa_xa30/6_anat-T1w_acq-tfl"]
    assert (classic.role, classic.family, classic.preset) == (enhanced.role, enhanced.family, enhanced.preset)


def test_real_t1_candidates_become_post_with_contrast_evidence(real_decisions: dict[str, Any], rules: RuleSet) -> None:
    """Only the missing contrast evidence keeps the real T1 GRE series out of t1_bravo_post."""
    for folder in (
        "dcm_qa_deident/10_Accelerated_SAG_IR-SPGR",
        "dcm_qa_ge/05_3D_Ax_T1_MP_RAGE_R22",
        "dcm_qa_xa30i/6001_anat-T1w_acq-tfl",
        "dcm_qa_xa30/6_anat-T1w_acq-tfl",
    ):
        f, _ = real_decisions[folder]
        d = classify_series(dataclasses.replace(f, contrast_agent="Gadovist"), rules)
        assert d.role == "t1_bravo_post", folder


# --------------------------------------------------------------------------- vendor studies


def _roles(a: StudyAssignment) -> dict[str, str]:
    return {role: c.series_instance_uid for role, c in a.chosen.items()}


def test_ge_study_roles(vendor_studies: dict[str, Any]) -> None:
    uids, a, _ = vendor_studies["ge"]
    assert _roles(a) == {
        "t1_bravo_post": uids["bravo"],
        "t1_cube_pre": uids["cube_pre"],
        "t1_cube_post": uids["cube_post"],
        "flair": uids["flair3d"],
    }
    assert a.missing_roles == ()
    d = a.decision_for(uids["bravo"])
    assert d.matcher == "t1_gre/ge_bravo" and "+C" in d.contrast_evidence
    post = a.decision_for(uids["cube_post"])
    assert post.matcher == "t1_fse/ge_cube_t1" and post.contrast_evidence == "ContrastBolusAgent 'GADAVIST'"
    pre = a.decision_for(uids["cube_pre"])
    assert pre.contrast == "pre" and "acquired before post-contrast t1_fse series" in pre.contrast_evidence


def test_ge_exam_protocol_is_not_read_as_a_contrast_keyword(vendor_studies: dict[str, Any]) -> None:
    """'BRAIN MET W/WO' is in every GE series' ProtocolName; its 'w/o' must not make all of them pre."""
    uids, a, _ = vendor_studies["ge"]
    assert a.decision_for(uids["cube_pre"]).contrast_evidence.startswith("acquired before")
    assert "protocol_name" not in a.decision_for(uids["bravo"]).contrast_evidence


def test_ge_distractors(vendor_studies: dict[str, Any]) -> None:
    uids, a, _ = vendor_studies["ge"]
    assert a.decision_for(uids["loc"]).matcher == "exclusion:localizer"
    assert a.decision_for(uids["dwi"]).matcher == "exclusion:diffusion"
    assert a.decision_for(uids["adc"]).matcher == "exclusion:derived"
    mpr = a.decision_for(uids["bravo_mpr"])
    assert mpr.matcher == "exclusion:derived" and "reformat" in mpr.excluded_by
    t1flair = a.decision_for(uids["t1flair"])  # a 2D T1 FLAIR is neither a T2 FLAIR nor a 3D T1
    assert t1flair.role is None and t1flair.matcher == "no rule"


def test_ge_2d_flair_loses_to_3d_flair(vendor_studies: dict[str, Any]) -> None:
    uids, a, _ = vendor_studies["ge"]
    loser = a.decision_for(uids["flair2d"])
    winner = a.decision_for(uids["flair3d"])
    assert loser.role is None and loser.candidate_role == "flair" and loser.family == "flair"
    assert loser.reason.startswith(f"lost to series #6 'Sag CUBE FLAIR' ({uids['flair3d']}) for role flair: score")
    assert winner.score is not None and loser.score is not None and winner.score > loser.score
    assert "3D +1000" in winner.score_detail and "3D" not in loser.score_detail.split(" = ")[1]


def test_siemens_study_roles(vendor_studies: dict[str, Any]) -> None:
    uids, a, _ = vendor_studies["siemens"]
    assert _roles(a) == {
        "t1_bravo_post": uids["mprage_post"],
        "t1_cube_pre": uids["space_pre"],
        "t1_cube_post": uids["space_post"],
        "flair": uids["flair"],
    }
    assert a.decision_for(uids["flair"]).matcher == "flair/named_flair"
    assert a.decision_for(uids["mprage_post"]).matcher == "t1_gre/siemens_mprage"
    # The SPACE T1 pair has the same name and no agent: acquisition order alone decides.
    pre, post = a.decision_for(uids["space_pre"]), a.decision_for(uids["space_post"])
    assert pre.contrast_evidence == "earliest t1_fse series without contrast evidence: defaults to pre"
    assert post.contrast == "post" and post.contrast_evidence.startswith("acquired after #4 't1_space_sag_p2_iso'")


def test_siemens_unlabelled_mprage_before_the_post_is_pre(vendor_studies: dict[str, Any]) -> None:
    uids, a, _ = vendor_studies["siemens"]
    d = a.decision_for(uids["mprage_pre"])
    assert d.role is None and d.family == "t1_gre" and d.contrast == "pre"
    assert "acquired before post-contrast t1_gre series #8" in d.contrast_evidence
    assert "no role takes a pre-contrast t1_gre series" in d.reason


def test_siemens_vibe_post_loses_to_mprage_post(vendor_studies: dict[str, Any]) -> None:
    uids, a, _ = vendor_studies["siemens"]
    vibe = a.decision_for(uids["vibe"])
    assert vibe.preset == "siemens_vibe" and vibe.candidate_role == "t1_bravo_post" and vibe.role is None
    assert "lost to series #8" in vibe.reason and "preset siemens_vibe -300" in vibe.reason
    # It is the latest post-contrast acquisition and still loses: IR preparation outranks recency.
    assert "latest post-contrast +10" in vibe.score_detail


def test_siemens_distractors(vendor_studies: dict[str, Any]) -> None:
    uids, a, _ = vendor_studies["siemens"]
    assert a.decision_for(uids["loc"]).matcher == "exclusion:localizer"
    assert a.decision_for(uids["trace"]).matcher == "exclusion:diffusion"
    assert a.decision_for(uids["adc"]).matcher == "exclusion:derived"
    assert a.decision_for(uids["mpr"]).matcher == "exclusion:derived"
    t2 = a.decision_for(uids["t2space"])  # a T2 SPACE shares *spc with SPACE T1 but is no T1
    assert t2.role is None and t2.matcher == "no rule"
    stir = a.decision_for(uids["stir"])  # *tir2d with TI 150 is a STIR, not a FLAIR
    assert stir.role is None and stir.family is None


def test_philips_study_roles(vendor_studies: dict[str, Any]) -> None:
    uids, a, _ = vendor_studies["philips"]
    assert _roles(a) == {
        "t1_bravo_post": uids["tfe"],
        "t1_cube_pre": uids["vista_pre"],
        "t1_cube_post": uids["vista_post"],
        "flair": uids["flair"],
    }
    tfe = a.decision_for(uids["tfe"])
    assert tfe.matcher == "t1_gre/philips_3d_t1_tfe"
    assert tfe.contrast_evidence == "Contrast/Bolus Usage Sequence: agent administered"
    pre = a.decision_for(uids["vista_pre"])
    assert pre.matcher == "t1_fse/philips_vista_t1" and "/(?<![a-z])pre(?![a-z])/" in pre.contrast_evidence
    post = a.decision_for(uids["vista_post"])
    assert post.contrast_evidence.startswith("acquired after pre-contrast t1_fse series #301")
    assert a.decision_for(uids["survey"]).matcher == "exclusion:localizer"
    assert a.decision_for(uids["dwi"]).matcher == "exclusion:diffusion"
    assert a.decision_for(uids["t2"]).matcher == "no rule"


def test_enhanced_usage_sequence_no_means_pre(tmp_path: Path, rules: RuleSet) -> None:
    write_enhanced_t1tfe(tmp_path, generate_uid(), 601, "T1W_3D_TFE", datetime="20240315082000", administered="NO")
    [f] = scan_directory(tmp_path)
    assert f.enhanced and f.scanning_sequence == ("GR", "IR") and "MP" in f.sequence_variant
    d = classify_series(f, rules)
    assert d.role is None and d.contrast == "pre"


# --------------------------------------------------------------------------- contrast policy on single series


def _features(**kw: Any) -> SeriesFeatures:
    base: dict[str, Any] = {
        "study_instance_uid": "1.2.3",
        "series_instance_uid": "1.2.3.4",
        "sop_class_uid": MR,
        "modality": "MR",
        "manufacturer": GE,
        "series_description": "Ax 3D BRAVO",
        "vendor_sequence_name": "efgre3d",
        "scanning_sequence": ("GR",),
        "sequence_variant": ("SS", "SP", "SK"),
        "scan_options": ("FAST_GEMS", "EDR_GEMS", "IR_GEMS"),
        "mr_acquisition_type": "3D",
        "image_type": ("ORIGINAL", "PRIMARY", "OTHER"),
        "inversion_recovery": True,
        "inversion_time": 450.0,
        "repetition_time": 8.2,
        "echo_time": 3.2,
        "flip_angle": 12.0,
        "slice_thickness": 1.0,
        "n_instances": 160,
        "n_frames": 160,
        "n_slices": 160,
        "parallel_stack": True,
        "orientation": "axial",
        "acquisition_datetime": "2024-03-15T10:26:00.000000",
    }
    base.update(kw)
    return SeriesFeatures(**base)


def _cube(**kw: Any) -> SeriesFeatures:
    return _features(
        **{
            "series_description": "Sag T1 CUBE",
            "vendor_sequence_name": "Cube",
            "scanning_sequence": ("SE",),
            "sequence_variant": ("SK", "MP", "OSP"),
            "scan_options": ("FAST_GEMS", "EDR_GEMS"),
            "inversion_recovery": False,
            "inversion_time": None,
            "repetition_time": 602.0,
            "echo_time": 12.6,
            "flip_angle": 90.0,
            "orientation": "sagittal",
            **kw,
        }
    )


def test_lone_t1_gre_without_evidence_gets_no_role(rules: RuleSet) -> None:
    d = classify_series(_features(), rules)
    assert d.role is None and d.family == "t1_gre" and d.matcher == "t1_gre/ge_bravo"
    assert d.reason == "T1 GRE candidate (BRAVO family) without contrast evidence"


def test_lone_t1_fse_without_evidence_is_pre(rules: RuleSet) -> None:
    d = classify_series(_cube(), rules)
    assert d.role == "t1_cube_pre" and d.contrast == "pre" and "t1_fse defaults to pre" in d.contrast_evidence


@pytest.mark.parametrize(
    "description,state",
    [
        ("Ax 3D BRAVO +C", "post"),
        ("Ax 3D BRAVO + C", "post"),
        ("AX BRAVO C+", "post"),
        ("SAG BRAVO POST", "post"),
        ("t1_mprage_tra_post_gd", "post"),
        ("T1 3D KM", "post"),
        ("3D T1 Gd", "post"),
        ("T1 gado", "post"),
        ("T1W_3D_TFE_CE", "post"),
        ("T1 BRAVO pre", "pre"),
        ("T1 BRAVO PRE-CONTRAST", "pre"),  # negatives first: "contrast" alone would say post
        ("t1 mprage nativ", "pre"),
        ("BRAVO without contrast", "pre"),
        ("BRAVO w/o", "pre"),
        ("BRAVO non-contrast", "pre"),
        ("Ax BRAVO post-op", "unknown"),  # postoperative, not post-contrast
        ("BRAVO posterior fossa", "unknown"),
        ("BRAVO prep 450", "unknown"),  # "prep" is not "pre"
        ("Ax 3D BRAVO", "unknown"),
    ],
)
def test_contrast_keywords(rules: RuleSet, description: str, state: str) -> None:
    assert explicit_contrast(_features(series_description=description), rules)[0] == state


def test_agent_beats_keywords_and_placeholders_do_not_count(rules: RuleSet) -> None:
    state, evidence = explicit_contrast(_features(series_description="BRAVO pre", contrast_agent="Dotarem"), rules)
    assert (state, evidence) == ("post", "ContrastBolusAgent 'Dotarem'")
    assert explicit_contrast(_features(contrast_administered=False), rules)[0] == "pre"


def test_protocol_keyword_used_when_description_is_silent(rules: RuleSet) -> None:
    f = _features(series_description="t1_mprage_tra", protocol_name="t1_mprage_tra_post")
    assert explicit_contrast(f, rules) == (
        "post",
        "protocol_name 't1_mprage_tra_post' ~ /(?<![a-z])post(?![ _-]*op)(?!er)/",
    )


def test_bravo_pair_without_keywords_stays_unknown_but_after_a_labelled_pre_is_post(rules: RuleSet) -> None:
    a = _features(series_instance_uid="1.1", series_number=3, acquisition_datetime="2024-03-15T10:00:00.000000")
    b = _features(series_instance_uid="1.2", series_number=9, acquisition_datetime="2024-03-15T10:20:00.000000")
    assert assign_roles([a, b], rules).chosen == {}  # a GRE family has no "defaults to pre"
    labelled = dataclasses.replace(a, series_description="Ax 3D BRAVO pre")
    result = assign_roles([labelled, b], rules)
    assert result.chosen["t1_bravo_post"].series_instance_uid == "1.2"
    assert "acquired after pre-contrast t1_gre series #3" in result.decision_for("1.2").contrast_evidence
    # classify_series sees the same context when given the study.
    assert classify_series(b, rules, study=[labelled, b]).role == "t1_bravo_post"
    assert classify_series(b, rules).role is None


def test_cube_series_after_a_post_is_post_and_without_times_defaults_to_pre(rules: RuleSet) -> None:
    post = _cube(
        series_instance_uid="2.1",
        series_number=9,
        contrast_agent="Gadavist",
        acquisition_datetime="2024-03-15T10:20:00.000000",
    )
    later = _cube(series_instance_uid="2.2", series_number=12, acquisition_datetime="2024-03-15T10:40:00.000000")
    res = assign_roles([post, later], rules)
    assert res.decision_for("2.2").contrast == "post" and "t1_cube_pre" in res.missing_roles
    # Latest of two post candidates wins when everything else is equal.
    assert res.chosen["t1_cube_post"].series_instance_uid == "2.2"
    assert res.decision_for("2.1").reason.startswith("lost to series #12")
    untimed = dataclasses.replace(later, acquisition_datetime=None)
    res = assign_roles([post, untimed], rules)
    assert res.decision_for("2.2").role == "t1_cube_pre"  # no agent while the other FSE T1 has one


def test_exam_level_protocol_is_ignored(rules: RuleSet) -> None:
    a = _features(series_instance_uid="3.1", series_description="Ax 3D BRAVO", protocol_name="BRAIN POST CONTRAST")
    b = _cube(series_instance_uid="3.2", protocol_name="BRAIN POST CONTRAST")
    res = assign_roles([a, b], rules)
    assert res.decision_for("3.1").contrast == "unknown"
    # Alone, the same protocol name is taken as the series' own.
    assert classify_series(a, rules).contrast == "post"


# --------------------------------------------------------------------------- scoring and overrides


def test_score_orders_3d_original_slices_thickness(rules: RuleSet) -> None:
    preset = rules.families["t1_gre"].presets[0]
    def s(**kw: object) -> float:
        return score_series(_features(**kw), preset, rules)[0]

    assert s() > s(mr_acquisition_type="2D", n_slices=400, slice_thickness=0.5)
    assert s(n_slices=60) > s(image_type=("DERIVED", "SECONDARY"), n_slices=400, slice_thickness=0.5)
    assert s(n_slices=200) > s(n_slices=100)
    assert s(slice_thickness=0.8) > s(slice_thickness=1.5)


def test_preset_can_override_an_exclusion(tmp_path: Path, rules: RuleSet, vendor_studies: dict[str, Any]) -> None:
    data = yaml.safe_load(default_rules_path().read_text())
    bravo = next(p for p in data["families"]["t1_gre"]["presets"] if p["name"] == "ge_bravo")
    bravo["allow_exclusions"] = ["derived", "reformat"]
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    site = load_rules(path)
    uids, _, series = vendor_studies["ge"]
    res = assign_roles(series, site)
    assert res.chosen["t1_bravo_post"].series_instance_uid == uids["bravo"]
    reformat = res.decision_for(uids["bravo_mpr"])
    assert reformat.candidate_role == "t1_bravo_post" and reformat.role is None
    assert "lost to series #10" in reformat.reason and "original +500" in res.chosen["t1_bravo_post"].score_detail
    # Secondary captures stay out even if a preset asks: the exclusion is not overridable.
    sc = _features(sop_class_uid="1.2.840.10008.5.1.4.1.1.7")
    bravo["allow_exclusions"] = ["secondary_capture"]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert classify_series(sc, load_rules(path)).matcher == "exclusion:secondary_capture"


# --------------------------------------------------------------------------- rules file validation


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "rules.yaml"
    p.write_text(text)
    return p


def _shipped() -> dict[str, Any]:
    return yaml.safe_load(default_rules_path().read_text())


def test_shipped_rules_load(rules: RuleSet) -> None:
    assert list(rules.roles) == ["t1_bravo_post", "t1_cube_pre", "t1_cube_post", "flair"]
    assert list(rules.families) == ["flair", "t1_fse", "t1_gre"]
    assert rules.source.endswith("config/series_rules.yaml")
    names = {p.name for fam in rules.families.values() for p in fam.presets}
    assert {
        "ge_bravo",
        "siemens_mprage",
        "siemens_vibe",
        "philips_3d_t1_tfe",
        "ge_cube_t1",
        "siemens_space_t1",
        "philips_vista_t1",
        "named_flair",
        "siemens_spcir_tir",
    } <= names


@pytest.mark.parametrize(
    "mutate,expected",
    [
        (
            lambda d: d["families"]["t1_gre"]["presets"][0]["match"].update(inversion_time={"min": "abc"}),
            "families.t1_gre.presets.0.match.inversion_time.min: expected a valid number",
        ),
        (
            lambda d: d["families"]["flair"]["presets"][0]["match"].update(descripton="x"),
            "families.flair.presets.0.match.descripton: unknown key",
        ),
        (lambda d: d["roles"]["flair"].update(family="flairs"), "roles.flair.family: unknown family 'flairs'"),
        (
            lambda d: d["roles"]["flair"].update(contrast="maybe"),
            "roles.flair.contrast: expected 'post', 'pre' or 'any'",
        ),
        (
            lambda d: d["families"]["t1_gre"]["presets"][0]["match"].update(names=["(unclosed"]),
            "families.t1_gre.presets.0.match.names: invalid regular expression '(unclosed'",
        ),
        (
            lambda d: d["families"]["t1_gre"]["presets"][0].update(allow_exclusions=["nope"]),
            "families.t1_gre.presets.0.allow_exclusions: unknown exclusion(s) ['nope']",
        ),
        (lambda d: d["exclusions"][0].update(match={}), "exclusions.0.match: an empty match would match every series"),
        (lambda d: d.pop("roles"), "roles: required key is missing"),
        (lambda d: d.update(version=2), "version: expected 1"),
    ],
)
def test_bad_rules_fail_with_one_line_naming_file_and_key(tmp_path: Path, mutate: Any, expected: str) -> None:
    data = _shipped()
    mutate(data)
    path = _write(tmp_path, yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(RulesError) as err:
        load_rules(path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert expected in message


def test_unreadable_and_malformed_rules_files(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match=r"missing\.yaml: rules file not found"):
        load_rules(tmp_path / "missing.yaml")
    with pytest.raises(RulesError, match=r"\.yaml:3:1: not valid YAML"):
        load_rules(_write(tmp_path, "version: 1\nroles: [unclosed\n"))
    with pytest.raises(RulesError, match="expected a mapping"):
        load_rules(_write(tmp_path, "- just a list\n"))
