"""pipeline.inference + pipeline.study on synthetic DICOM studies with a model of KNOWN behaviour
(:mod:`support.known_model`: the lesions of :func:`support.studies.lesion_study` are what it finds)."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from support.known_model import BIAS, FAST, IN_PLANE, THRESHOLD, known_checkpoint, known_model
from support.studies import lesion_study, write_study

from pipeline.checkpoint import CheckpointMeta, load_checkpoint
from pipeline.outputs import write_outputs
from pipeline.study import StudyError, run_study
from training.phantom.dicom_writer import plan_study

DCIODVFY = shutil.which("dciodvfy")


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """All four roles; reference BRAVO."""
    tmp = tmp_path_factory.mktemp("full")
    study = lesion_study(0)
    files = write_study(study, tmp / "dicom")
    model, meta = load_checkpoint(known_checkpoint(tmp / "m.safetensors", "t1_bravo_post"))
    calls: list[tuple[int, int]] = []
    result = run_study(files, model, meta, settings=FAST, progress=lambda d, t: calls.append((d, t)))
    written = write_outputs(result, tmp / "out")
    return study, files, result, written, calls


def _truth_lesions(study):
    return [les for les in study.lesions if les.volume_mm3 >= 200.0]


def test_lesions_found_where_planted(full):
    study, _, result, _, _ = full
    found = result.lesions.lesions
    assert result.reference_role == "t1_bravo_post"
    for truth in _truth_lesions(study):
        d = [np.linalg.norm(np.subtract(f.centroid_lps_mm, truth.centroid_lps_mm)) for f in found]
        # 3 mm voxels, model output sampled every 8 in-plane pixels (~1 mm each at 256 px) then interpolated:
        # the centroid of a blob of >= 200 mm3 is within a voxel diagonal (~5 mm) of the truth
        assert min(d) < 5.0, (truth, d)
        best = found[int(np.argmin(d))]
        # volume: DeepLab computes the map every 8 pixels (8 mm at 256 px over ~250 mm) and interpolates the
        # logits, so the 0.5 contour can move outwards by up to half a cell (4 mm): at most the truth's
        # equivalent sphere grown by 4 mm, at least half the truth (the whole lesion is above threshold)
        r = (3.0 * truth.volume_mm3 / (4.0 * np.pi)) ** (1.0 / 3.0)
        assert 0.5 * truth.volume_mm3 < best.volume_mm3 < truth.volume_mm3 * ((r + 4.0) / r) ** 3, (truth, best)


def test_geometry_round_trip(full):
    """The reference-grid probability equals the model-grid map's log-odds, trilinearly interpolated (own numpy
    code) at the physical position of each reference voxel, through the sigmoid."""
    _, _, result, _, _ = full
    inf = result.inference
    prob_grid, grid = inf.probability_grid, inf.grid
    ref = inf.probability
    rng = np.random.default_rng(0)
    size = np.array(ref.GetSize())
    idx = rng.integers(0, size, size=(400, 3))
    arr_ref = sitk.GetArrayFromImage(ref)
    # include voxels on the lesions, where the map varies
    lab = sitk.GetArrayFromImage(result.lesions.labels)
    on = np.argwhere(lab > 0)[:, ::-1]
    idx = np.concatenate([idx, on[rng.choice(len(on), size=min(200, len(on)), replace=False)]])
    errs = []
    for i in idx:
        p = ref.TransformIndexToPhysicalPoint([int(v) for v in i])
        c = np.array(grid.TransformPhysicalPointToContinuousIndex(p))[::-1]  # (z, y, x)
        shape = np.array(prob_grid.shape)
        if np.any(c < 0) or np.any(c > shape - 1):
            continue
        lo = np.minimum(np.floor(c).astype(int), shape - 2)
        f = c - lo
        v = 0.0
        for dz in (0, 1):
            for dy in (0, 1):
                for dx in (0, 1):
                    w = (f[0] if dz else 1 - f[0]) * (f[1] if dy else 1 - f[1]) * (f[2] if dx else 1 - f[2])
                    p_node = float(prob_grid[lo[0] + dz, lo[1] + dy, lo[2] + dx])
                    v += w * (np.log(p_node) - np.log1p(-p_node))
        errs.append(abs(1.0 / (1.0 + np.exp(-v)) - arr_ref[i[2], i[1], i[0]]))
    assert len(errs) > 300
    assert max(errs) < 1e-4


def test_model_grid_is_known_function(full):
    """Away from lesions the difference input is 0, so the probability is exactly sigmoid(BIAS)."""
    _, _, result, _, _ = full
    inf = result.inference
    assert inf.grid.GetSize()[0] == IN_PLANE
    lab = sitk.GetArrayFromImage(sitk.Resample(result.lesions.labels, inf.grid, sitk.Transform(3, sitk.sitkIdentity),
                                               sitk.sitkNearestNeighbor, 0))
    far = ~np.asarray(sitk.GetArrayFromImage(sitk.BinaryDilate(sitk.GetImageFromArray((lab > 0).astype(np.uint8)),
                                                                   [24, 24, 2])), dtype=bool)
    base = 1.0 / (1.0 + np.exp(-BIAS))
    # most of the grid (air, brain without lesions) is at the baseline
    assert np.mean(np.isclose(inf.probability_grid[far], base, atol=1e-3)) > 0.97
    assert inf.probability_grid.max() > 0.99  # GAIN * lesion contrast saturates the sigmoid


def test_progress_and_timings(full):
    _, _, result, _, calls = full
    n = result.inference.n_batches
    assert calls == [(i, n) for i in range(1, n + 1)]
    assert set(result.timings_s) >= {"load", "register", "preprocess", "inference", "lesions", "dicom", "outputs"}
    assert all(v >= 0 for v in result.timings_s.values())


def test_summary_json(full):
    study, files, result, written, _ = full
    s = json.loads(written["summary"].read_text())
    assert s["study_instance_uid"] == plan_study(study).study_uid
    for role, paths in files.items():
        assert s["roles"][role]["series_instance_uid"] == pydicom.dcmread(paths[0]).SeriesInstanceUID
        assert "metric_final" in s["roles"][role]["registration"]
        assert "warning" in s["roles"][role]["registration"]
    assert s["roles"]["t1_bravo_post"]["registration"]["is_reference"] is True
    assert s["roles_missing"] == []
    assert s["threshold"] == THRESHOLD
    assert s["expected_performance"] == {"roles": "t1_bravo_post+t1_cube_pre+t1_cube_post+flair", "auc": 0.99,
                                         "dice": 0.8, "lesion_sensitivity": 0.9,
                                         "source": "the model's validation set (checkpoint metadata), not this study"}
    assert s["model"]["name"] == "ILD-known-function" and s["model"]["version"] == "0.0.1-test"
    assert s["model"]["training_run_uid"] == result.meta.training_run_uid
    assert s["lesion_count"] == len(s["lesions"]) == result.lesions.count_all >= 1
    assert s["lesion_count_ge_10mm3"] == sum(les["volume_mm3"] >= 10 for les in s["lesions"])
    assert s["total_volume_mm3"] == pytest.approx(sum(les["volume_mm3"] for les in s["lesions"]), abs=0.01)
    les = s["lesions"][0]
    assert set(les) >= {"number", "volume_mm3", "centroid_lps_mm", "max_diameter_mm", "mean_probability",
                        "max_probability"}
    assert THRESHOLD <= les["mean_probability"] <= les["max_probability"] <= 1.0
    assert set(s["timings_s"]) >= {"load", "register", "preprocess", "inference", "lesions", "dicom", "outputs",
                                   "total"}
    assert s["software_version"]
    text = written["summary"].read_text()
    assert study.patient.name not in text and study.patient.patient_id not in text


def test_seg_sr_written_and_valid(full):
    _, files, result, written, _ = full
    seg = pydicom.dcmread(written["seg"])
    sr = pydicom.dcmread(written["sr"])
    assert seg.Modality == "SEG" and sr.Modality == "SR"
    assert len(seg.SegmentSequence) == result.lesions.count_all
    ref_uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in files["t1_bravo_post"]}
    refd = {i.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence}
    assert refd <= ref_uids and refd
    assert written["overview"].stat().st_size > 10_000
    if DCIODVFY:
        for p in (written["seg"], written["sr"]):
            run = subprocess.run([DCIODVFY, str(p)], capture_output=True, text=True, check=False)
            errors = [ln for ln in (run.stdout + run.stderr).splitlines() if ln.startswith("Error")]
            assert errors == [], (p.name, errors)


def test_missing_bravo_uses_cube_post(tmp_path):
    study = lesion_study(0, missing=("t1_bravo_post",))
    files = write_study(study, tmp_path / "dicom")
    assert "t1_bravo_post" not in files
    model, meta = load_checkpoint(known_checkpoint(tmp_path / "m.safetensors", "t1_cube_post"))
    result = run_study(files, model, meta, settings=FAST)
    assert result.reference_role == "t1_cube_post"
    assert result.inference.roles_used == ("t1_cube_pre", "t1_cube_post", "flair")
    written = write_outputs(result, tmp_path / "out")
    s = json.loads(written["summary"].read_text())
    assert s["roles_missing"] == ["t1_bravo_post"] and s["reference_role"] == "t1_cube_post"
    assert s["expected_performance"] is None  # the checkpoint has no validation figures for these three roles
    for truth in _truth_lesions(study):
        d = [np.linalg.norm(np.subtract(f.centroid_lps_mm, truth.centroid_lps_mm)) for f in result.lesions.lesions]
        assert min(d) < 5.0


def test_no_lesion_study(tmp_path):
    study = lesion_study(1, missing=("flair", "t1_cube_post"), blank_lesions=True)
    files = write_study(study, tmp_path / "dicom")
    model, meta = load_checkpoint(known_checkpoint(tmp_path / "m.safetensors", "t1_bravo_post"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "seg.dcm").write_bytes(b"stale")
    result = run_study(files, model, meta, settings=FAST)
    written = write_outputs(result, out)
    assert result.lesions.count_all == 0 and result.seg is None
    assert not (out / "seg.dcm").exists() and "seg" not in written
    s = json.loads(written["summary"].read_text())
    assert s["lesion_count"] == 0 and s["lesions"] == [] and s["outputs"]["seg_series_instance_uid"] is None
    sr = pydicom.dcmread(written["sr"])
    counts = [item for item in _walk(sr) if "ConceptNameCodeSequence" in item
              and item.ConceptNameCodeSequence[0].CodeValue == "ILD001"]
    assert counts and float(counts[0].MeasuredValueSequence[0].NumericValue) == 0


def _walk(ds):
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _walk(item)


def test_conflicting_patients_refused(tmp_path):
    study = lesion_study(2, missing=("flair", "t1_cube_post"))
    files = write_study(study, tmp_path / "dicom")
    for p in files["t1_cube_pre"]:
        ds = pydicom.dcmread(p)
        ds.PatientID = "SOMEONE-ELSE"
        ds.save_as(p)
    model, meta = load_checkpoint(known_checkpoint(tmp_path / "m.safetensors", "t1_bravo_post"))
    with pytest.raises(StudyError, match="different PatientIDs") as exc:
        run_study(files, model, meta, settings=FAST)
    assert "SOMEONE-ELSE" not in str(exc.value) and study.patient.patient_id not in str(exc.value)


def test_no_series_refused():
    model = known_model("t1_bravo_post")
    meta = CheckpointMeta(model_name="m", model_version="1", threshold=0.5, normalisation="n",
                          normalisation_version="1", training_data="")
    with pytest.raises(StudyError, match="no usable series"):
        run_study({}, model, meta)


def test_single_lesion_seg_and_sr(tmp_path):
    """One lesion: highdicom puts the segment identification of a one-segment SEG in the shared functional group;
    the SR must still reference it (fixed in pipeline/dicom_out/sr.py)."""
    study = lesion_study(2, missing=("flair", "t1_cube_post"))
    assert len(study.lesions) == 1
    files = write_study(study, tmp_path / "dicom")
    model, meta = load_checkpoint(known_checkpoint(tmp_path / "m.safetensors", "t1_bravo_post"))
    result = run_study(files, model, meta, settings=FAST)
    assert result.lesions.count_all == 1
    d = np.linalg.norm(np.subtract(result.lesions.lesions[0].centroid_lps_mm, study.lesions[0].centroid_lps_mm))
    assert d < 6.0  # a 27 mm3 lesion = one 3 mm voxel: within a voxel diagonal (5.2 mm)
    written = write_outputs(result, tmp_path / "out")
    seg = pydicom.dcmread(written["seg"])
    assert len(seg.SegmentSequence) == 1
    sr = pydicom.dcmread(written["sr"])
    refs = [i for i in _walk(sr) if "ReferencedSOPSequence" in i
            and "ReferencedSegmentNumber" in i.ReferencedSOPSequence[0]]
    assert refs and refs[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID
    if DCIODVFY:
        for p in (written["seg"], written["sr"]):
            run = subprocess.run([DCIODVFY, str(p)], capture_output=True, text=True, check=False)
            assert [ln for ln in (run.stdout + run.stderr).splitlines() if ln.startswith("Error")] == []
