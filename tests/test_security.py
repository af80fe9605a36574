"""Security of the running node (issue #8): who may associate, DICOM TLS end to end, no patient data in logs,
the web token on every route, restrictive file modes. The real ``dicom-node serve`` with DCMTK peers on
loopback; certificates made by the test (tests/tls_certs.py)."""

from __future__ import annotations

import re
import stat
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
import pytest
from node_harness import DCMTK_ENV, NodeProcess, node_config, storescp, wait_for
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from support.known_model import known_checkpoint
from support.studies import lesion_study, write_study
from test_faults import MISSING, Sender, _received_by_sop_uid
from tls_certs import make_certificates

from dicom_node.config import load_config
from dicom_node.db import open_database
from dicom_node.web import create_app
from dicom_node.web.app import PUBLIC_PATHS

pytestmark = pytest.mark.slow

TOKEN = "security-test-token-0123456789"
# Distinctive identifying values: any of them (or a part, or a DICOM-formatted variant) in a log is a leak.
PHI = {"PatientName": "Zwirbelmann^Quintessa^Marigold", "PatientID": "ZQ-4711-8093",
       "PatientBirthDate": "19230417", "AccessionNumber": "ACC55501234",
       "InstitutionName": "Klinikum Zwirbelstadt", "ReferringPhysicianName": "Murkelbaum^Oswin"}


def _phi_variants() -> set[str]:
    out = set()
    for value in PHI.values():
        out |= {value, *(part for part in re.split(r"[\^ ]", value) if len(part) >= 5)}
    d = PHI["PatientBirthDate"]
    out |= {f"{d[:4]}-{d[4:6]}-{d[6:]}", f"{d[6:]}.{d[4:6]}.{d[:4]}", f"{d[4:6]}/{d[6:]}/{d[:4]}"}
    name = PHI["PatientName"].split("^")
    out |= {f"{name[1]} {name[0]}", f"{name[0]}, {name[1]}"}
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return known_checkpoint(tmp_path_factory.mktemp("model") / "known.safetensors", "t1_cube_post")


def test_allowed_callers_by_ae_title_and_host(tmp_path: Path, model: Path) -> None:
    """``node.allowed_callers``: an unknown AE title is refused; a known one from another address than its
    ``host`` is refused; the same one from its host, and one allowed from anywhere, are served."""
    cfg = node_config(tmp_path, model=model, node={"allowed_callers": [
        {"ae_title": "PACS", "host": "127.0.0.2"}, {"ae_title": "ORTHANC"}]})

    def echo(calling: str, source: str) -> bool:
        ae = AE(ae_title=calling)
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = 10
        assoc = ae.associate("127.0.0.1", node.port, ae_title="ILD_NODE", bind_address=(source, 0))
        if not assoc.is_established:
            return False
        ok = assoc.send_c_echo().get("Status") == 0x0000
        assoc.release()
        return ok

    with NodeProcess(cfg) as node:
        assert echo("PACS", "127.0.0.2")
        assert not echo("PACS", "127.0.0.1")
        assert not echo("INTRUDER", "127.0.0.2")
        assert echo("ORTHANC", "127.0.0.1")
        wait_for(lambda: "'INTRUDER' at 127.0.0.2" in node.log(), 10, "the refusal in the log")
        log = node.log()
    assert "refused association from AE 'PACS' at 127.0.0.1: calling AE title allowed only from 127.0.0.2" in log
    assert "refused association from AE 'INTRUDER' at 127.0.0.2: calling AE title not in node.allowed_callers" in log


def _routes(config_path: Path) -> list[tuple[str, str]]:
    """Every (method, path template) the dashboard app serves, read from the FastAPI app itself."""
    cfg = load_config(config_path)
    db = open_database(cfg.database.url, migrate_schema=False)
    try:
        app = create_app(cfg, db)
        return sorted((method, route.path) for route in app.routes
                      for method in (getattr(route, "methods", None) or {"GET"}) if method != "HEAD")
    finally:
        db.dispose()


def _http(url: str, method: str, token: str | None = None) -> tuple[int, str]:
    """(status, Location header) without following redirects."""
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    headers = {"Accept": "text/html"} if not url.endswith((".png", "/metrics")) and "/api/" not in url else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, method=method, headers=headers, data=b"" if method == "POST" else None)
    try:
        with urllib.request.build_opener(NoRedirect).open(req, timeout=30) as r:
            return r.status, r.headers.get("location", "")
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("location", "")


