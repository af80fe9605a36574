"""Run a real Orthanc (Debian package ``orthanc``) as the PACS for tests, configured from ``deploy/orthanc/``.

The configuration is the site's ``deploy/orthanc/orthanc.json`` with only what a test must change:
storage and index in a temporary folder, free DICOM and HTTP ports, the node's port in the ``ild-node``
modality, the deploy Lua script by its path in this checkout, a short ``StableAge``, a test password, no
plugins but DICOMweb when asked (``dicomweb=True``: Debian's ``orthanc-dicomweb``, at ``/dicom-web/``).
Orthanc 1.10 cannot bind to one interface, so "loopback only" comes from its own checks: HTTP
``RemoteAccessAllowed: false``; DICOM stores only from listed modalities (``DicomAlwaysAllowStore: false``)
whose host (127.0.0.1) is checked (``DicomCheckModalityHost: true``), echo only from them too.

Orthanc's log (stderr, Lua ``print`` included) goes to ``orthanc.log`` in that folder; :meth:`log` reads it
for failure messages. The process is stopped (SIGTERM, then SIGKILL) when the context exits.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from node_harness import DCMTK_ENV, ROOT, free_port, wait_for

ORTHANC = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")
DEPLOY = ROOT / "deploy" / "orthanc"
DEPLOY_CONFIG = DEPLOY / "orthanc.json"
LUA_SCRIPT = DEPLOY / "route-to-ild-node.lua"
NODE_MODALITY = "ild-node"  # the name of the node's entry in the deploy config's "DicomModalities"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")  # Debian package orthanc-dicomweb
DICOMWEB_ROOT = "/dicom-web/"


def strip_json_comments(text: str) -> str:
    """The JSON of an Orthanc configuration file: ``//`` and ``/* */`` comments removed (outside strings)."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i:j + 1])
            i = j + 1
        elif text.startswith("//", i):
            i = text.find("\n", i)
            i = n if i < 0 else i
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end < 0:
                raise ValueError("unterminated /* comment")
            i = end + 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def load_orthanc_config(path: Path = DEPLOY_CONFIG) -> dict[str, Any]:
    return json.loads(strip_json_comments(path.read_text()))


def orthanc_config(tmp: Path, *, node_port: int, node_ae_title: str = "ILD_NODE", stable_age: int = 2,
                   dicomweb: bool = False, **overrides: Any) -> Path:
    """A test Orthanc's configuration under ``tmp``, derived from ``deploy/orthanc/orthanc.json``; with
    ``dicomweb`` its DICOMweb plugin loaded (QIDO-RS/WADO-RS/STOW-RS under ``DICOMWEB_ROOT``)."""
    if dicomweb and not DICOMWEB_PLUGIN.exists():
        raise AssertionError(f"{DICOMWEB_PLUGIN} is missing (Debian package orthanc-dicomweb; `make debian-tools`)")
    cfg = load_orthanc_config()
    storage = tmp / "orthanc-storage"
    (tmp / "orthanc-tmp").mkdir(parents=True, exist_ok=True)
    cfg.update({
        "Name": f"test-{tmp.name}",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "TemporaryDirectory": str(tmp / "orthanc-tmp"),
        "Plugins": [str(DICOMWEB_PLUGIN)] if dicomweb else [],
        "DicomPort": free_port(),
        "HttpPort": free_port(),
        "RemoteAccessAllowed": False,
        "DicomAlwaysAllowEcho": False,
        "RegisteredUsers": {"test": secrets.token_hex(12)},
        "LuaScripts": [str(LUA_SCRIPT)],
        "StableAge": stable_age,
        "SaveJobs": False,
    })
    if dicomweb:
        cfg["DicomWeb"] = {"Enable": True, "Root": DICOMWEB_ROOT, "EnableWado": True, "Ssl": False}
    node = cfg["DicomModalities"][NODE_MODALITY]
    node.update({"AET": node_ae_title, "Host": "127.0.0.1", "Port": node_port})
    cfg.update(overrides)
    path = tmp / "orthanc.json"
    path.write_text(json.dumps(cfg, indent=2))
    return path


class OrthancProcess:
    """``Orthanc CONFIG`` as a child process, with a REST client (``rest``) logged in as the test user."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.settings = json.loads(config.read_text())
        self.ae_title = str(self.settings["DicomAet"])
        self.dicom_port = int(self.settings["DicomPort"])
        self.http_port = int(self.settings["HttpPort"])
        self.log_path = config.parent / "orthanc.log"
        self.proc: subprocess.Popen[bytes] | None = None
        user, password = next(iter(self.settings["RegisteredUsers"].items()))
        self.rest = httpx.Client(base_url=f"http://127.0.0.1:{self.http_port}", auth=(user, password), timeout=60)

    def start(self, timeout: float = 30) -> OrthancProcess:
        if ORTHANC is None:
            raise AssertionError("Orthanc is not installed (Debian package orthanc; `make debian-tools`)")
        log = open(self.log_path, "ab")  # kept open for the child's lifetime
        self.proc = subprocess.Popen([ORTHANC, str(self.config)], stdout=log, stderr=subprocess.STDOUT,
                                     cwd=self.config.parent, env=DCMTK_ENV)
        log.close()

        def answers() -> bool:
            if self.proc.poll() is not None:
                return True
            try:
                return self.rest.get("/system").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(answers, timeout, "Orthanc's REST API to answer", interval=0.1)
        if self.proc.poll() is not None:
            raise AssertionError(f"Orthanc exited with {self.proc.returncode}:\n{self.log()}")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 30) -> None:
        self.rest.close()
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    # ---- REST helpers
    def get(self, uri: str) -> Any:
        r = self.rest.get(uri)
        r.raise_for_status()
        return r.json()

    def post(self, uri: str, body: Any) -> Any:
        r = self.rest.post(uri, content=body if isinstance(body, bytes) else json.dumps(body))
        r.raise_for_status()
        return r.json()

    def upload(self, paths: Sequence[Path]) -> list[dict[str, Any]]:
        """``POST /instances`` of each file's bytes; Orthanc's answers (``ID``, ``ParentStudy``, ``Status``)."""
        answers = []
        for path in paths:
            answer = self.post("/instances", path.read_bytes())
            if answer.get("Status") not in ("Success", "AlreadyStored"):
                raise AssertionError(f"Orthanc did not store {path.name}: {answer}")
            answers.append(answer)
        return answers

    def series_of_study(self, study_id: str) -> list[dict[str, Any]]:
        return self.get(f"/studies/{study_id}/series")

    def file(self, instance_id: str) -> bytes:
        r = self.rest.get(f"/instances/{instance_id}/file")
        r.raise_for_status()
        return r.content

    def __enter__(self) -> OrthancProcess:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
