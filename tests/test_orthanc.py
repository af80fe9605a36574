"""Orthanc as the PACS (issue #6): a real Orthanc, configured from ``deploy/orthanc/`` (its Lua routing script
included), routes a stable MR study to the real ``dicom-node serve``, which sends its SEG and SR back.

Everything is checked through Orthanc's REST API: the study then holds one SEG and one SR, the SEG names a
source MR series Orthanc holds, the SR (TID 1500) counts the lesions ``summary.json`` counts, ``dciodvfy``
finds no error in what Orthanc stored, and the node's results arriving do not route the study again.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from node_harness import NodeProcess, free_port, node_config, storescp, wait_for
from orthanc_harness import (
    NODE_MODALITY,
    ORTHANC,
    OrthancProcess,
    load_orthanc_config,
    orthanc_config,
)
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from support.known_model import known_checkpoint
from support.studies import lesion_study, write_study
from test_phantom_dicom import DCIODVFY, _dciodvfy_problems

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(ORTHANC is None, reason="Orthanc is not installed (Debian package orthanc)"),
]

STABLE_AGE = 2  # Orthanc's seconds without a new instance before OnStableStudy
SENDING = "ILD node: sending"  # what the Lua script logs when it routes a study
NOTHING_NEW = "ILD node: nothing new to route in study"  # ... and when a stable study has nothing to route


def _items(container: pydicom.Dataset, code_value: str) -> list[pydicom.Dataset]:
    return [i for i in container.get("ContentSequence", [])
            if "ConceptNameCodeSequence" in i and i.ConceptNameCodeSequence[0].CodeValue == code_value]


def _sr_lesion_count(sr: pydicom.Dataset) -> int:
    """Number of lesions (99ILD ILD001) among the Derived Imaging Measurements of the node's TID 1500 SR."""
    (derived,) = _items(sr, "126011")  # Derived Imaging Measurements
    counts = _items(derived, "ILD001")
    assert len(counts) == 1, f"expected one lesion count in the SR, found {len(counts)}"
    return int(float(counts[0].MeasuredValueSequence[0].NumericValue))


def _tiny_mr_series(out: Path, study_uid: str, n: int) -> list[Path]:
    """``n`` small MR Image Storage instances of a new series in ``study_uid`` (enough for Orthanc's routing)."""
    out.mkdir(parents=True)
    series_uid, paths = generate_uid(), []
    for k in range(n):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
        ds.PatientID, ds.PatientName, ds.Modality = "ORTHANC-TEST", "TEST^ROUTING", "MR"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = study_uid, series_uid, k + 1
        ds.Rows = ds.Columns = 4
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = bytes(32)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = MRImageStorage, ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        paths.append(out / f"{k + 1}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def _secondary_capture(mr: Path, out: Path, modality: str) -> Path:
    """A Secondary Capture in the same study as ``mr``, its own series (a scanner's screen save, a report)."""
    ds = pydicom.dcmread(mr)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.save_as(out)
    return out


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory) -> Path:
    """A small 3 mm synthetic study: four MR series (BRAVO post, CUBE pre and post, FLAIR) with lesions."""
    out = tmp_path_factory.mktemp("study")
    write_study(lesion_study(3), out)
    return out