def test_tls_end_to_end_no_phi_in_logs_token_and_file_modes(tmp_path: Path, model: Path) -> None:
    """One study with distinctive patient data goes through the whole node at DEBUG: DCMTK ``storescu +tls``
    (client certificate required) -> node -> SEG + SR over TLS to DCMTK ``storescp +tls``. Then: the log and
    the database hold none of the patient values; every dashboard/API route refuses without the token; nothing the node wrote
    is readable by others."""
    (tmp_path / "pki").mkdir()
    pki = make_certificates(tmp_path / "pki")
    study_dir = tmp_path / "study"
    write_study(lesion_study(60, missing=MISSING), study_dir)
    files = sorted(study_dir.rglob("*.dcm"))
    for path in files:
        ds = pydicom.dcmread(path)
        for key, value in PHI.items():
            setattr(ds, key, value)
        ds.save_as(path)
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    dest = tmp_path / "dest"
    scp_tls = ("+tls", str(pki / "server.key"), str(pki / "server.crt"), "+cf", str(pki / "ca.crt"))
    with storescp(dest, extra=scp_tls) as dest_port:
        cfg = node_config(tmp_path, model=model, logging={"level": "DEBUG"}, web={"token": TOKEN},
                          node={"tls": {"enabled": True, "certificate": str(pki / "server.crt"),
                                        "private_key": str(pki / "server.key"),
                                        "ca_certificates": str(pki / "ca.crt"), "require_client_certificate": True}},
                          destinations=[{"name": "pacs", "ae_title": "DEST", "host": "127.0.0.1",
                                         "port": dest_port, "tls": True}])
        with NodeProcess(cfg) as node:
            run = subprocess.run(
                ["storescu", "-aet", "PACS", "-aec", "ILD_NODE", "+tls", str(pki / "client.key"),
                 str(pki / "client.crt"), "+cf", str(pki / "ca.crt"), "127.0.0.1", str(node.port),
                 *map(str, files)], capture_output=True, text=True, timeout=120, check=False, env=DCMTK_ENV)
            assert run.returncode == 0, run.stdout + run.stderr
            # Plain DICOM to the TLS port is not served.
            assert Sender(node.port).send(files[:1]) == 0
            case = node.wait_state(uid, {"sent"}, timeout=300)["case"]  # a nice-10 worker, slow under a busy -n auto
            got = wait_for(lambda: (c := _received_by_sop_uid(dest)) and len(c) == 2 and c, 10, "SEG and SR at "
                           "the TLS storescp")
            assert set(got.values()) == {1}
            assert case["lesions"]["count"] >= 1
            root = Path(node.settings["storage"]["root"])
            web = node.settings["web"]
            base = f"http://{web['host']}:{web['port']}"
            routes = _routes(node.config)
            checked = []
            for method, template in routes:
                if template in PUBLIC_PATHS:
                    continue
                path = template.replace("{study_uid}", uid)
                assert "{" not in path, f"a path parameter the test does not fill: {template}"
                status, location = _http(base + path, method)
                assert status == 401 or (status == 303 and location.endswith("/login")), (method, path, status)
                checked.append(f"{method} {template}")
                if method == "GET":
                    assert _http(base + path, method, TOKEN)[0] == 200, (method, path)
            log = node.log()
    # The log really was at DEBUG, covered the whole path, and carries UIDs only.
    assert "DEBUG" in log and "(TLS)" in log and "SEG/SR sent to pacs" in log and uid in log
    leaks = sorted(v for v in _phi_variants() if v.lower() in log.lower())
    assert leaks == [], f"patient data in the node's log: {leaks}"
    # Nor in the database (docs/node.md: UIDs, states and numbers only), WAL included.
    database = b"".join(p.read_bytes() for p in tmp_path.glob("node.db*")).lower()
    assert uid.encode() in database
    leaks = sorted(v for v in _phi_variants() if v.lower().encode() in database)
    assert leaks == [], f"patient data in the database: {leaks}"
    # The routes that show study data are among those refused (the list is the app's own, so new routes count).
    for must in ("GET /", "GET /studies/{study_uid}", "GET /studies/{study_uid}/overview.png", "GET /api/studies",
                 "GET /api/studies/{study_uid}", "GET /metrics", "POST /api/studies/{study_uid}/resend"):
        assert must in checked, must
    # Files: serve's umask 0o027: nothing readable, writable or listable by others.
    written = [root, *root.rglob("*"), *tmp_path.glob("node.db*")]
    assert any(p.name == "seg.dcm" for p in written) and any(p.suffix == ".dcm" and "incoming" in p.parts
                                                             for p in written)
    open_to_others = [f"{p} {stat.filemode(p.stat().st_mode)}" for p in written if p.stat().st_mode & 0o007]
    assert open_to_others == []
    print(f"\nsecurity: {len(files)} instances over TLS in, SEG + SR over TLS out; {len(_phi_variants())} patient "
          f"value variants absent from {len(log.splitlines())} DEBUG log lines; {len(checked)} routes refused "
          f"without the token; {len(written)} files and folders, none open to others")
