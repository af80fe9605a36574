"""The dashboard and JSON API (``dicom-node serve`` runs it on ``web.host:web.port``; docs/dashboard.md).

Read-mostly: every page and API answer comes from :func:`dicom_node.status.node_status` (the same data
``dicom-node status`` prints) and the cases' ``summary.json``; the only writes are the two actions
``dicom-node reprocess`` and ``resend`` also offer. Pages are rendered on the server (Jinja2) and work
without JavaScript: the action buttons are plain HTML forms (POST, then a redirect).

No patient data: the database and ``summary.json`` hold UIDs, states and numbers only, and URLs carry
Study Instance UIDs, which are checked against the DICOM UID syntax before anything else is done with
them.

With ``web.token`` set, every route but ``/login`` and the stylesheet requires the token: API clients
send ``Authorization: Bearer TOKEN``; browsers log in once and get an HttpOnly, SameSite=Strict cookie
(an HMAC of the token, so changing the token logs everyone out).
"""

from __future__ import annotations

import asyncio
import calendar
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from dicom_node import __version__, metrics
from dicom_node.config import NodeConfig
from dicom_node.db import Database
from dicom_node.rules import RuleSet
from dicom_node.status import node_status
from dicom_node.storage import StorageLayout, free_gb, valid_uid
from pipeline.outputs import OVERVIEW_FILE

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
COOKIE = "dicom_node_session"
PUBLIC_PATHS = frozenset({"/login", "/style.css"})
ROLE_LABELS = {"t1_bravo_post": "T1 BRAVO / MPRAGE post", "t1_cube_pre": "T1 CUBE / SPACE pre",
               "t1_cube_post": "T1 CUBE / SPACE post", "flair": "FLAIR"}
# The browser's rules for these pages: nothing from elsewhere, no scripts at all, no framing.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
ModelInfo = Callable[[], dict[str, Any] | None]


def _seconds_between(start: str | None, end: str | None) -> float | None:
    """Seconds between two of node_status's ISO times (whole seconds)."""
    if not start or not end:
        return None
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    return float(calendar.timegm(time.strptime(end, fmt)) - calendar.timegm(time.strptime(start, fmt)))


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    d, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    return (f"{d} d " if d else "") + (f"{h} h " if d or h else "") + f"{m} min {s} s"


def _num(value: Any, digits: int = 1) -> str:
    """A number for a table cell: fixed digits, thousands separated; '-' for None."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}".replace(",", "\u202f")
    return f"{value:,.{digits}f}".replace(",", "\u202f")


class Dashboard:
    """What the routes need: the config, the database, the rules, and how to ask about the model."""

    def __init__(self, config: NodeConfig, db: Database, rules: RuleSet | None, model_info: ModelInfo | None,
                 started: float) -> None:
        self.config = config
        self.db = db
        self._rules = rules
        self.model_info = model_info or (lambda: None)
        self.started = started
        token = config.web.token.get_secret_value() if config.web.token is not None else None
        self.token = token.encode() if token else None
        self.session = (hmac.new(self.token, b"dicom-node dashboard session v1", hashlib.sha256).hexdigest()
                        if self.token else None)

    @property
    def root(self) -> Path:
        return self.config.storage.root

    @property
    def rules(self) -> RuleSet:
        if self._rules is None:  # an app made without a running node (tests): the node's rules file
            from dicom_node.rules import load_rules

            self._rules = load_rules(self.config.rules)
        return self._rules

    # ------------------------------------------------------------------ auth

    def authorized(self, request: Request) -> bool:
        if self.token is None:
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and given:
            return hmac.compare_digest(given.strip().encode(), self.token)
        cookie = request.cookies.get(COOKIE)
        return cookie is not None and self.session is not None and hmac.compare_digest(cookie.encode(),
                                                                                        self.session.encode())

    # ------------------------------------------------------------------ data

    def health(self) -> dict[str, Any]:
        model = self.model_info()
        out: dict[str, Any] = {
            "status": "ok",
            "version": __version__,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "uptime_s": round(time.time() - self.started, 1),
            "model": {"loaded": model is not None, **(model or {})},
            "storage": {"free_gb": round(free_gb(self.root), 2), "min_free_gb": self.config.storage.min_free_gb},
            "web": {"token_required": self.token is not None},
        }
        out["storage"]["accepting"] = out["storage"]["free_gb"] >= self.config.storage.min_free_gb
        try:
            queue = node_status(self.db, limit=0)["queue"]
            out["queue"] = {"depth": queue["queued"] + queue["running"], "cases": queue}
        except Exception as exc:
            log.exception("health: database query failed")
            out["status"] = "error"
            out["queue"] = {"depth": None, "cases": None, "error": f"{type(exc).__name__}: {exc}"}
        if not out["storage"]["accepting"] or not out["model"]["loaded"]:
            out["status"] = "degraded" if out["status"] == "ok" else out["status"]
        return out

    def study(self, study_uid: str) -> dict[str, Any]:
        """node_status's entry for the study, plus the summary.json of its latest results (404 when unknown)."""
        if not valid_uid(study_uid):
            raise HTTPException(404, "not a valid Study Instance UID")
        found = node_status(self.db, study_uid=study_uid)["studies"]
        if not found:
            raise HTTPException(404, f"unknown study {study_uid}")
        study = found[0]
        version, folder = self.results_of(study)
        summary = None
        if folder is not None:
            try:
                summary = json.loads((folder / "summary.json").read_text())
            except (OSError, ValueError):
                summary = None
        return {"study": study, "results_version": version if summary is not None else None, "summary": summary}

    def results_of(self, study: dict[str, Any]) -> tuple[int | None, Path | None]:
        """The newest version with results on disk (the latest case, else an earlier one while it runs)."""
        uid = study["study_instance_uid"]
        case = study["case"]
        candidates = []
        if case is not None:
            candidates.append(case["version"])
        candidates += [v["version"] for v in study["earlier_versions"] if v["state"] in ("done", "sent")]
        for version in candidates:
            folder = StorageLayout(self.root).results_dir(uid, version)
            if self._inside(folder) and (folder / "summary.json").is_file():
                return version, folder
        return None, None

    def _inside(self, path: Path) -> bool:
        return path.resolve().is_relative_to(self.root.resolve())

    def reprocess(self, study_uid: str) -> dict[str, Any]:
        from dicom_node.router import reprocess

        if not valid_uid(study_uid):
            raise HTTPException(404, "not a valid Study Instance UID")
        try:
            case = reprocess(self.db, study_uid, self.rules)
        except KeyError:
            raise HTTPException(404, f"unknown study {study_uid}") from None
        log.info("web: study %s version %d made by a reprocess request (%s)", study_uid, case.version, case.state)
        return {"study_instance_uid": study_uid, "version": case.version, "state": case.state,
                "reason": case.reason or None}

    def resend(self, study_uid: str) -> dict[str, Any]:
        from dicom_node.dispatcher import resend

        if not valid_uid(study_uid):
            raise HTTPException(404, "not a valid Study Instance UID")
        if not self.config.destinations:
            if not node_status(self.db, study_uid=study_uid, limit=1)["studies"]:
                raise HTTPException(404, f"unknown study {study_uid}")
            raise HTTPException(409, "no destinations configured (destinations: in the node's config); "
                                     "nothing to send to")
        try:
            n = resend(self.db, self.config, study_uid)
        except KeyError:
            raise HTTPException(404, f"unknown study {study_uid}") from None
        except ValueError as exc:
            raise HTTPException(409, str(exc)) from None
        log.info("web: study %s: %d delivery(ies) queued again by a resend request", study_uid, n)
        return {"study_instance_uid": study_uid, "queued": n, "destinations": [d.name for d in self.config.destinations]}


