"""``dicom-node demo`` (``make demo``): two synthetic studies through the real node, end to end.

Generates two phantom studies (GE, seed 0 with all four sequences, seed 1 without BRAVO), starts
``dicom-node serve`` as a child process on the config's defaults with its own storage and database
under the work folder, sends both studies with ``dicom-node send``, waits until the node has
processed them, prints per study the roles, lesions, counts, result files and the wall time of each
stage, and stops the node. Only UIDs, series descriptions and numbers are printed (the phantoms'
names are fake anyway).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer
import yaml

from dicom_node.cli.exits import EXIT_FAILED, EXIT_USAGE, fail
from dicom_node.cli.node import ConfigOption, load_or_exit
from dicom_node.config import port_problem
from dicom_node.paths import PROJECT_ROOT
from dicom_node.states import FINAL_STATES, PROCESSED_STATES, QUEUED

DEFAULT_WORK = PROJECT_ROOT / "var" / "demo"
# The code that runs this command, whatever an installed `dicom-node` script would import: `-c` puts the
# working directory (the folder holding this copy of `dicom_node`, see _SOURCE) first on sys.path.
_SOURCE = Path(__file__).resolve().parents[2]
_DICOM_NODE = [sys.executable, "-c", "from dicom_node.cli import main; main()"]
STAGES = ("load", "register", "preprocess", "inference", "lesions", "dicom", "outputs")
RESULT_FILES = ("seg.dcm", "sr.dcm", "summary.json", "overview.png")

_HELP_PARAGRAPHS = (
    "End-to-end demo: two synthetic studies through the node on its defaults, then per study what it found.",
    ("1. Generates two synthetic GE studies with the generator of `dicom-node phantom` into WORK/studies/: seed 0 "
    "with all four sequences (BRAVO, CUBE pre, CUBE post, FLAIR), seed 1 without BRAVO, each with its distractor "
    "series (localizer, DWI, ...)."),
    ("2. Writes WORK/node.yaml: --config (AE title, port, model, rules, device ... as configured) with storage and "
    "a SQLite database under WORK (emptied at start: the studies' UIDs are fixed), short quiet times (--quiet) and "
    "no destinations, and starts `dicom-node serve` with it (log: WORK/node.log). A port already in use stops the "
    "demo with one line (exit 1): stop the node that holds it, or pass --port / --web-port."),
    ("3. Sends each study with `dicom-node send` (C-STORE, one association per study), then waits until the node "
    "has processed both (reading its database as `dicom-node status` does; at most --timeout)."),
    ("4. Prints per study: StudyInstanceUID, the series chosen for each role, missing roles, each lesion (number, "
    "volume, maximum diameter), counts (all, >= 10 mm3), where seg.dcm / sr.dcm / summary.json / overview.png "
    "were written, and wall times: generation, sending, last C-STORE to study complete (the quiet period), time "
    "in the queue, each pipeline stage, and last C-STORE to results written."),
    "5. Stops the node (SIGTERM), also on Ctrl-C or an error; with --keep only at Ctrl-C.",
    ("The bundled model is trained on synthetic studies and finds false lesions at its threshold: research use "
    "only. Exit codes: 0 both studies processed; 1 either was not, the node failed, or a port is in use; 2 bad "
    "usage or configuration."),
)
HELP = "\n\n".join(_HELP_PARAGRAPHS)


@dataclass
class DemoStudy:
    """One of the two demo studies: how it is made, where it went, how long each step took."""

    name: str
    seed: int
    missing: tuple[str, ...]
    folder: Path = Path()
    study_uid: str = ""
    n_files: int = 0
    n_series: int = 0
    #: planted lesions, largest first: (volume mm3, centroid LPS mm)
    truth_lesions: list[tuple[float, tuple[float, float, float]]] = field(default_factory=list)
    generate_s: float = 0.0
    send_s: float = 0.0
    send_line: str = ""
    resends: int = 0  # sends made again after a transient failure
    state: str = "receiving"


STUDIES = (
    DemoStudy("study 1", 0, ()),
    DemoStudy("study 2", 1, ("t1_bravo_post",)),
)


class _Stop(Exception):
    """SIGTERM to the demo: unwind like Ctrl-C so the node is stopped."""


def _raise_stop(*_: object) -> None:
    raise _Stop


def _say(text: str = "") -> None:
    typer.echo(text)


def _step(text: str) -> None:
    typer.echo(text + " ... ", nl=False)
    sys.stdout.flush()


def _describe(study: DemoStudy) -> str:
    if not study.missing:
        return "all four sequences"
    return "without " + ", ".join(study.missing)


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.settimeout(0.3)
        return s.connect_ex((host, port)) == 0


def _client_host(bind_address: str) -> str:
    return "127.0.0.1" if bind_address in ("0.0.0.0", "") else ("::1" if bind_address == "::" else bind_address)


def _wipe(work: Path) -> None:
    """Remove what an earlier demo left in ``work`` (only the paths the demo itself creates)."""
    for name in ("studies", "storage"):
        shutil.rmtree(work / name, ignore_errors=True)
    for name in ("node.db", "node.db-wal", "node.db-shm", "node.log", "node.yaml"):
        (work / name).unlink(missing_ok=True)


def _derived_config(base: Path, work: Path, *, model: Path | None, port: int | None, web_port: int | None,
                    quiet: float) -> tuple[dict[str, Any], list[str]]:
    """The user's config (resolved: absolute paths) plus the demo's overrides, and a line per override."""
    cfg = load_or_exit(base).model_dump(mode="json")
    default_series, default_study = (cfg["completion"][k] for k in ("series_quiet_seconds", "study_quiet_seconds"))
    series_quiet = round(quiet * 0.6, 2)
    cfg["storage"]["root"] = str(work / "storage")
    cfg["database"]["url"] = f"sqlite:///{work / 'node.db'}"
    cfg["completion"]["series_quiet_seconds"] = series_quiet
    cfg["completion"]["study_quiet_seconds"] = quiet
    cfg["destinations"] = []
    cfg["node"]["allowed_callers"] = []
    cfg["node"]["tls"]["enabled"] = False
    why = [
        (f"storage.root: {work / 'storage'} and database.url: sqlite:///{work / 'node.db'}, both emptied at start "
         "(the studies have fixed UIDs: a node that already holds them would see only repeats and do nothing)"),
        (f"completion: series_quiet_seconds {series_quiet:g}, study_quiet_seconds {quiet:g} (instead of "
         f"{default_series:g} and {default_study:g}: a study is processed seconds after its last instance, not a "
         "minute)"),
        ("destinations: none, node.allowed_callers: anyone, node.tls: off (the demo's own SCU sends to it; "
         "nothing is sent anywhere else)"),
    ]
    if model is not None:
        cfg["model"]["path"] = str(model.resolve())
        why.append(f"model.path: {model.resolve()} (--model)")
    if port is not None:
        cfg["node"]["port"] = port
        why.append(f"node.port: {port} (--port)")
    if web_port is not None:
        cfg["web"]["port"] = web_port
        why.append(f"web.port: {web_port} (--web-port)")
    return cfg, why


def _generate(study: DemoStudy, studies_dir: Path, voxel_mm: float | None) -> None:
    from training.phantom.dicom_writer import write_dicom_study
    from training.phantom.generate import generate_study

    start = time.monotonic()
    synthetic = generate_study(study.seed, vendor="ge", missing=study.missing, voxel_mm=voxel_mm)
    study.folder = studies_dir / f"case-{study.seed:04d}-ge"
    files = write_dicom_study(synthetic, study.folder / "dicom")
    study.generate_s = time.monotonic() - start
    study.n_files = len(files)
    study.n_series = len(synthetic.series)
    study.truth_lesions = sorted(((les.volume_mm3, les.centroid_lps_mm) for les in synthetic.lesions), reverse=True)
    import pydicom

    study.study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def _radius_mm(volume_mm3: float) -> float:
    """Radius (mm) of the sphere of ``volume_mm3``."""
    return (3.0 * volume_mm3 / (4.0 * math.pi)) ** (1.0 / 3.0)


#: Slack (mm) added to the touching distance of two lesions' equivalent spheres: about one voxel.
MATCH_SLACK_MM = 1.0


def match_planted(planted: Sequence[tuple[float, Sequence[float]]], found: Sequence[tuple[float, Sequence[float]]]
                  ) -> tuple[list[list[int]], list[bool]]:
    """Which found lesions are planted ones, from volumes (mm3) and centroids (LPS mm) alone (the demo has no
    voxel truth on the node's side): a found and a planted lesion match when their centroids are no farther apart
    than the radii of their equivalent spheres plus :data:`MATCH_SLACK_MM` (the spheres touch). Returns, per
    planted lesion, the 1-based numbers of the found lesions matching it, and per found lesion whether it matches
    any planted one (False = a false lesion)."""
    per_planted = [[j + 1 for j, (fv, fc) in enumerate(found)
                    if math.dist(pc, fc) <= _radius_mm(pv) + _radius_mm(fv) + MATCH_SLACK_MM]
                   for pv, pc in planted]
    matched = {j for js in per_planted for j in js}
    return per_planted, [j + 1 in matched for j in range(len(found))]


def _say_truth(study: DemoStudy, lesions: Sequence[dict[str, Any]]) -> None:
    """Planted vs found: each planted lesion found (as which numbers) or missed, and the found ones that match none."""
    per_planted, is_true = match_planted(study.truth_lesions,
                                         [(les["volume_mm3"], les["centroid_lps_mm"]) for les in lesions])
    n_found = sum(1 for js in per_planted if js)
    false = [les["number"] for les, ok in zip(lesions, is_true) if not ok]
    _say(f"  planted           {len(study.truth_lesions)} lesion(s): {n_found} found, "
         f"{len(study.truth_lesions) - n_found} missed; {len(false)} of the {len(lesions)} found match no planted "
         "lesion (false)" + (f": #{', #'.join(map(str, false))}" if false else ""))
    for i, ((volume, _), js) in enumerate(zip(study.truth_lesions, per_planted, strict=True), 1):
        _say(f"    planted {i:<3d} {volume:9.1f} mm3  " + (f"found as #{', #'.join(map(str, js))}" if js else "MISSED"))


def _log_tail(log: Path, lines: int = 25) -> str:
    if not log.exists():
        return "(no log)"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


class _Node:
    """``dicom-node serve --config FILE`` as a child process (own session: Ctrl-C reaches the demo, which
    stops it), log in ``log``."""

    def __init__(self, config: Path, log: Path, host: str, port: int, grace: float) -> None:
        self.config, self.log, self.host, self.port, self.grace = config, log, host, port, grace
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([*_DICOM_NODE, "serve", "--config", str(self.config)], stdout=log,
                                         stderr=subprocess.STDOUT, cwd=_SOURCE, start_new_session=True,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        end = time.monotonic() + timeout
        while not _port_open(self.host, self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"the node exited with code {self.proc.returncode} before listening")
            if time.monotonic() > end:
                raise RuntimeError(f"the node did not listen on port {self.port} within {timeout:g} s")
            time.sleep(0.2)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM, wait for the running case's grace period (plus a margin), then SIGKILL."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.grace + 30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


#: a C-STORE unanswered this long aborts the send, which is then made again, as a PACS resends
_ANSWER_TIMEOUT_S = 30
_SEND_ATTEMPTS = 3
#: what `dicom-node send` says when the association, not the data, failed (worth sending again)
_TRANSIENT = ("no C-STORE response", "association aborted", "could not connect")


def _send(study: DemoStudy, config: Path, to: str, calling_aet: str) -> None:
    start = time.monotonic()
    for attempt in range(1, _SEND_ATTEMPTS + 1):
        r = subprocess.run([*_DICOM_NODE, "send", str(study.folder / "dicom"), "--to", to, "--calling-aet",
                            calling_aet, "--config", str(config), "--no-progress", "--timeout", str(_ANSWER_TIMEOUT_S)],
                           capture_output=True, text=True, cwd=_SOURCE, check=False)
        lines = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
        transient = r.returncode != 0 and any(t in " ".join(lines[-3:]) for t in _TRANSIENT)
        if not transient or attempt == _SEND_ATTEMPTS:
            break
        # A rare stall (issue #19: a C-STORE request or its answer lost between two pynetdicom peers on
        # loopback under load, cause not yet found): send again like a PACS would; the node stores each
        # SOP instance once, so instances already stored are answered as repeats.
        study.resends += 1
        _say(f"  send {study.name}: {lines[-1] if lines else 'failed'}; sending again ({attempt + 1}/{_SEND_ATTEMPTS})")
    study.send_s = time.monotonic() - start
    study.send_line = next((line for line in lines if line.startswith("sent ")), lines[-1] if lines else "")
    if r.returncode != 0:
        raise RuntimeError(f"dicom-node send {study.name} failed (exit {r.returncode}): " + " | ".join(lines[-3:]))


def _case_times(db: Any, study_uid: str) -> dict[str, float | None]:
    """Exact timestamps (epoch seconds) of the study's last instance and its latest case."""
    from sqlalchemy import select

    from dicom_node.db import Case, Study

    with db.session() as s:
        st = s.execute(select(Study).where(Study.study_uid == study_uid)).scalar_one_or_none()
        if st is None:
            return {}
        case = s.execute(select(Case).where(Case.study_id == st.id).order_by(Case.version.desc())).scalars().first()
        return {"last_received": st.last_received_at, "created": case.created_at if case else None,
                "started": case.started_at if case else None, "finished": case.finished_at if case else None}


def _wait(db: Any, node: _Node, studies: tuple[DemoStudy, ...], timeout: float, t0: float) -> dict[str, Any]:
    """Poll the node's database until every study's latest case is final; print each state change."""
    from dicom_node.status import node_status

    end = time.monotonic() + timeout
    found: dict[str, Any] = {}
    while True:
        for st in node_status(db, limit=20)["studies"]:
            found[st["study_instance_uid"]] = st
        for study in studies:
            st = found.get(study.study_uid)
            state = st["state"] if st else "receiving"
            if state != study.state:
                study.state = state
                extra = ""
                if st and st["case"] and state == QUEUED:
                    extra = f" (complete: {st['case']['trigger'] or 'quiet period'})"
                _say(f"  {time.monotonic() - t0:6.1f} s  {study.name}: {state}{extra}")
        if all(s.state in FINAL_STATES for s in studies):
            return found
        if not node.alive():
            raise RuntimeError(f"the node stopped (exit code {node.proc.returncode if node.proc else '?'}) "
                               "before both studies were processed")
        if time.monotonic() > end:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for the studies "
                               f"({', '.join(f'{s.name}: {s.state}' for s in studies)})")
        time.sleep(0.5)