def test_deploy_config_is_ready_for_a_site() -> None:
    cfg = load_orthanc_config()
    node = cfg["DicomModalities"][NODE_MODALITY]
    assert (node["AET"], node["Port"]) == ("ILD_NODE", 11112)
    assert node["AllowStore"] and not node["AllowMove"] and not node["AllowGet"] and not node["AllowFind"]
    # Authentication on; the users belong in the Debian package's credentials.json (a setting may not be
    # defined in two files of Orthanc's configuration folder).
    assert cfg["AuthenticationEnabled"] is True and "RegisteredUsers" not in cfg
    assert cfg["DicomAlwaysAllowStore"] is False and cfg["DicomCheckModalityHost"] is True
    assert cfg["ExecuteLuaEnabled"] is False
    assert [Path(p).name for p in cfg["LuaScripts"]] == ["route-to-ild-node.lua"]
    assert cfg["IldNode"]["Modality"] == NODE_MODALITY and "IldNodeRouted" in cfg["UserMetadata"]


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (dicom3tools) is not installed")
def test_orthanc_routes_a_study_to_the_node_and_stores_its_seg_and_sr(tmp_path: Path, study_dir: Path) -> None:
    t0 = time.monotonic()
    files = sorted(study_dir.rglob("*.dcm"))
    model = known_checkpoint(tmp_path / "known.safetensors", "t1_cube_post")

    orthanc_dicom_port = free_port()
    (tmp_path / "node").mkdir()
    node_cfg = node_config(
        tmp_path / "node", model=model,
        destinations=[{"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc_dicom_port}],
        node={"allowed_callers": [{"ae_title": "ORTHANC", "host": "127.0.0.1"}]})  # Orthanc only
    node = NodeProcess(node_cfg)
    orthanc = OrthancProcess(orthanc_config(tmp_path / "orthanc", node_port=node.port, stable_age=STABLE_AGE,
                                            DicomPort=orthanc_dicom_port))
    timings: dict[str, float] = {"prepare": time.monotonic() - t0}
    with node, orthanc:
        # Both ends of the loop answer C-ECHO: Orthanc -> node (REST), node -> Orthanc (dicom-node echo).
        echo = orthanc.rest.post(f"/modalities/{NODE_MODALITY}/echo", content="{}")
        assert echo.status_code == 200, echo.text
        r = node.cli("echo", "127.0.0.1", str(orthanc.dicom_port), "ORTHANC")
        assert r.returncode == 0, r.stdout + r.stderr

        t1 = time.monotonic()
        answers = orthanc.upload(files)
        study_id = answers[0]["ParentStudy"]
        assert {a["ParentStudy"] for a in answers} == {study_id}
        study_uid = orthanc.get(f"/studies/{study_id}")["MainDicomTags"]["StudyInstanceUID"]
        timings["upload"] = time.monotonic() - t1

        def results_in_orthanc() -> dict[str, list[dict]] | None:
            by_modality: dict[str, list[dict]] = {}
            for series in orthanc.series_of_study(study_id):
                by_modality.setdefault(series["MainDicomTags"].get("Modality", ""), []).append(series)
            return by_modality if {"SEG", "SR"} <= set(by_modality) else None

        try:
            series = wait_for(results_in_orthanc, 180, "the SEG and SR in Orthanc's study", interval=0.5)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nnode status: {node.study(study_uid)}\nnode log:\n{node.log()[-3000:]}"
                                 f"\nOrthanc log:\n{orthanc.log()[-3000:]}") from None
        timings["to SEG + SR in Orthanc"] = time.monotonic() - t1
        assert len(series["SEG"]) == 1 and len(series["SR"]) == 1, series

        # What the node made of it: one case version, sent to Orthanc.
        case = node.wait_state(study_uid, {"sent"}, timeout=30)["case"]
        assert case["version"] == 1 and [d["state"] for d in case["deliveries"]] == ["sent"]
        summary = json.loads((Path(node.settings["storage"]["root"]) / "results" / study_uid / "summary.json")
                             .read_text())
        assert summary["lesion_count"] >= 1

        # The SEG and SR as Orthanc stored them.
        stored: dict[str, pydicom.Dataset] = {}
        for modality in ("SEG", "SR"):
            (instance_id,) = series[modality][0]["Instances"]
            path = tmp_path / f"orthanc-{modality}.dcm"
            path.write_bytes(orthanc.file(instance_id))
            errors, _ = _dciodvfy_problems(path)
            assert errors == [], f"dciodvfy on the {modality} Orthanc stored: {errors}"
            stored[modality] = pydicom.dcmread(path)
        seg, sr = stored["SEG"], stored["SR"]
        assert seg.StudyInstanceUID == sr.StudyInstanceUID == study_uid
        assert seg.SeriesInstanceUID == summary["outputs"]["seg_series_instance_uid"]
        assert sr.SeriesInstanceUID == summary["outputs"]["sr_series_instance_uid"]

        # The SEG references a source MR series of this study that Orthanc holds, frame by frame.
        mr_series = {s["MainDicomTags"]["SeriesInstanceUID"]: s for s in series["MR"]}
        (referenced,) = seg.ReferencedSeriesSequence
        assert referenced.SeriesInstanceUID in mr_series
        assert referenced.SeriesInstanceUID == summary["reference_series_instance_uid"]
        held = {i["MainDicomTags"]["SOPInstanceUID"]
                for i in orthanc.get(f"/series/{mr_series[referenced.SeriesInstanceUID]['ID']}/instances")}
        sources = {src.ReferencedSOPInstanceUID for frame in seg.PerFrameFunctionalGroupsSequence
                   for derivation in frame.DerivationImageSequence for src in derivation.SourceImageSequence}
        assert sources and sources <= held
        assert {r.ReferencedSOPInstanceUID for r in referenced.ReferencedInstanceSequence} <= held

        # The SR: TID 1500, the lesion count of summary.json, evidence naming the SEG Orthanc holds.
        assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
        assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
        assert _sr_lesion_count(sr) == summary["lesion_count"] == case["lesions"]["count"]
        evidence = {r.ReferencedSOPInstanceUID for study in sr.CurrentRequestedProcedureEvidenceSequence
                    for s in study.ReferencedSeriesSequence for r in s.ReferencedSOPSequence}
        assert seg.SOPInstanceUID in evidence

        # No loop: the SEG + SR made the study stable again; the script saw nothing new to route.
        wait_for(lambda: NOTHING_NEW in orthanc.log(), 4 * STABLE_AGE + 10,
                 "the second OnStableStudy (after the SEG + SR arrived)", interval=0.5)
        time.sleep(STABLE_AGE + 1)  # one more stable period: nothing may arrive or be sent
        log = orthanc.log()
        assert log.count(SENDING) == 1, log[-3000:]
        assert {m: len(s) for m, s in results_in_orthanc().items()} == {"MR": len(mr_series), "SEG": 1, "SR": 1}
        for modality in ("SEG", "SR"):
            assert len(orthanc.get(f"/series/{series[modality][0]['ID']}")["Instances"]) == 1
        st = node.study(study_uid)
        assert st["state"] == "sent" and st["case"]["version"] == 1
        assert st["instances"] == len(files)
        # The script recorded what it sent on each MR series.
        for s in series["MR"]:
            recorded = orthanc.rest.get(f"/series/{s['ID']}/metadata/IldNodeRouted")
            assert recorded.status_code == 200 and int(recorded.text) == len(s["Instances"])
        timings["total"] = time.monotonic() - t0
    print("timings (s):", {k: round(v, 1) for k, v in timings.items()})


def test_harness_config_keeps_the_deploy_lua_and_security(tmp_path: Path) -> None:
    cfg = json.loads(orthanc_config(tmp_path, node_port=12345).read_text())
    assert cfg["LuaScripts"] == [str(Path(__file__).resolve().parents[1] / "deploy" / "orthanc" /
                                     "route-to-ild-node.lua")]
    assert cfg["DicomModalities"][NODE_MODALITY]["Port"] == 12345
    assert cfg["AuthenticationEnabled"] is True and cfg["RemoteAccessAllowed"] is False
    assert subprocess.run([ORTHANC or "Orthanc", "--version"], capture_output=True, check=False).returncode == 0


def test_lua_routes_mr_images_once_and_retries_after_a_failed_store(tmp_path: Path) -> None:
    """The routing script alone, with DCMTK ``storescp`` as the node: only MR image instances go; a store
    that fails records nothing, so the study's next stable event sends it; unchanged MR series never go twice."""
    study_uid = generate_uid()
    a, b = (_tiny_mr_series(tmp_path / name, study_uid, 3) for name in ("a", "b"))
    screen_save = _secondary_capture(a[0], tmp_path / "screen.dcm", "MR")  # Modality MR, not an MR image
    other = _secondary_capture(a[0], tmp_path / "other.dcm", "OT")
    node_port = free_port()
    with OrthancProcess(orthanc_config(tmp_path / "orthanc", node_port=node_port, stable_age=1)) as orthanc:
        def logged(text: str, times: int, timeout: float = 30) -> None:
            wait_for(lambda: orthanc.log().count(text) >= times, timeout, f"{times} x {text!r} in Orthanc's log")

        # 1. The node is down: the store fails, nothing is recorded.
        study_id = orthanc.upload([*a[:2], *b, screen_save, other])[0]["ParentStudy"]
        logged("failed; it is tried again", 1)
        for series in orthanc.series_of_study(study_id):
            assert "IldNodeRouted" not in orthanc.get(f"/series/{series['ID']}/metadata")
        # 2. The node is up and a late MR instance arrives: the study is stable again and is sent, MR images only.
        received = tmp_path / "received"
        with storescp(received, ae_title="ILD_NODE", port=node_port):
            orthanc.upload([a[2]])
            logged("ILD node: sent study", 1)
            # 3. Something that is not an MR image arrives (as the node's SEG/SR do): nothing is sent again.
            orthanc.upload([_secondary_capture(a[0], tmp_path / "result.dcm", "SR")])
            logged(NOTHING_NEW, 1)
            time.sleep(1.5)
        got = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(received.rglob("*")) if p.is_file()]
        assert sorted(ds.SOPInstanceUID for ds in got) == sorted(
            pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in [*a, *b])
        assert {ds.SOPClassUID for ds in got} == {"1.2.840.10008.5.1.4.1.1.4"}
        log = orthanc.log()
        assert log.count(SENDING) == 2 and log.count("ILD node: sent study") == 1, log[-3000:]
        recorded = {s["MainDicomTags"]["SeriesInstanceUID"]: orthanc.get(f"/series/{s['ID']}/metadata?expand")
                    .get("IldNodeRouted") for s in orthanc.series_of_study(study_id)}
        assert sorted(v for v in recorded.values() if v is not None) == ["3", "3"]