def create_app(config: NodeConfig, db: Database, *, rules: RuleSet | None = None,
               model_info: ModelInfo | None = None, started: float | None = None) -> FastAPI:
    """The dashboard for a node's ``config`` and open database.

    ``rules`` are the series rules reprocessing uses (the running node's; loaded from ``config.rules``
    when None); ``model_info`` returns the loaded model's name, version and threshold, or None while no
    model is loaded; ``started`` is when the node started (uptime), default now.
    """
    dash = Dashboard(config, db, rules, model_info, time.time() if started is None else started)
    app = FastAPI(title="ILD brain-metastasis DICOM node", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url="/api/openapi.json")
    app.state.dashboard = dash
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    env = templates.env
    env.filters["num"] = _num
    env.filters["duration"] = _duration
    env.globals.update(version=__version__, role_labels=ROLE_LABELS, token_required=dash.token is not None,
                       seconds_between=_seconds_between)
    registry = metrics.registry(
        case_counts=lambda: node_status(db, limit=0)["queue"],
        free_bytes=lambda: free_gb(config.storage.root) * 1e9,
        info=lambda: {"version": __version__, **{f"model_{k}": str(v) for k, v in (dash.model_info() or {}).items()
                                                  if k in ("name", "version", "threshold")}})

    def page(request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> Response:
        return templates.TemplateResponse(request, name, context, status_code=status_code)

    def wants_html(request: Request) -> bool:
        path = request.url.path
        return not (path.startswith("/api/") or path == "/metrics" or path.endswith(".png")) and \
            "text/html" in request.headers.get("accept", "")

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Any]) -> Response:
        # Cross-site form posts (CSRF): a browser names the page a POST comes from; it must be this site.
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            origin = request.headers.get("origin")
            if request.headers.get("sec-fetch-site") == "cross-site" or (
                    origin and origin != "null" and urlsplit(origin).netloc != request.headers.get("host")):
                response: Response = JSONResponse({"detail": "cross-site request refused"}, status_code=403)
                return _secure(response)
        if request.url.path not in PUBLIC_PATHS and not dash.authorized(request):
            if wants_html(request):
                response = RedirectResponse("/login", status_code=303)
            else:
                response = JSONResponse({"detail": "authentication required: Authorization: Bearer <web.token>"},
                                        status_code=401, headers={"WWW-Authenticate": "Bearer"})
            return _secure(response)
        return _secure(await call_next(request))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if wants_html(request):
            return page(request, "error.html", {"status": exc.status_code, "message": exc.detail},
                        status_code=exc.status_code)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    # ------------------------------------------------------------------ pages

    @app.get("/", include_in_schema=False)
    def index(request: Request, limit: int = Query(50, ge=1, le=1000)) -> Response:
        status = node_status(db, limit=limit)
        for st in status["studies"]:
            case = st["case"] or {}
            st["seconds"] = _seconds_between(case.get("started"), case.get("finished"))
        return page(request, "index.html", {"status": status, "health": dash.health(), "limit": limit,
                                            "refresh": True})

    @app.get("/studies/{study_uid}", include_in_schema=False)
    def study_page(request: Request, study_uid: str, done: str | None = None) -> Response:
        data = dash.study(study_uid)
        notice = {"reprocess": "A new version was queued.", "resend": "The results were queued for sending again."
                  }.get(done or "")
        return page(request, "study.html", {**data, "notice": notice, "error": None,
                                            "refresh": data["study"]["state"] in ("queued", "running", "receiving")})

    @app.get("/studies/{study_uid}/overview.png", include_in_schema=False)
    def overview(study_uid: str, version: int | None = Query(None, ge=1)) -> Response:
        data = dash.study(study_uid)
        if version is None:
            version = data["results_version"]
        if version is None:
            raise HTTPException(404, "no results for this study yet")
        path = StorageLayout(dash.root).results_dir(study_uid, version) / OVERVIEW_FILE
        if not dash._inside(path) or not path.is_file():
            raise HTTPException(404, f"no overview image for version {version}")
        return FileResponse(path, media_type="image/png")

    @app.post("/studies/{study_uid}/reprocess", include_in_schema=False)
    def reprocess_form(study_uid: str) -> Response:
        dash.reprocess(study_uid)
        return RedirectResponse(f"/studies/{study_uid}?done=reprocess", status_code=303)

    @app.post("/studies/{study_uid}/resend", include_in_schema=False)
    def resend_form(request: Request, study_uid: str) -> Response:
        try:
            dash.resend(study_uid)
        except HTTPException as exc:
            if exc.status_code != 409:
                raise
            data = dash.study(study_uid)
            return page(request, "study.html", {**data, "notice": None, "error": exc.detail, "refresh": False},
                        status_code=409)
        return RedirectResponse(f"/studies/{study_uid}?done=resend", status_code=303)

    @app.get("/login", include_in_schema=False)
    def login_page(request: Request) -> Response:
        if dash.token is None or dash.authorized(request):
            return RedirectResponse("/", status_code=303)
        return page(request, "login.html", {"error": None})

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        if dash.token is None or dash.session is None:  # both set, or neither
            return RedirectResponse("/", status_code=303)
        # The form is urlencoded; parsed here rather than with request.form() (which needs python-multipart).
        body = (await request.body())[:4096].decode("utf-8", "replace")
        given = (parse_qs(body).get("token") or [""])[0].strip()
        if not given or not hmac.compare_digest(given.encode(), dash.token):
            await asyncio.sleep(0.5)  # slows guessing; a 16+ character secret is out of reach anyway
            log.warning("web: failed login from %s", request.client.host if request.client else "?")
            return page(request, "login.html", {"error": "Wrong token."}, status_code=401)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, dash.session, httponly=True, samesite="strict", path="/",
                            secure=request.url.scheme == "https")
        return response

    @app.post("/logout", include_in_schema=False)
    def logout() -> Response:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return response

    @app.get("/style.css", include_in_schema=False)
    def style() -> Response:
        return FileResponse(HERE / "static" / "style.css", media_type="text/css")

    # ------------------------------------------------------------------ JSON API

    @app.get("/api/health")
    def api_health() -> JSONResponse:
        """Node version, uptime, model, free disk and queue depth (queued + running)."""
        health = dash.health()
        return JSONResponse(health, status_code=503 if health["status"] == "error" else 200)

    @app.get("/api/studies")
    def api_studies(limit: int = Query(50, ge=1, le=1000)) -> dict[str, Any]:
        """Queue counts by state and the most recent studies with their latest case (as `dicom-node status --json`)."""
        return node_status(db, limit=limit)

    @app.get("/api/studies/{study_uid}")
    def api_study(study_uid: str) -> dict[str, Any]:
        """One study: its status entry, and the summary.json of its newest results (null without results)."""
        return dash.study(study_uid)

    @app.post("/api/studies/{study_uid}/reprocess")
    def api_reprocess(study_uid: str) -> dict[str, Any]:
        """Make a new case version from everything received (roles assigned again), as `dicom-node reprocess`."""
        return dash.reprocess(study_uid)

    @app.post("/api/studies/{study_uid}/resend")
    def api_resend(study_uid: str) -> dict[str, Any]:
        """Queue the latest SEG + SR again for every destination, as `dicom-node resend`; 409 when impossible."""
        return dash.resend(study_uid)

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _secure(response: Response) -> Response:
    for key, value in SECURITY_HEADERS.items():
        response.headers.setdefault(key, value)
    return response
