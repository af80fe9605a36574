"""The dashboard, JSON API and /metrics (issue #6).

Fast tests: FastAPI's TestClient on a database filled through the node's own code (index, router, queue),
one study with results and one still queued. One browser test: the real ``dicom-node serve`` with a
token, Debian's Chromium driven by Playwright: log in, the study is listed, its page shows the lesions
and the overview image, and Reprocess makes version 2.

``DASHBOARD_SCREENSHOTS=docs/images pytest tests/test_web.py -k browser`` also writes the README's
screenshots (docs/dashboard.md).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pydicom
import pytest
from node_harness import (
    NodeProcess,
    node_config,
    port_open,
    storescp,
    storescu,
    wait_for,
)
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid
from support.known_model import known_checkpoint
from support.studies import lesion_study, write_study
from test_queue import RULES, _receive

from dicom_node import __version__, metrics
from dicom_node.config import NodeConfig
from dicom_node.db import open_database
from dicom_node.queue import claim, complete
from dicom_node.router import route_complete_studies
from dicom_node.status import node_status
from dicom_node.storage import StorageLayout
from dicom_node.web import create_app

with warnings.catch_warnings():  # starlette's TestClient announces a future move to httpx2
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
REAL = ROOT.parent / "shared" / "data" / "real-dicom"
DWI = REAL / "dcm_qa_ge" / "01_Ax_DWI_TENSOR_R2"
TOKEN = "test-token-0123456789abcdef"
MODEL = {"name": "ILD-test", "version": "9.9", "threshold": 0.5, "file": "m.safetensors", "device": "cpu"}
SCREENSHOTS = os.environ.get("DASHBOARD_SCREENSHOTS")


def _uid(folder: Path) -> str:
    return str(pydicom.dcmread(next(folder.rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)


def _one_series_as_new_study(files: list[Path], out: Path) -> list[Path]:
    """Copies of one series under new Study/Series/SOP Instance UIDs: a second, single-role study."""
    study, series = generate_uid(), generate_uid()
    out.mkdir(parents=True)
    copies = []
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(out / f"{i:04d}.dcm")
        copies.append(out / f"{i:04d}.dcm")
    return copies


def _summary(study: dict) -> dict:
    """A summary.json as the pipeline writes it (docs/segment.md), for the roles the router chose."""
    roles = study["case"]["roles"]
    reg = {"is_reference": False, "metric_initial": -0.35, "metric_final": -0.45, "rotation_deg": 1.2,
           "translation_mm": 1.4, "fell_back": False, "warning": None, "seconds": 0.9}
    lesions = [{"number": 1, "volume_mm3": 1377.0, "voxel_count": 51, "centroid_lps_mm": [-8.7, -45.8, -8.7],
                "max_diameter_mm": 21.4, "mean_probability": 0.91, "max_probability": 1.0},
               {"number": 2, "volume_mm3": 6.5, "voxel_count": 1, "centroid_lps_mm": [11.9, -73.6, -7.1],
                "max_diameter_mm": 0.0, "mean_probability": 0.6, "max_probability": 0.6}]
    return {
        "summary_version": 1, "software_version": __version__, "study_instance_uid": study["study_instance_uid"],
        "reference_role": "t1_bravo_post",
        "roles": {role: {"series_instance_uid": r["series_instance_uid"], "n_slices": 59, "used_by_model": True,
                         "registration": {**reg, "is_reference": role == "t1_bravo_post"}}
                  for role, r in roles.items()},
        "roles_missing": [], "model": {"name": MODEL["name"], "version": MODEL["version"]},
        "threshold": 0.5, "threshold_rule": "youden", "expected_performance": None,
        "lesion_count": 2, "lesion_count_ge_10mm3": 1, "total_volume_mm3": 1383.5, "lesions": lesions,
        "outputs": {"seg_series_instance_uid": generate_uid(), "sr_series_instance_uid": generate_uid()},
        "warnings": [],
        "timings_s": {"load": 0.4, "register": 1.7, "preprocess": 0.5, "inference": 2.3, "lesions": 0.01,
                      "dicom": 2.0, "outputs": 1.2, "total": 8.1},
    }


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory) -> Path:
    """A small 3 mm synthetic four-sequence study with planted lesions (DICOM files)."""
    out = tmp_path_factory.mktemp("study") / "full"
    write_study(lesion_study(4), out)
    return out


@pytest.fixture(scope="module")
def filled(tmp_path_factory, study_dir):
    """A node database filled by the node's own code: study A received, routed, claimed and completed with
    results on disk; study B (one FLAIR series) received and routed, still queued."""
    tmp = tmp_path_factory.mktemp("web")
    config = NodeConfig.model_validate({
        "storage": {"root": str(tmp / "storage"), "min_free_gb": 0.0},
        "database": {"url": f"sqlite:///{tmp / 'node.db'}"},
        "rules": str(ROOT / "config" / "series_rules.yaml")}).resolved(tmp)
    db = open_database(config.database.url)
    root = config.storage.root
    received_before = metrics.RECEIVED._value.get()
    files = sorted(study_dir.rglob("*.dcm"))
    _receive(db, root, files, 1000.0)
    assert len(route_complete_studies(db, config.completion, RULES, now=5000.0)) == 1
    case = claim(db, "test:1:web", 60.0)
    uid = case.study_uid
    study = node_status(db, study_uid=uid)["studies"][0]
    summary = _summary(study)
    folder = StorageLayout(root).results_dir(uid, case.version)
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 48), (40, 40, 40)).save(folder / "overview.png")
    (folder / "summary.json").write_text(json.dumps(summary))
    assert complete(db, case.id, "test:1:web", folder.relative_to(root).as_posix(), summary, [])
    flair = sorted(next(p for p in study_dir.iterdir() if "FLAIR" in p.name.upper()).glob("*.dcm"))
    b_files = _one_series_as_new_study(flair, tmp / "b")
    _receive(db, root, b_files, 6000.0)
    assert len(route_complete_studies(db, config.completion, RULES, now=9000.0)) == 1
    yield {"config": config, "db": db, "a": uid, "b": _uid(tmp / "b"), "summary": summary,
           "received": metrics.RECEIVED._value.get() - received_before, "n_files": len(files) + len(b_files),
           "source": pydicom.dcmread(files[0], stop_before_pixels=True)}
    db.dispose()


def _config(filled, *, web: dict | None = None, destinations: list | None = None) -> NodeConfig:
    data = filled["config"].model_dump()
    data["web"].update(web or {})
    data["destinations"] = destinations or []
    return NodeConfig.model_validate(data)


def _client(filled, **web) -> TestClient:
    return TestClient(create_app(_config(filled, web=web), filled["db"], rules=RULES, model_info=lambda: MODEL))


def _with_destination(filled) -> NodeConfig:
    return _config(filled, destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}])


# --------------------------------------------------------------------------- JSON API


def test_health(filled) -> None:
    h = _client(filled).get("/api/health").json()
    assert h["status"] == "ok" and h["version"] == __version__
    assert h["model"] == {"loaded": True, **MODEL}
    assert h["queue"]["depth"] == 1 and h["queue"]["cases"]["done"] == 1  # B queued, A done
    assert h["storage"]["free_gb"] > 0 and h["storage"]["accepting"] is True
    assert h["uptime_s"] >= 0 and h["web"] == {"token_required": False}
    no_model = TestClient(create_app(filled["config"], filled["db"], rules=RULES)).get("/api/health").json()
    assert no_model["model"] == {"loaded": False} and no_model["status"] == "degraded"


def test_studies_is_node_status(filled) -> None:
    r = _client(filled).get("/api/studies")
    assert r.status_code == 200
    assert r.json() == node_status(filled["db"])
    assert [s["study_instance_uid"] for s in r.json()["studies"]] == [filled["b"], filled["a"]]
    assert len(_client(filled).get("/api/studies?limit=1").json()["studies"]) == 1


def test_study_has_its_summary(filled) -> None:
    body = _client(filled).get(f"/api/studies/{filled['a']}").json()
    assert body["study"]["state"] == "done" and body["results_version"] == 1
    assert body["summary"] == filled["summary"]
    queued = _client(filled).get(f"/api/studies/{filled['b']}").json()
    assert queued["summary"] is None and queued["study"]["case"]["roles"].keys() == {"flair"}


@pytest.mark.parametrize("path", ["/api/studies/1.2.3", "/api/studies/1.2.x", "/api/studies/" + "1." * 40 + "1",
                                  "/studies/1.2.3", "/studies/1.2.3/overview.png", "/api/studies/..%2F..%2Fetc"])
def test_unknown_or_invalid_study_is_404(filled, path) -> None:
    assert _client(filled).get(path).status_code == 404


def test_unknown_study_actions_are_404(filled) -> None:
    client = _client(filled)
    assert client.post("/api/studies/1.2.3/reprocess").status_code == 404
    assert client.post("/api/studies/1.2.3/resend").status_code == 404
    assert client.post("/api/studies/1.2.3.x/reprocess").status_code == 404


def test_resend_without_destinations_or_results_is_409(filled) -> None:
    r = _client(filled).post(f"/api/studies/{filled['a']}/resend")
    assert r.status_code == 409 and "no destinations configured" in r.json()["detail"]
    with_dest = TestClient(create_app(_with_destination(filled), filled["db"], rules=RULES))
    r = with_dest.post(f"/api/studies/{filled['b']}/resend")
    assert r.status_code == 409 and "has no results yet" in r.json()["detail"]
    # the page's button shows the same message on the study page
    page = with_dest.post(f"/studies/{filled['b']}/resend", headers={"accept": "text/html"})
    assert page.status_code == 409 and "has no results yet" in page.text and 'id="reprocess"' in page.text


def test_resend_queues_a_delivery(tmp_path, filled) -> None:
    # on a copy of the database: the other tests expect study A without deliveries
    db_file = tmp_path / "copy.db"
    shutil.copyfile(filled["config"].database.url.removeprefix("sqlite:///"), db_file)
    db = open_database(f"sqlite:///{db_file}")
    try:
        client = TestClient(create_app(_with_destination(filled), db, rules=RULES))
        r = client.post(f"/api/studies/{filled['a']}/resend")
        assert r.status_code == 200 and r.json() == {"study_instance_uid": filled["a"], "queued": 1,
                                                     "destinations": ["pacs"]}
        deliveries = node_status(db, study_uid=filled["a"])["studies"][0]["case"]["deliveries"]
        assert [(d["destination"], d["state"]) for d in deliveries] == [("pacs", "pending")]
        form = client.post(f"/studies/{filled['a']}/resend", follow_redirects=False)
        assert form.status_code == 303 and form.headers["location"] == f"/studies/{filled['a']}?done=resend"
    finally:
        db.dispose()


def test_reprocess_api_and_button(filled) -> None:
    client = _client(filled)
    uid = filled["b"]
    before = node_status(filled["db"], study_uid=uid)["studies"][0]["case"]["version"]
    r = client.post(f"/api/studies/{uid}/reprocess")
    assert r.status_code == 200
    assert r.json() == {"study_instance_uid": uid, "version": before + 1, "state": "queued", "reason": None}
    form = client.post(f"/studies/{uid}/reprocess", follow_redirects=False)
    assert form.status_code == 303 and form.headers["location"] == f"/studies/{uid}?done=reprocess"
    st = node_status(filled["db"], study_uid=uid)["studies"][0]
    assert st["case"]["version"] == before + 2 and st["state"] == "queued"
    assert st["earlier_versions"][0]["error"] == f"superseded by version {before + 2}"
    assert "A new version was queued." in client.get(form.headers["location"]).text


# --------------------------------------------------------------------------- pages


def test_pages_show_queue_roles_lesions_and_image(filled) -> None:
    client = _client(filled)
    index = client.get("/")
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert f'href="/studies/{filled["a"]}"' in index.text and f'href="/studies/{filled["b"]}"' in index.text
    assert "ILD-test 9.9" in index.text and "2 / 1" in index.text  # model card; lesions all / >= 10 mm3
    page = client.get(f"/studies/{filled['a']}").text
    assert page.count("<tr><td class=\"num\">") == filled["summary"]["lesion_count"]  # lesions table rows
    assert "1\u202f377.0" in page and "21.4" in page  # volume, max diameter of lesion 1
    assert f'src="/studies/{filled["a"]}/overview.png?version=1"' in page
    for role in filled["summary"]["roles"]:
        assert f"<strong>{role}</strong>" in page
    assert "-0.3500 &rarr; -0.4500" in page  # registration metric initial -> final
    assert "only candidate" in page or "score" in page  # why the rules chose the series
    png = client.get(f"/studies/{filled['a']}/overview.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content.startswith(b"\x89PNG")
    assert client.get(f"/studies/{filled['a']}/overview.png?version=7").status_code == 404
    queued = client.get(f"/studies/{filled['b']}").text
    assert "results appear here when it is done" in queued and 'http-equiv="refresh"' in queued
    assert client.get("/style.css").headers["content-type"].startswith("text/css")


def test_no_patient_data_anywhere(filled) -> None:
    client = _client(filled)
    src = filled["source"]
    texts = [client.get(p).text for p in ("/", f"/studies/{filled['a']}", "/api/studies", f"/api/studies/{filled['a']}",
                                          "/api/health", "/metrics")]
    for value in (str(src.PatientName), str(src.PatientID), str(src.get("PatientBirthDate", ""))):
        if value:
            assert not any(value in t for t in texts), value


def test_security_headers_and_cross_site_post(filled) -> None:
    client = _client(filled)
    r = client.get("/")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY" and r.headers["cache-control"] == "no-store"
    evil = client.post(f"/studies/{filled['b']}/reprocess", headers={"origin": "http://evil.example"})
    assert evil.status_code == 403
    assert client.post(f"/api/studies/{filled['b']}/reprocess", headers={"sec-fetch-site": "cross-site"}
                       ).status_code == 403


# --------------------------------------------------------------------------- token


def test_token_required_bearer_or_cookie(filled) -> None:
    client = _client(filled, token=TOKEN)
    for path in ("/api/health", "/api/studies", f"/api/studies/{filled['a']}", "/metrics",
                 f"/studies/{filled['a']}/overview.png", "/api/openapi.json"):
        r = client.get(path)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
        assert client.get(path, headers={"Authorization": "Bearer wrong-token-0123456789"}).status_code == 401
        assert client.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200, path
    assert client.post(f"/api/studies/{filled['a']}/reprocess").status_code == 401
    # a browser is sent to the login page, which (with the stylesheet) is the only open route
    r = client.get("/", headers={"accept": "text/html"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert client.get("/login").status_code == 200 and client.get("/style.css").status_code == 200
    bad = client.post("/login", content="token=nope", headers={"content-type": "application/x-www-form-urlencoded"})
    assert bad.status_code == 401 and "Wrong token" in bad.text and not client.cookies
    ok = client.post("/login", content=f"token={TOKEN}", headers={"content-type": "application/x-www-form-urlencoded"},
                     follow_redirects=False)
    assert ok.status_code == 303 and ok.headers["location"] == "/"
    cookie = ok.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and TOKEN not in cookie
    assert client.get("/").status_code == 200  # the cookie jar now holds the session
    assert client.get("/api/health").json()["web"] == {"token_required": True}
    client.post("/logout")
    assert client.get("/api/health").status_code == 401


def test_token_config() -> None:
    with pytest.raises(ValueError, match="at least 16 characters"):
        NodeConfig.model_validate({"web": {"token": "short"}})
    assert "**" in repr(NodeConfig.model_validate({"web": {"token": TOKEN}}).web.token)


# --------------------------------------------------------------------------- metrics


def test_metrics(filled) -> None:
    metrics.case_finished(filled["summary"])
    metrics.send_failed("pacs", transient=True)
    text = _client(filled).get("/metrics").text
    for name in ("dicom_node_received_instances_total", "dicom_node_cases", "dicom_node_stage_seconds",
                 "dicom_node_send_failures_total"):
        assert f"# TYPE {name}" in text, name
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("dicom_node_cases", (("state", "done"),))] == 1
    assert samples[("dicom_node_stage_seconds_count", (("stage", "total"),))] >= 1
    assert samples[("dicom_node_send_failures_total", (("destination", "pacs"), ("kind", "transient")))] >= 1
    assert samples[("dicom_node_received_instances_total", ())] >= filled["received"] == filled["n_files"]
    assert samples[("dicom_node_info", (("model_name", "ILD-test"), ("model_threshold", "0.5"),
                                        ("model_version", "9.9"), ("version", __version__)))] == 1


# --------------------------------------------------------------------------- the real node in Chromium


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed")
def test_browser_login_study_page_and_reprocess(tmp_path: Path, study_dir: Path) -> None:
    import httpx
    from playwright.sync_api import expect, sync_playwright

    model = known_checkpoint(tmp_path / "known.safetensors", "t1_bravo_post")  # lesions = the planted ones
    uid = _uid(study_dir)
    with storescp(tmp_path / "dest") as dest_port:
        cfg = node_config(tmp_path, model=model, web={"token": TOKEN},
                          destinations=[{"name": "pacs", "ae_title": "DEST", "host": "127.0.0.1", "port": dest_port}])
        with NodeProcess(cfg) as node:
            base = f"http://127.0.0.1:{node.settings['web']['port']}"
            wait_for(lambda: port_open(node.settings["web"]["port"]), 20, "the dashboard to listen")
            assert storescu(node.port, [study_dir]).returncode == 0
            extra = _screenshot_studies(node, tmp_path) if SCREENSHOTS else []
            node.wait_state(uid, {"sent"})
            for other in extra:
                node.wait_state(other, {"sent", "skipped"})
            root = Path(node.settings["storage"]["root"])
            summary = json.loads((root / "results" / uid / "summary.json").read_text())
            assert summary["lesion_count"] >= 1

            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=str(CHROMIUM),
                                            args=["--no-sandbox", "--disable-dev-shm-usage"])
                try:
                    page = browser.new_page(viewport={"width": 1360, "height": 900})
                    page.goto(base + "/")
                    assert page.url == base + "/login"
                    page.fill("#token", TOKEN)
                    page.click("button[type=submit]")
                    page.wait_for_url(base + "/")
                    row = page.locator("#studies tr", has=page.locator(f"a[href='/studies/{uid}']"))
                    expect(row).to_have_count(1)
                    expect(row.locator(".badge").first).to_have_text("sent")
                    if SCREENSHOTS:
                        page.set_viewport_size({"width": 1360, "height": 620})
                        page.screenshot(path=str(Path(SCREENSHOTS) / "dashboard-index.png"), full_page=True)

                    page.click(f"a[href='/studies/{uid}']")
                    page.wait_for_url(f"{base}/studies/{uid}")
                    expect(page.locator("#lesions tbody tr")).to_have_count(summary["lesion_count"])
                    expect(page.locator("#results-line")).to_contain_text(f"{summary['lesion_count']} lesion(s)")
                    page.wait_for_function("() => { const i = document.getElementById('overview');"
                                           " return i.complete && i.naturalWidth > 0; }", timeout=10_000)
                    expect(page.locator("#deliveries")).to_contain_text("sent")
                    if SCREENSHOTS:
                        page.screenshot(path=str(Path(SCREENSHOTS) / "dashboard-study.png"), full_page=True)

                    page.click("#reprocess")
                    page.wait_for_url(f"{base}/studies/{uid}?done=reprocess")
                    expect(page.locator("#state")).to_contain_text("version 2")
                    st = node.study(uid)
                    assert st["case"]["version"] == 2 and st["state"] in {"queued", "running", "done", "sent"}
                    assert [v["version"] for v in st["earlier_versions"]] == [1]
                    # until version 2 has results (seconds), the page shows version 1's
                    expect(page.locator("#older-results")).to_contain_text("results of version 1")
                    expect(page.locator("#lesions tbody tr")).to_have_count(summary["lesion_count"])
                    expect(page.locator("#versions")).to_contain_text("sent")

                    # version 2 done: its own results (results/<uid>/version-2/) replace version 1's on the page
                    def version_2_sent() -> bool:
                        st = node.study(uid)
                        return st["case"]["version"] == 2 and st["state"] == "sent"

                    wait_for(version_2_sent, 120, "version 2 processed and sent", interval=0.5)
                    page.goto(f"{base}/studies/{uid}")
                    expect(page.locator("#results-line")).to_contain_text("version 2")
                    expect(page.locator("#older-results")).to_have_count(0)
                    expect(page.locator("#lesions tbody tr")).to_have_count(summary["lesion_count"])
                    page.wait_for_function("() => document.getElementById('overview').naturalWidth > 0",
                                           timeout=10_000)
                finally:
                    browser.close()

            scraped = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
            samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                       for family in text_string_to_metric_families(scraped) for s in family.samples}
            n_files = sum(1 for _ in study_dir.rglob("*.dcm"))
            assert samples[("dicom_node_received_instances_total", ())] >= n_files
            assert samples[("dicom_node_stage_seconds_count", (("stage", "total"),))] >= 2  # versions 1 and 2
            assert samples[("dicom_node_cases", (("state", "sent"),))] >= 2
            assert node.stop() == 0  # the web server's thread does not hold up a clean exit


def _screenshot_studies(node: NodeProcess, tmp: Path) -> list[str]:
    """More studies for a fuller index screenshot: one without BRAVO, and a real DWI (skipped) when present."""
    out = tmp / "no_bravo"
    write_study(lesion_study(6, missing=("t1_bravo_post",)), out)
    assert storescu(node.port, [out]).returncode == 0
    uids = [_uid(out)]
    if DWI.exists():
        assert storescu(node.port, [DWI]).returncode == 0
        uids.append(str(pydicom.dcmread(next(p for p in sorted(DWI.iterdir()) if p.is_file()),
                                        stop_before_pixels=True).StudyInstanceUID))
    return uids
