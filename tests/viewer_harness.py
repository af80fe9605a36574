"""The OHIF viewer (npm package ``@ohif/app``, its built ``dist/``) in headless Chromium, reading a test Orthanc.

``make ohif`` puts the viewer in ``var/ohif/<version>/dist`` (``make test`` does, and tells the tests by
``OHIF_DIST``). :class:`ViewerServer` serves it on loopback from one origin, as a site's web server would: the
static files, an ``app-config.js`` whose only data source is DICOMweb at ``/dicom-web`` of the same origin, and
``/dicom-web/*`` proxied to Orthanc's DICOMweb plugin (with the test user's credentials, so the browser needs
none and makes no cross-origin request). :func:`browser_page` opens Debian's Chromium through Playwright with
WebGL on SwiftShader (no GPU), collects page errors and console errors, and keeps a screenshot when the test fails.
"""

from __future__ import annotations

import base64
import http.client
import mimetypes
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from node_harness import ROOT
from orthanc_harness import DICOMWEB_ROOT, OrthancProcess

OHIF_VERSION = "3.13.2"  # the Makefile's OHIF_VERSION
OHIF_DIST = Path(os.environ.get("OHIF_DIST") or ROOT / "var" / "ohif" / OHIF_VERSION / "dist")
CHROMIUM = Path("/usr/bin/chromium")
# WebGL without a GPU: ANGLE on SwiftShader (cornerstone3D renders with WebGL2 and would fall back to its slow
# CPU path, or show "no WebGL" messages, without it).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-dev-shm-usage", "--use-gl=angle", "--use-angle=swiftshader",
                 "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"]
DICOMWEB_PATH = "/dicom-web"

# OHIF's app-config.js: the same origin's /dicom-web as the one data source, nothing that asks the user first.
APP_CONFIG = """const dicomweb = window.location.origin + 'DICOMWEB_PATH';
window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  showStudyList: true,
  maxNumberOfWebWorkers: 1,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  investigationalUseDialog: { option: 'never' },
  defaultDataSourceName: 'orthanc',
  dataSources: [{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'orthanc',
    configuration: {
      friendlyName: 'Test Orthanc',
      name: 'orthanc',
      wadoUriRoot: dicomweb,
      qidoRoot: dicomweb,
      wadoRoot: dicomweb,
      qidoSupportsIncludeField: false,
      imageRendering: 'wadors',
      thumbnailRendering: 'wadors',
      enableStudyLazyLoad: true,
      supportsFuzzyMatching: false,
      supportsWildcard: true,
      omitQuotationForMultipartRequest: true,
      bulkDataURI: { enabled: true },
    },
  }],
};
""".replace("DICOMWEB_PATH", DICOMWEB_PATH)

_MIME = {".js": "application/javascript", ".mjs": "application/javascript", ".wasm": "application/wasm",
         ".json": "application/json", ".css": "text/css", ".html": "text/html", ".svg": "image/svg+xml"}
_PROXIED_REQUEST_HEADERS = ("Accept", "Content-Type", "Range")
_PROXIED_RESPONSE_HEADERS = ("Content-Type", "Content-Range", "Accept-Ranges")


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *_: Any) -> None:  # the test prints what it needs; no line per request
        pass

    def do_GET(self) -> None:
        if self.path.startswith(DICOMWEB_PATH + "/"):
            self._proxy()
        else:
            self._static()

    def do_POST(self) -> None:
        self._proxy()

    def _static(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/app-config.js":
            self._send(200, APP_CONFIG.encode(), "application/javascript")
            return
        file = (self.server.dist / path.lstrip("/")).resolve()
        if not file.is_relative_to(self.server.dist) or not file.is_file():
            file = self.server.dist / "index.html"  # the app's own routes (/viewer?...): its router decides
        ctype = _MIME.get(file.suffix) or mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        self._send(200, file.read_bytes(), ctype)

    def _proxy(self) -> None:
        target = DICOMWEB_ROOT.rstrip("/") + self.path[len(DICOMWEB_PATH):]
        headers = {k: v for k in _PROXIED_REQUEST_HEADERS if (v := self.headers.get(k))}
        headers["Authorization"] = self.server.authorization
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if self.command == "POST" else None
        conn = http.client.HTTPConnection("127.0.0.1", self.server.orthanc_port, timeout=120)
        try:
            conn.request(self.command, target, body=body, headers=headers)
            answer = conn.getresponse()
            data = answer.read()
            extra = {k: v for k in _PROXIED_RESPONSE_HEADERS if (v := answer.getheader(k))}
            self._send(answer.status, data, extra.pop("Content-Type", "application/octet-stream"), extra)
            self.server.proxied.append((self.command, self.path, answer.status))
        finally:
            conn.close()

    def _send(self, status: int, data: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, dist: Path, orthanc: OrthancProcess) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.dist = dist.resolve()
        self.orthanc_port = orthanc.http_port
        user, password = next(iter(orthanc.settings["RegisteredUsers"].items()))
        self.authorization = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.proxied: list[tuple[str, str, int]] = []  # (method, path, status) of each DICOMweb request


class ViewerServer:
    """OHIF's ``dist`` and ``/dicom-web`` (proxied to ``orthanc``) on one loopback origin, ``url``; a thread."""

    def __init__(self, orthanc: OrthancProcess, dist: Path = OHIF_DIST) -> None:
        if not (dist / "index.html").is_file():
            raise AssertionError(f"OHIF is not in {dist} (`make ohif`)")
        self._server = _Server(dist, orthanc)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="ohif-server", daemon=True)

    @property
    def proxied(self) -> list[tuple[str, str, int]]:
        return self._server.proxied

    def __enter__(self) -> ViewerServer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


@dataclass
class BrowserLog:
    """What the page reported: uncaught exceptions (``page_errors``) and ``console.error`` texts."""

    page_errors: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)  # every console line, "type: text", for failure messages

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.console[-n:])


@contextmanager
def browser_page(shots: Path, *, width: int = 1400, height: int = 900) -> Iterator[tuple[Any, BrowserLog]]:
    """A Playwright page in headless Chromium (Debian's, SwiftShader WebGL) and its :class:`BrowserLog`.

    When the body raises, a full-page screenshot goes to ``shots/failure.png`` (its path printed) first."""
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        raise AssertionError(f"{CHROMIUM} is missing (Debian package chromium; `make debian-tools`)")
    log = BrowserLog()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.on("pageerror", lambda e: log.page_errors.append(f"{e.name}: {e.message}\n{e.stack or ''}"))

            def on_console(msg: Any) -> None:
                log.console.append(f"{msg.type}: {msg.text}")
                if msg.type == "error":
                    log.console_errors.append(msg.text)

            page.on("console", on_console)
            try:
                yield page, log
            except BaseException:
                shots.mkdir(parents=True, exist_ok=True)
                shot = shots / "failure.png"
                page.screenshot(path=str(shot))
                print(f"screenshot of the failing page: {shot}\nconsole (last lines):\n{log.tail()}")
                raise
        finally:
            browser.close()
