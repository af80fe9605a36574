"""Training data sources (NIfTI, DICOM with NIfTI or SEG truth, BrainMetShare PNG) and the case cache, on one
small (3 mm) phantom study written in every layout."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image
from scipy import ndimage

from dicom_node.cli.roles_for_training import RulesRoleAssigner
from pipeline.dicom_out import AlgorithmInfo, ordered_sources, write_seg
from pipeline.lesions import STRUCTURE_26, find_lesions
from training.data.brainmetshare import DEFAULT_SPACING_MM, brainmetshare_sources, load_brainmetshare_case
from training.data.cache import CachedCase, GridSettings, cache_case
from training.data.case import CaseError
from training.data.dicom import dicom_sources, load_dicom_case
from training.data.nifti import nifti_sources
from training.data.sources import find_sources
from training.phantom import generate_study
from training.phantom.dicom_writer import plan_study, write_dicom_study
from training.phantom.nifti_writer import write_nifti_study, write_truth

SMALL = GridSettings(size=128, through_plane_mm=3.0)  # finer in-plane than the 3 mm phantom: no lesion voxel lost
ROLES3 = ("t1_bravo_post", "t1_cube_pre", "t1_cube_post")


@pytest.fixture(scope="module")
def study():
    return generate_study(0, vendor="ge", voxel_mm=3.0, distractors=False, missing=("flair",))


@pytest.fixture(scope="module")
def nifti_root(study, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nifti")
    write_nifti_study(study, root / "case-a" / "nifti", truth_dir=root / "case-a" / "truth")
    return root


@pytest.fixture(scope="module")
def nifti_cached(nifti_root, tmp_path_factory) -> CachedCase:
    [source] = nifti_sources(nifti_root)
    return cache_case(source, tmp_path_factory.mktemp("nifti-cache"), SMALL)


@pytest.fixture(scope="module")
def dicom_root(study, tmp_path_factory) -> Path:
    """``with-nifti``: DICOM + truth/label.nii.gz; ``with-seg``: the same DICOM + a SEG of the truth (no label)."""
    root = tmp_path_factory.mktemp("dicom")
    a = root / "with-nifti"
    write_dicom_study(study, a / "scanner")
    write_truth(study, a / "truth")
    b = root / "with-seg"
    shutil.copytree(a, b)
    (b / "truth" / "label.nii.gz").unlink()
    ref = next(sp for sp in plan_study(study).series if study.series[sp.index].kind == study.reference_kind)
    sources = ordered_sources([pydicom.dcmread(p) for p in sorted((b / "scanner" / ref.folder).glob("*.dcm"))])
    lesions = find_lesions(sitk.Cast(study.label > 0, sitk.sitkFloat32), 0.5)
    seg = write_seg(sources, lesions.labels, lesions.lesions,
                    AlgorithmInfo(name="truth", version="1", manufacturer="test", device_uid="1.2.3"))
    (b / "annotations").mkdir()
    seg.save_as(b / "annotations" / "lesions.dcm", enforce_file_format=True)
    return root


@pytest.fixture(scope="module")
def assigner() -> RulesRoleAssigner:
    return RulesRoleAssigner.from_file()


@pytest.fixture(scope="module")
def dicom_cached(dicom_root, assigner, tmp_path_factory) -> dict[str, CachedCase]:
    cache = tmp_path_factory.mktemp("dicom-cache")
    return {s.case_id: cache_case(s, cache, SMALL)
            for s in dicom_sources(dicom_root, assigner, assignment_key=assigner.key)}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float(np.sum((a > 0) & (b > 0))) / max(1, int(np.sum(a > 0) + np.sum(b > 0)))


# --- NIfTI ------------------------------------------------------------------------------------------------------


def test_nifti_case_on_model_grid(nifti_cached, study):
    c = nifti_cached
    n = c.n_slices
    assert c.label.shape == c.brain.shape == (n, 128, 128)
    assert c.roles_present == ROLES3 and c.volumes["flair"] is None
    assert all(c.volumes[r].shape == (n, 128, 128) and c.volumes[r].dtype == np.float16 for r in ROLES3)
    assert c.meta["reference_role"] == "t1_bravo_post"
    truth = sitk.GetArrayFromImage(sitk.Resample(study.label, c.grid(), sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    np.testing.assert_array_equal(c.label, truth > 0)
    _, expected = ndimage.label(truth > 0, structure=STRUCTURE_26)  # touching lesions may merge
    assert c.n_lesions == expected and 1 <= expected <= len(study.lesions)
    assert np.all(c.brain[c.label > 0] == 1)


def test_nifti_cache_hit_and_rebuild(nifti_root, tmp_path):
    case = tmp_path / "case-a"
    shutil.copytree(nifti_root / "case-a", case)
    [source] = nifti_sources(tmp_path)
    first = cache_case(source, tmp_path / "cache", SMALL)
    stamp = (first.folder / "meta.json").stat().st_mtime_ns

    def no_load():
        raise AssertionError("a cache hit must not load the case")

    again = cache_case(dataclasses.replace(source, load=no_load), tmp_path / "cache", SMALL)
    assert again.folder == first.folder and (again.folder / "meta.json").stat().st_mtime_ns == stamp

    label = case / "truth" / "label.nii.gz"
    later = label.stat().st_mtime_ns + 5_000_000_000
    os.utime(label, ns=(later, later))
    [touched] = nifti_sources(tmp_path)
    assert touched.fingerprint != source.fingerprint
    rebuilt = cache_case(touched, tmp_path / "cache", SMALL)
    assert rebuilt.folder != first.folder and not first.folder.exists()  # the stale key is removed


def test_nifti_missing_role(nifti_root, tmp_path):
    shutil.copytree(nifti_root / "case-a", tmp_path / "case-b")
    (tmp_path / "case-b" / "nifti" / "t1_cube_pre.nii.gz").unlink()
    [source] = nifti_sources(tmp_path)
    c = cache_case(source, tmp_path / "cache", SMALL)
    assert c.roles_present == ("t1_bravo_post", "t1_cube_post") and c.volumes["t1_cube_pre"] is None


# --- DICOM ------------------------------------------------------------------------------------------------------


def test_rules_assign_the_written_series(dicom_root, assigner, study):
    files = assigner(dicom_root / "with-seg")
    assert set(files) == set(ROLES3)
    plan = plan_study(study)
    for sp in plan.series:
        role = study.series[sp.index].kind.value
        assert sorted(files[role]) == sorted((dicom_root / "with-seg" / "scanner" / sp.folder).glob("*.dcm"))
    assert all(p.name != "lesions.dcm" for paths in files.values() for p in paths)


def test_dicom_sources_fingerprint(dicom_root, assigner):
    sources = dicom_sources(dicom_root, assigner, assignment_key=assigner.key)
    assert [s.case_id for s in sources] == ["with-nifti", "with-seg"]
    assert all(s.kind == "dicom" for s in sources)
    unkeyed = dicom_sources(dicom_root, assigner)
    assert all(a.fingerprint != b.fingerprint for a, b in zip(sources, unkeyed))  # other rules: other cache


@pytest.mark.parametrize("case_id", ["with-nifti", "with-seg"])
def test_dicom_label_matches_nifti_form(dicom_cached, nifti_cached, case_id):
    c = dicom_cached[case_id]
    assert c.roles_present == ROLES3 and c.meta["reference_role"] == "t1_bravo_post"
    assert c.label.shape == nifti_cached.label.shape
    np.testing.assert_allclose(c.grid().GetOrigin(), nifti_cached.grid().GetOrigin(), atol=1e-3)
    if case_id == "with-nifti":  # the same label file on the same grid
        np.testing.assert_array_equal(c.label, nifti_cached.label)
    else:  # frames placed by position, only the lesion slices stored
        assert _dice(c.label, nifti_cached.label) > 0.95
    assert c.n_lesions == nifti_cached.n_lesions


def test_seg_covers_only_lesion_slices(dicom_root, study):
    """The SEG case really tests placement by position: highdicom leaves the empty slices out."""
    seg = pydicom.dcmread(dicom_root / "with-seg" / "annotations" / "lesions.dcm")
    positions = {tuple(f.PlanePositionSequence[0].ImagePositionPatient) for f in seg.PerFrameFunctionalGroupsSequence}
    assert 0 < len(positions) < study.label.GetSize()[2]


def _copy_dicom(dicom_root: Path, dst: Path) -> Path:
    shutil.copytree(dicom_root / "with-seg", dst)
    return dst


def test_dicom_truth_errors(dicom_root, assigner, tmp_path, study):
    none = _copy_dicom(dicom_root, tmp_path / "no-truth")
    (none / "annotations" / "lesions.dcm").unlink()
    with pytest.raises(CaseError, match=r"case no-truth: needs exactly one ground truth.*found 0"):
        load_dicom_case(none, assigner)
    both = _copy_dicom(dicom_root, tmp_path / "two-truths")
    shutil.copy(dicom_root / "with-nifti" / "truth" / "label.nii.gz", both / "truth" / "label.nii.gz")
    with pytest.raises(CaseError, match=r"case two-truths: .*found 2") as err:
        load_dicom_case(both, assigner)
    assert study.patient.name not in str(err.value) and study.patient.patient_id not in str(err.value)


def test_dicom_role_errors(dicom_root, assigner, tmp_path):
    empty = tmp_path / "no-dicom"
    empty.mkdir()
    (empty / "notes.txt").write_text("not DICOM")
    with pytest.raises(CaseError, match="case no-dicom: no DICOM files found"):
        load_dicom_case(empty, assigner)
    with pytest.raises(CaseError, match="case with-seg: no series was assigned a role"):
        load_dicom_case(dicom_root / "with-seg", lambda folder: {})


# --- BrainMetShare ----------------------------------------------------------------------------------------------


N_SLICES = 12


@pytest.fixture(scope="module")
def bms(study, tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """12 slices around the lesions, files 1.png..12.png; folder 1 as 16-bit, folder 2 as RGB, no folder 3."""
    root = tmp_path_factory.mktemp("bms")
    label = sitk.GetArrayFromImage(study.label) > 0
    centre = int(np.mean(np.flatnonzero(label.any(axis=(1, 2)))))
    first = min(max(0, centre - N_SLICES // 2), label.shape[0] - N_SLICES)
    picked = slice(first, first + N_SLICES)
    arrays = {"seg": np.where(label[picked], 255, 0).astype(np.uint8)}
    for name, role in (("0", "t1_bravo_post"), ("1", "t1_cube_pre"), ("2", "t1_cube_post")):
        a = sitk.GetArrayFromImage(study.coregistered[role])[picked].astype(np.float64)
        top = 65535 if name == "1" else 255
        arrays[name] = np.round(a / a.max() * top).astype(np.uint16 if name == "1" else np.uint8)
    for name, stack in arrays.items():
        (root / "case-1" / name).mkdir(parents=True)
        for k, plane in enumerate(stack):
            img = Image.fromarray(plane)
            (img.convert("RGB") if name == "2" else img).save(root / "case-1" / name / f"{k + 1}.png")
    return root, arrays


def test_brainmetshare_case(bms):
    root, arrays = bms
    [source] = brainmetshare_sources(root)
    case = source.load()
    assert case.roles_present == ROLES3 and case.reference_role == "t1_bravo_post" and case.brain_mask is None
    for name, role in (("0", "t1_bravo_post"), ("1", "t1_cube_pre"), ("2", "t1_cube_post")):
        img = case.images[role]
        # numeric order: 1, 2, ..., 10, 11, 12 (lexicographic would put 10-12 after 1)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img), arrays[name].astype(np.float32))
        rows, cols = arrays[name].shape[1:]
        assert img.GetSize() == (cols, rows, N_SLICES)
        assert img.GetSpacing() == pytest.approx(DEFAULT_SPACING_MM)
        assert img.GetOrigin() == (0.0, 0.0, 0.0) and img.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(case.label), arrays["seg"] > 0)
    c = cache_case(source, root.parent / (root.name + "-cache"), SMALL)
    assert c.roles_present == ROLES3 and c.n_lesions >= 1 and c.brain.any()


def test_brainmetshare_spacing_and_errors(bms, tmp_path):
    root, _ = bms
    [spaced] = find_sources("brainmetshare", root, spacing_mm=(1.0, 1.0, 2.0))
    assert spaced.load().images["t1_cube_pre"].GetSpacing() == (1.0, 1.0, 2.0)
    assert spaced.fingerprint != brainmetshare_sources(root)[0].fingerprint
    case = tmp_path / "case-2"
    shutil.copytree(root / "case-1", case)
    (case / "1" / "12.png").unlink()
    with pytest.raises(CaseError, match=r"case case-2: folder 1 has 11 slices"):
        load_brainmetshare_case(case)
    shutil.rmtree(case / "seg")
    with pytest.raises(CaseError, match="case case-2: no seg folder"):
        load_brainmetshare_case(case)


# --- dispatcher -------------------------------------------------------------------------------------------------


def test_find_sources(nifti_root, dicom_root, assigner, tmp_path):
    assert [s.case_id for s in find_sources("nifti", nifti_root)] == ["case-a"]
    assert len(find_sources("dicom", dicom_root, assign_roles=assigner, assignment_key=assigner.key)) == 2
    with pytest.raises(ValueError, match="unknown data kind 'png'"):
        find_sources("png", nifti_root)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dicom data needs assign_roles"):
        find_sources("dicom", dicom_root)
    with pytest.raises(ValueError, match="spacing_mm applies to brainmetshare data only"):
        find_sources("nifti", nifti_root, spacing_mm=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="assign_roles and assignment_key apply to dicom data only"):
        find_sources("nifti", nifti_root, assign_roles=assigner)
    with pytest.raises(CaseError, match="no brainmetshare case found"):
        find_sources("brainmetshare", tmp_path)
    with pytest.raises(CaseError, match="not a folder"):
        find_sources("dicom", tmp_path / "missing", assign_roles=assigner)