def _report(study: DemoStudy, st: dict[str, Any], times: dict[str, float | None], storage_root: Path) -> bool:
    case = st["case"] or {}
    _say()
    _say(f"{study.name} (seed {study.seed}, GE, {_describe(study)})")
    _say(f"  StudyInstanceUID  {study.study_uid}")
    _say(f"  state             {st['state']}" + (f" (version {case['version']})" if case else ""))
    if case.get("error"):
        _say(f"  {'reason' if st['state'] == 'skipped' else 'error'}            {case['error']}")
    _say("  roles found:")
    for role, chosen in (case.get("roles") or {}).items():
        _say(f"    {role:<14} <- '{chosen['series_description']}'")
    missing = case.get("missing_roles") or []
    _say(f"  missing roles     {', '.join(missing) if missing else 'none'}")
    result_dir = storage_root / case["result_dir"] if case.get("result_dir") else None
    summary_path = result_dir / "summary.json" if result_dir else None
    summary = json.loads(summary_path.read_text()) if summary_path and summary_path.is_file() else None
    if summary is not None and result_dir is not None:
        lesions = summary["lesions"]
        _say(f"  lesions           {summary['lesion_count']} found ({summary['lesion_count_ge_10mm3']} >= 10 mm3), "
             f"total {summary['total_volume_mm3']:.0f} mm3; {len(study.truth_lesions)} planted "
             f"({sum(v >= 10 for v, _ in study.truth_lesions)} >= 10 mm3)")
        if lesions:
            _say("       #   volume mm3   max diameter mm")
        for les in lesions:
            _say(f"    {les['number']:4d}  {les['volume_mm3']:11.1f}  {les['max_diameter_mm']:16.1f}")
        _say_truth(study, lesions)
        _say("  written:")
        for name in RESULT_FILES:
            path = result_dir / name
            if path.is_file():
                _say(f"    {name:<13} {path}")
            elif name == "seg.dcm":
                _say(f"    {name:<13} (none: no lesion found, and a DICOM SEG cannot be empty)")
    _say("  wall time (s):")
    _say(f"    generate {study.generate_s:.1f} ({study.n_series} series, {study.n_files} files); "
         f"send {study.send_s:.1f} (dicom-node send: {study.send_line})")
    last, created, started, finished = (times.get(k) for k in ("last_received", "created", "started", "finished"))
    if last is not None and created is not None:
        line = f"    last C-STORE -> study complete {created - last:.1f} (quiet period)"
        if started is not None:
            line += f"; queued {started - created:.1f}"
        _say(line)
    if summary is not None:
        t = summary.get("timings_s", {})
        _say("    pipeline: " + ", ".join(f"{k} {t[k]:.1f}" for k in STAGES if k in t)
             + (f"; total {t['total']:.1f}" if "total" in t else ""))
    if last is not None and finished is not None:
        _say(f"    last C-STORE -> results written: {finished - last:.1f}")
    return st["state"] in PROCESSED_STATES and summary is not None


