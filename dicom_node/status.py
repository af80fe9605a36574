"""What the node holds and where each study stands (``dicom-node status``; the dashboard reuses it).

UIDs, states, counts and errors only: no patient data (the database holds none).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from dicom_node import __version__
from dicom_node.db import CASE_STATES, Case, Database, Delivery, Series, Study
from dicom_node.storage import quarantine_count
from pipeline.roles import ROLES


def _role_order(role: str) -> int:
    return ROLES.index(role) if role in ROLES else len(ROLES)


def _iso(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def case_dict(case: Case, deliveries: Sequence[Delivery]) -> dict[str, Any]:
    assignment = json.loads(case.assignment or "{}")
    summary = json.loads(case.summary) if case.summary else None
    return {
        "version": case.version,
        "state": case.state,
        "trigger": case.trigger,
        "attempts": case.attempts,
        "error": case.reason or None,
        "created": _iso(case.created_at),
        "started": _iso(case.started_at),
        "finished": _iso(case.finished_at),
        "instances": case.n_instances,
        "roles": {role: {"series_instance_uid": c["series_instance_uid"], "series_description": c["series_description"],
                         "why": c["reason"]}
                  for role, c in sorted(assignment.get("chosen", {}).items(), key=lambda rc: _role_order(rc[0]))},
        "missing_roles": assignment.get("missing_roles", []),
        "lesions": None if summary is None else {
            "count": summary["lesion_count"], "count_ge_10mm3": summary["lesion_count_ge_10mm3"],
            "total_volume_mm3": summary.get("total_volume_mm3")},
        "result_dir": case.result_dir,
        # The node version that made the results (it may differ from the one reading them now).
        "software_version": None if summary is None else summary.get("software_version"),
        "deliveries": [{"destination": d.destination, "state": d.state, "attempts": d.attempts,
                        "error": d.last_error or None, "sent": _iso(d.sent_at),
                        "next_attempt": _iso(d.next_attempt_at) if d.state == "pending" else None}
                       for d in deliveries],
    }


def node_status(db: Database, *, limit: int = 50, study_uid: str | None = None,
                storage_root: Path | None = None) -> dict[str, Any]:
    """Queue counts by state and the most recent studies (newest first) with their latest case; with
    ``storage_root``, also how many refused instances its ``quarantine/`` keeps."""
    with db.read() as s:
        counts = dict(s.execute(select(Case.state, func.count(Case.id)).group_by(Case.state)).all())
        q = select(Study).order_by(Study.last_received_at.desc()).limit(limit)
        if study_uid is not None:
            q = select(Study).where(Study.study_uid == study_uid)
        studies = []
        for st in s.execute(q).scalars():
            cases = s.execute(select(Case).where(Case.study_id == st.id).order_by(Case.version.desc())).scalars().all()
            n_series = s.execute(select(func.count(Series.id)).where(Series.study_id == st.id)).scalar_one()
            latest = cases[0] if cases else None
            deliveries = (s.execute(select(Delivery).where(Delivery.case_id == latest.id).order_by(Delivery.id))
                          .scalars().all() if latest else [])
            studies.append({
                "study_instance_uid": st.study_uid,
                "instances": st.n_instances,
                "series": n_series,
                "first_received": _iso(st.first_received_at),
                "last_received": _iso(st.last_received_at),
                "waiting_for_completion": st.pending_since is not None,
                "ignored_late_instances": st.ignored_instances,
                "state": latest.state if latest else "receiving",
                "case": case_dict(latest, deliveries) if latest else None,
                "earlier_versions": [{"version": c.version, "state": c.state, "error": c.reason or None}
                                     for c in cases[1:]],
            })
    report: dict[str, Any] = {"software_version": __version__,
                              "queue": {state: int(counts.get(state, 0)) for state in CASE_STATES}}
    if storage_root is not None:
        report["quarantined"] = quarantine_count(storage_root)
    report["studies"] = studies
    return report


def format_status(status: dict[str, Any]) -> str:
    """Plain-text rendering of :func:`node_status` for a terminal."""
    lines = [f"dicom-node {status['software_version']}",
             "queue: " + ", ".join(f"{k} {v}" for k, v in status["queue"].items())]
    if status.get("quarantined"):
        lines.append(f"quarantine: {status['quarantined']} refused instance(s) kept with their reasons "
                     "(<storage.root>/quarantine/, see docs/node.md)")
    if not status["studies"]:
        lines.append("no studies received yet")
    for st in status["studies"]:
        case = st["case"]
        head = f"{st['study_instance_uid']}  {st['state']}"
        if case:
            head += f" (version {case['version']}, attempt {case['attempts']})"
        lines.append("")
        lines.append(head)
        lines.append(f"  received {st['instances']} instance(s) in {st['series']} series, last {st['last_received']}"
                     + ("; waiting for completion" if st["waiting_for_completion"] else ""))
        if not case:
            continue
        if case["roles"]:
            lines.append("  roles: " + ", ".join(f"{r}={v['series_description'] or v['series_instance_uid']}"
                                                 for r, v in case["roles"].items()))
        if case["missing_roles"]:
            lines.append("  missing: " + ", ".join(case["missing_roles"]))
        if case["lesions"]:
            les = case["lesions"]
            vol = les["total_volume_mm3"]
            lines.append(f"  lesions: {les['count']} ({les['count_ge_10mm3']} >= 10 mm3)"
                         + (f", total {vol:.0f} mm3" if vol is not None else "") + f"; results {case['result_dir']}"
                         + (f" (dicom-node {case['software_version']})" if case["software_version"] else ""))
        for d in case["deliveries"]:
            extra = f", next try {d['next_attempt']}" if d["next_attempt"] else ""
            err = f": {d['error']}" if d["error"] else ""
            lines.append(f"  -> {d['destination']}: {d['state']} after {d['attempts']} attempt(s){extra}{err}")
        if case["error"]:
            lines.append(f"  {'reason' if case['state'] == 'skipped' else 'error'}: {case['error']}")
    return "\n".join(lines)
