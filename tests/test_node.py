"""The whole node with real peers: DCMTK ``storescu``/``echoscu`` send to ``dicom-node serve``, DCMTK
``storescp`` receives what it sends back, ``dciodvfy`` checks the SEG and SR (issue #5's test list)."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from pathlib import Path

import pydicom
import pytest
from node_harness import (
    NodeProcess,
    free_port,
    node_config,
    storescp,
    storescu,
    wait_for,
)
from support.known_model import known_checkpoint
from support.studies import lesion_study, write_study
from test_phantom_dicom import _dciodvfy_problems

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-dicom"
DWI = REAL / "dcm_qa_ge" / "01_Ax_DWI_TENSOR_R2"  # a real GE DWI: no role for it (MANIFEST.md)

pytestmark = pytest.mark.slow


def _study_uid(folder: Path) -> str:
    first = next(p for p in sorted(folder.rglob("*")) if p.is_file())
    return str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict[str, Path]:
    """Small 3 mm synthetic studies (seconds to process with the known-function model)."""
    tmp = tmp_path_factory.mktemp("studies")
    out = {}
    for name, seed, missing in (("full", 0, ()), ("no_bravo", 1, ("t1_bravo_post",)), ("full2", 2, ())):
        write_study(lesion_study(seed, missing=missing), tmp / name)
        out[name] = tmp / name
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    # Lesions come from CUBE post: present in every study here, with or without BRAVO.
    return known_checkpoint(tmp_path_factory.mktemp("model") / "known.safetensors", "t1_cube_post")


@pytest.fixture(scope="module")
def node(tmp_path_factory, model):
    """One node with one destination (DCMTK storescp), shared by the tests that do not stop it."""
    tmp = tmp_path_factory.mktemp("node")
    with storescp(tmp / "dest") as dest_port:
        cfg = node_config(tmp, model=model, destinations=[
            {"name": "pacs", "ae_title": "DEST", "host": "127.0.0.1", "port": dest_port}])
        with NodeProcess(cfg) as n:
            n.dest = tmp / "dest"
            yield n


def _received(dest: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(dest.rglob("*")) if p.is_file()]


def _results_at_destination(dest: Path, study_uid: str) -> dict[str, list[pydicom.Dataset]]:
    out: dict[str, list[pydicom.Dataset]] = {}
    for ds in _received(dest):
        if ds.StudyInstanceUID == study_uid:
            out.setdefault(str(ds.Modality), []).append(ds)
    return out


def test_echo(node: NodeProcess) -> None:
    r = subprocess.run(["echoscu", "-aet", "PACS", "-aec", "ILD_NODE", "127.0.0.1", str(node.port)],
                       capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 0, r.stderr


def test_full_study_comes_back_as_valid_seg_and_sr(node: NodeProcess, studies, tmp_path: Path) -> None:
    uid = _study_uid(studies["full"])
    r = storescu(node.port, [studies["full"]])
    assert r.returncode == 0, r.stderr
    st = node.wait_state(uid, {"sent"})
    case = st["case"]
    assert set(case["roles"]) == {"t1_bravo_post", "t1_cube_pre", "t1_cube_post", "flair"}
    assert case["lesions"]["count"] >= 1
    assert [d["state"] for d in case["deliveries"]] == ["sent"]
    results = node.settings["storage"]["root"]
    summary = json.loads((Path(results) / "results" / uid / "summary.json").read_text())
    assert summary["lesion_count"] == case["lesions"]["count"]
    def arrived() -> dict[str, list[pydicom.Dataset]] | None:
        r = _results_at_destination(node.dest, uid)
        return r if {"SEG", "SR"} <= set(r) else None

    got = wait_for(arrived, 10, "SEG and SR at storescp")
    assert len(got["SEG"]) == 1 and len(got["SR"]) == 1
    for modality in ("SEG", "SR"):
        path = tmp_path / f"{modality}.dcm"
        got[modality][0].save_as(path)
        errors, _ = _dciodvfy_problems(path)
        assert errors == [], f"{modality}: {errors}"
    assert str(got["SEG"][0].SeriesInstanceUID) == summary["outputs"]["seg_series_instance_uid"]
    assert str(got["SR"][0].SeriesInstanceUID) == summary["outputs"]["sr_series_instance_uid"]
    # No patient data in the node's log.
    source = pydicom.dcmread(next(studies["full"].rglob("*.dcm")), stop_before_pixels=True)
    log = node.log()
    for value in (str(source.PatientName), str(source.PatientID)):
        assert value not in log


def test_secondary_capture_sent_with_seg_and_sr(tmp_path: Path, model: Path, studies) -> None:
    """outputs.secondary_capture: the SC series (summary + one key image per lesion) reaches the destination
    with the SEG and SR, in the study, dciodvfy clean (issue #18 part 4)."""
    uid = _study_uid(studies["full"])
    with storescp(tmp_path / "dest") as dest_port:
        cfg = node_config(tmp_path, model=model, outputs={"secondary_capture": True}, destinations=[
            {"name": "pacs", "ae_title": "DEST", "host": "127.0.0.1", "port": dest_port}])
        with NodeProcess(cfg) as n:
            assert storescu(n.port, [studies["full"]]).returncode == 0
            n.wait_state(uid, {"sent"})
            summary = json.loads((Path(n.settings["storage"]["root"]) / "results" / uid / "summary.json").read_text())
    n_sc = summary["lesion_count"] + 1
    assert summary["outputs"]["sc_instances"] == n_sc

    def arrived() -> dict[str, list[pydicom.Dataset]] | None:
        r = _results_at_destination(tmp_path / "dest", uid)
        return r if len(r.get("SEG", [])) == 1 and len(r.get("SR", [])) == 1 and len(r.get("OT", [])) == n_sc \
            else None

    got = wait_for(arrived, 10, "SEG, SR and SC at storescp")
    sc = sorted(got["OT"], key=lambda ds: int(ds.InstanceNumber))
    assert {ds.SOPClassUID for ds in sc} == {"1.2.840.10008.5.1.4.1.1.7"}  # Secondary Capture Image Storage
    assert {ds.SeriesInstanceUID for ds in sc} == {summary["outputs"]["sc_series_instance_uid"]}
    assert all(ds.BurnedInAnnotation == "YES" and ds.ImageType[0] == "DERIVED" for ds in sc)
    for ds in sc[:2]:  # the summary and the first key image
        path = tmp_path / f"sc-{ds.InstanceNumber}.dcm"
        ds.save_as(path)
        errors, _ = _dciodvfy_problems(path)
        assert errors == [], f"SC {ds.InstanceNumber}: {errors}"


def test_study_without_bravo_is_processed(node: NodeProcess, studies) -> None:
    uid = _study_uid(studies["no_bravo"])
    assert storescu(node.port, [studies["no_bravo"]]).returncode == 0
    case = node.wait_state(uid, {"sent"})["case"]
    assert "t1_bravo_post" not in case["roles"] and "t1_bravo_post" in case["missing_roles"]
    assert case["lesions"]["count"] >= 1


def test_only_distractors_is_skipped_with_reason(node: NodeProcess) -> None:
    uid = _study_uid(DWI)
    assert storescu(node.port, [DWI]).returncode == 0
    st = node.wait_state(uid, {"skipped"})
    assert st["case"]["error"].startswith("no usable series")
    r = node.cli("status", "--study", uid)
    assert r.returncode == 0 and "skipped" in r.stdout and "no usable series" in r.stdout


def test_two_studies_interleaved_on_parallel_associations(node: NodeProcess, studies, tmp_path: Path) -> None:
    # Two studies, each split in two halves sent on two associations at once: four associations, interleaved.
    uids = []
    halves: list[list[Path]] = []
    for name, seed in (("a", 7), ("b", 8)):
        write_study(lesion_study(seed), tmp_path / name)
        uids.append(_study_uid(tmp_path / name))
        files = sorted((tmp_path / name).rglob("*.dcm"))
        halves += [files[0::2], files[1::2]]
    results: list[int] = []
    threads = [threading.Thread(target=lambda h=h: results.append(storescu(node.port, h).returncode)) for h in halves]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [0, 0, 0, 0]
    for uid in uids:
        case = node.wait_state(uid, {"sent"})["case"]
        assert len(case["roles"]) == 4 and case["version"] == 1


def test_unknown_called_ae_and_malformed_file_are_refused_node_keeps_running(node: NodeProcess, tmp_path) -> None:
    wrong = storescu(node.port, [DWI], called="SOMEONE_ELSE")
    assert wrong.returncode != 0
    good = next(p for p in sorted(DWI.iterdir()) if p.is_file())
    # A hostile file: its SOP Instance UID would be a path outside the storage folder. Refused, nothing written.
    bad = tmp_path / "hostile.dcm"
    ds = pydicom.dcmread(good)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3/../../../escaped"
    ds.save_as(bad)
    r = node.cli("send", str(bad), "--to", f"127.0.0.1:{node.port}:ILD_NODE", "--no-progress")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "sent 0 of 1" in r.stdout
    assert not list(Path(node.settings["storage"]["root"]).parent.rglob("escaped*"))
    again = node.cli("echo", "127.0.0.1", str(node.port), "ILD_NODE")
    assert again.returncode == 0, again.stderr
    ok = node.cli("send", str(good), "--to", f"127.0.0.1:{node.port}:ILD_NODE", "--no-progress")
    assert ok.returncode == 0 and "sent 1 of 1" in ok.stdout, ok.stdout + ok.stderr


def test_unknown_calling_ae_refused(tmp_path: Path, model: Path, studies) -> None:
    cfg = node_config(tmp_path, model=model, node={"allowed_callers": [{"ae_title": "ORTHANC", "host": "127.0.0.1"}]})
    with NodeProcess(cfg) as n:
        refused = storescu(n.port, [studies["full"]], calling="INTRUDER")
        assert refused.returncode != 0
        assert "rejected" in (refused.stderr + refused.stdout).lower()
        assert not (Path(n.settings["storage"]["root"]) / "incoming").exists() or \
            not any((Path(n.settings["storage"]["root"]) / "incoming").rglob("*.dcm"))
        ok = subprocess.run(["echoscu", "-aet", "ORTHANC", "-aec", "ILD_NODE", "127.0.0.1", str(n.port)],
                            capture_output=True, text=True, timeout=30, check=False)
        assert ok.returncode == 0
        assert "INTRUDER" in n.log() and "refused" in n.log().lower()


def test_destination_down_then_up_delivered_once(tmp_path: Path, model: Path, studies) -> None:
    dest_port = free_port()
    cfg = node_config(tmp_path, model=model, destinations=[
        {"name": "pacs", "ae_title": "DEST", "host": "127.0.0.1", "port": dest_port}])
    uid = _study_uid(studies["full2"])
    with NodeProcess(cfg) as n:
        assert storescu(n.port, [studies["full2"]]).returncode == 0

        def failed_once() -> bool:
            st = n.study(uid)
            return bool(st and st["case"] and st["case"]["deliveries"] and st["case"]["deliveries"][0]["attempts"] >= 2)

        wait_for(failed_once, 120, "two failed delivery attempts while the destination is down")
        st = n.study(uid)
        assert st["state"] == "done" and st["case"]["deliveries"][0]["state"] == "pending"
        assert "refused" in st["case"]["deliveries"][0]["error"].lower() or st["case"]["deliveries"][0]["error"]
        with storescp(tmp_path / "dest", port=dest_port):
            n.wait_state(uid, {"sent"}, timeout=60)
            got = _results_at_destination(tmp_path / "dest", uid)
        assert len(got["SEG"]) == 1 and len(got["SR"]) == 1  # once, no duplicate
        # resend queues it again, explicitly
        r = n.cli("resend", uid)
        assert r.returncode == 0, r.stderr
        assert "1 delivery queued" in r.stdout


def test_late_instance_makes_a_new_version_and_keeps_the_old(tmp_path: Path, model: Path, studies) -> None:
    cfg = node_config(tmp_path, model=model)
    uid = _study_uid(studies["full"])
    files = sorted(studies["full"].rglob("*.dcm"))
    flair = [p for p in files if "FLAIR" in p.parent.name.upper()]
    first = [p for p in files if p not in flair[-1:]]
    with NodeProcess(cfg) as n:
        assert storescu(n.port, first).returncode == 0
        v1 = n.wait_state(uid, {"done"})["case"]
        assert v1["version"] == 1
        root = Path(n.settings["storage"]["root"])
        before = (root / "results" / uid / "summary.json").read_bytes()
        assert storescu(n.port, flair[-1:]).returncode == 0
        def version_2_done() -> dict | None:
            s = n.study(uid)
            return s if s and s["case"]["version"] == 2 and s["state"] == "done" else None

        v2 = wait_for(version_2_done, 120, "version 2 done")["case"]
        assert v2["result_dir"] == f"results/{uid}/version-2"
        assert (root / "results" / uid / "summary.json").read_bytes() == before
        assert (root / v2["result_dir"] / "summary.json").is_file()
        # repeating an instance already received changes nothing
        assert storescu(n.port, flair[-1:]).returncode == 0
        assert n.study(uid)["instances"] == len(files)


def test_sigterm_stops_gracefully_and_status_cli(tmp_path: Path, model: Path) -> None:
    cfg = node_config(tmp_path, model=model)
    n = NodeProcess(cfg).start()
    assert n.stop() == 0
    assert "stopped" in n.log()
    r = n.cli("status")
    assert r.returncode == 0 and "no studies received yet" in r.stdout
    r = n.cli("reprocess", "1.2.3")
    assert r.returncode == 1 and "unknown study 1.2.3" in r.stderr
    r = n.cli("purge", "--older-than", "0", "--dry-run")
    assert r.returncode == 0 and "would remove 0" in r.stdout


def test_port_in_use_is_a_config_error(tmp_path: Path, model: Path) -> None:
    cfg = node_config(tmp_path, model=model)
    port = NodeProcess(cfg).port
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        r = NodeProcess(cfg).cli("serve")
    assert r.returncode == 2 and "already in use" in r.stderr


def test_sigterm_during_a_case_requeues_it_and_a_restart_finishes_it(tmp_path: Path, model: Path, studies) -> None:
    cfg = node_config(tmp_path, model=model, queue={"shutdown_grace_seconds": 0})
    uid = _study_uid(studies["no_bravo"])
    n = NodeProcess(cfg).start()
    try:
        assert storescu(n.port, [studies["no_bravo"]]).returncode == 0
        n.wait_state(uid, {"running"}, timeout=60)
        assert n.stop() == 0
        st = n.study(uid)
        assert st["state"] == "queued" and st["case"]["attempts"] == 0
        assert "node stopped (SIGTERM)" in st["case"]["error"]
        n.start()
        n.wait_state(uid, {"done"})
    finally:
        n.stop()