WorkOption = typer.Option(
    DEFAULT_WORK, "--work", file_okay=False, show_default="var/demo",
    help="Folder for the demo's studies, the node's storage, database, log and derived config. Its studies/, "
    "storage/, node.db, node.log and node.yaml are replaced at start; nothing else in it is touched.")
ModelOption = typer.Option(
    None, "--model", exists=True, dir_okay=False, show_default=False,
    help="Model checkpoint for the node (default: model.path of --config, the bundled models/ild-demo.safetensors).")
PortOption = typer.Option(
    None, "--port", min=1, max=65535, show_default=False,
    help="DICOM port of the demo node (default: node.port of --config, 11112).")
WebPortOption = typer.Option(
    None, "--web-port", min=1, max=65535, show_default=False,
    help="Dashboard port of the demo node (default: web.port of --config, 8080).")
QuietOption = typer.Option(
    5.0, "--quiet", min=0.5, metavar="SECONDS",
    help="The demo node's completion.study_quiet_seconds; its series_quiet_seconds is 60 % of it. The node's "
    "defaults (30 s / 60 s) suit a PACS; a demo need not wait that long.")
VoxelMmOption = typer.Option(
    None, "--voxel-mm", min=0.5, metavar="MM", show_default=False,
    help="Faster, coarser studies: isotropic voxels of MM mm (e.g. 3: seconds instead of minutes, for tests) "
    "instead of the realistic ~1 mm protocols.")
TimeoutOption = typer.Option(
    600.0, "--timeout", min=1, metavar="SECONDS", help="Give up waiting for the results after this long.")
KeepOption = typer.Option(
    False, "--keep",
    help="Leave the node running after the report (look at it with `dicom-node status --config WORK/node.yaml`) "
    "until Ctrl-C.")


def demo(
    config: Path = ConfigOption,
    work: Path = WorkOption,
    model: Path = ModelOption,
    port: int = PortOption,
    web_port: int = WebPortOption,
    quiet: float = QuietOption,
    voxel_mm: float = VoxelMmOption,
    timeout: float = TimeoutOption,
    keep: bool = KeepOption,
) -> None:
    """End-to-end demo (``make demo``); the full description is ``HELP`` (``dicom-node demo --help``)."""
    work = work.resolve()
    cfg, why = _derived_config(config, work, model=model, port=port, web_port=web_port, quiet=quiet)
    bind, node_port = cfg["node"]["bind_address"], int(cfg["node"]["port"])
    web_host, web_port_value = cfg["web"]["host"], int(cfg["web"]["port"])
    if node_port == web_port_value:
        raise fail(f"node.port and web.port are both {node_port}: pass --port or --web-port", EXIT_USAGE)
    for what, host, p, option in (("DICOM", bind, node_port, "--port"), ("dashboard", web_host, web_port_value,
                                                                        "--web-port")):
        problem = port_problem(host, p)
        if problem:
            raise fail(f"the demo node's {what} port {host}:{p} is {problem} (is a node running? stop it, "
                       f"or pass {option} N)", EXIT_FAILED)
    if not Path(cfg["model"]["path"]).is_file():
        raise fail(f"model {cfg['model']['path']} does not exist (the bundled model is rebuilt by `make model`; "
                   "or pass --model)", EXIT_USAGE)

    previous = signal.signal(signal.SIGTERM, _raise_stop)
    node: _Node | None = None
    db = None
    t0 = time.monotonic()
    ok = reported = False
    try:
        work.mkdir(parents=True, exist_ok=True)
        _wipe(work)
        derived = work / "node.yaml"
        derived.write_text(
            f"# Written by `dicom-node demo` from {config.resolve()} (every key, paths resolved), with the demo's\n"
            "# overrides: storage.root, database.url, completion.*_quiet_seconds, destinations, node.allowed_callers,\n"
            "# node.tls.enabled (and node.port / web.port / model.path when given on the command line).\n"
            + yaml.safe_dump(cfg, sort_keys=False))
        load_or_exit(derived)
        _say(f"demo config: {derived} = {config} with")
        for line in why:
            _say(f"  - {line}")

        studies = tuple(DemoStudy(s.name, s.seed, s.missing) for s in STUDIES)
        size = f"{voxel_mm:g} mm" if voxel_mm else "realistic ~1 mm"
        for i, study in enumerate(studies, 1):
            _step(f"[{i}/5] generating {study.name}: seed {study.seed}, GE, {_describe(study)}, {size} voxels")
            try:
                _generate(study, work / "studies", voxel_mm)
            except (OSError, ValueError) as exc:
                _say("failed")
                raise fail(f"generating {study.name}: {exc}") from None
            _say(f"{study.generate_s:.1f} s: {study.n_series} series, {study.n_files} files, "
                 f"{len(study.truth_lesions)} lesions planted -> {study.folder / 'dicom'}")

        aet = cfg["node"]["ae_title"]
        host = _client_host(bind)
        _step(f"[3/5] starting the node: dicom-node serve --config {derived} ({aet} on port {node_port}, "
              f"model {Path(cfg['model']['path']).name}, log {work / 'node.log'})")
        node = _Node(derived, work / "node.log", host, node_port, float(cfg["queue"]["shutdown_grace_seconds"]))
        start = time.monotonic()
        try:
            node.start(timeout=120)
        except RuntimeError as exc:
            _say("failed")
            raise fail(f"{exc}; last lines of {node.log}:\n{_log_tail(node.log)}") from None
        _say(f"listening after {time.monotonic() - start:.1f} s (pid {node.proc.pid if node.proc else '?'})")

        from dicom_node.db import open_database

        db = open_database(cfg["database"]["url"], migrate_schema=False)
        to = f"[{host}]:{node_port}:{aet}" if ":" in host else f"{host}:{node_port}:{aet}"
        for study in studies:
            _step(f"[4/5] dicom-node send {study.name} --to {to}")
            try:
                _send(study, derived, to, calling_aet=aet)
            except RuntimeError as exc:
                _say("failed")
                raise fail(str(exc)) from None
            _say(f"{study.send_s:.1f} s: {study.send_line}")

        _say(f"[5/5] waiting for the results (study complete after {quiet:g} s without new instances, or when "
             "all four roles are complete; then the pipeline)")
        t_wait = time.monotonic()
        try:
            found = _wait(db, node, studies, timeout, t_wait)
        except RuntimeError as exc:
            raise fail(f"{exc}; last lines of {node.log}:\n{_log_tail(node.log)}") from None

        storage_root = Path(cfg["storage"]["root"])
        results = [_report(s, found[s.study_uid], _case_times(db, s.study_uid), storage_root) for s in studies]
        ok, reported = all(results), True
        _say()
        if _port_open(web_host if web_host not in ("0.0.0.0", "::") else "127.0.0.1", web_port_value):
            _say(f"dashboard of the demo node: http://{web_host}:{web_port_value}/")
        _say(f"the node's view: dicom-node status --config {derived}")
        _say(f"demo {'finished' if ok else 'FAILED'} in {time.monotonic() - t0:.1f} s: "
             f"{sum(results)} of {len(results)} studies processed")
        if keep and node.alive():
            _say("the node keeps running (--keep); Ctrl-C stops it")
            while node.alive():
                time.sleep(0.5)
    except (KeyboardInterrupt, _Stop):
        _say()
        if not reported:  # Ctrl-C after the report (--keep) is how the demo is meant to end
            _say("interrupted")
            ok = False
    finally:
        signal.signal(signal.SIGTERM, previous)
        if db is not None:
            db.dispose()
        if node is not None and node.proc is not None and not node.alive():
            _say(f"the node had stopped by itself (exit code {node.proc.returncode}; log {node.log})")
        elif node is not None and node.proc is not None:
            _step("stopping the node (SIGTERM)")
            start = time.monotonic()
            code = node.stop()
            _say(f"stopped in {time.monotonic() - start:.1f} s (exit code {code})")
    if not ok:
        raise typer.Exit(EXIT_FAILED)
