"""Study completion and routing: decide when a study has arrived, assign roles, and queue (or skip) a case.

A DICOM association carries no "study finished" signal, so completion is inferred from time:

- a series is complete after ``completion.series_quiet_seconds`` without a new instance;
- a study is complete when all its series are complete and ``completion.study_quiet_seconds``
  passed since its last instance, OR (``start_when_roles_complete``) as soon as every role of the
  rules file has a complete series, OR ``completion.max_wait_seconds`` after the first instance
  not yet in a case (then whatever is there is processed).

At completion the rules assign roles and a new version of the study's case is made: ``queued``
with its input files frozen (role -> files), or ``skipped`` with the reason when no series can be
used. Instances arriving later start a new version (``completion.late_instances: reprocess``) or are
counted and ignored (``ignore``); an older version still waiting in the queue is superseded.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from dicom_node.config import CompletionSection
from dicom_node.db import QUEUED, SKIPPED, Case, Database, Instance, Series, Study
from dicom_node.index import study_series
from dicom_node.rules import RuleSet, StudyAssignment, assign_roles

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    """Why a study counts as complete now (``trigger``), or None from :func:`completion_trigger`."""

    trigger: str
    series_ids: set[int] | None  # only these series (the complete ones), None = all


def completion_trigger(session: Session, study: Study, settings: CompletionSection, rules: RuleSet,
                       now: float) -> Completion | None:
    """Whether ``study`` (with instances pending) is complete at ``now``, and why."""
    series = session.execute(
        select(Series.id, Series.last_received_at).where(Series.study_id == study.id)).all()
    complete = {s.id for s in series if now - s.last_received_at >= settings.series_quiet_seconds}
    if study.pending_since is not None and now - study.pending_since >= settings.max_wait_seconds:
        return Completion(f"max wait ({settings.max_wait_seconds:g} s) reached", None)
    if len(complete) == len(series) and now - study.last_received_at >= settings.study_quiet_seconds:
        return Completion(f"all series complete and study quiet for {settings.study_quiet_seconds:g} s", None)
    if settings.start_when_roles_complete and complete:
        assignment = assign_roles(study_series(session, study.id, series_ids=complete), rules)
        if assignment.chosen and not assignment.missing_roles:
            return Completion("every role has a complete series", complete)
    return None


def skip_reason(assignment: StudyAssignment) -> str | None:
    """Why a study cannot be processed (no series got a role), or None when it can."""
    if assignment.chosen:
        return None
    if not assignment.decisions:
        return "no usable series: no MR image series with readable headers (only other objects were received)"
    why = "; ".join(f"series {d.series_number if d.series_number is not None else '?'} "
                    f"{d.series_instance_uid}: {d.reason}" for d in assignment.decisions[:8])
    return f"no usable series: no series matched a role of the rules ({why})"


def case_inputs(session: Session, study_id: int, assignment: StudyAssignment) -> dict[str, list[str]]:
    """role -> the chosen series' instance paths (relative to storage.root), in instance-number order.

    Instances of another SOP class than their series (an SR or a secondary capture a scanner put
    into an MR series) are left out: they are no slices of the volume (:func:`odd_instances`)."""
    chosen_uids = {c.series_instance_uid for c in assignment.chosen.values()}
    rows = session.execute(
        select(Series.series_uid, Instance.path)
        .join(Instance, Instance.series_id == Series.id)
        .where(Series.study_id == study_id, Series.series_uid.in_(chosen_uids),
               Instance.sop_class_uid == Series.sop_class_uid)
        .order_by(Instance.instance_number, Instance.id)).all()
    sources: dict[str, list[str]] = {}
    for r in rows:
        sources.setdefault(r.series_uid, []).append(r.path)
    return {role: sources.get(c.series_instance_uid, []) for role, c in assignment.chosen.items()}


def odd_instances(session: Session, study_id: int, series_uids: set[str]) -> dict[str, int]:
    """SeriesInstanceUID -> how many of its instances have another SOP class than the series (left out)."""
    rows = session.execute(
        select(Series.series_uid, func.count(Instance.id))
        .join(Instance, Instance.series_id == Series.id)
        .where(Series.study_id == study_id, Series.series_uid.in_(series_uids),
               Instance.sop_class_uid != Series.sop_class_uid)
        .group_by(Series.series_uid)).all()
    return {uid: n for uid, n in rows}


def make_case(session: Session, study: Study, assignment: StudyAssignment, trigger: str, now: float) -> Case:
    """Create the study's next case version from ``assignment`` (queued, or skipped with its reason)."""
    inputs = case_inputs(session, study.id, assignment)
    chosen_uids = {c.series_instance_uid for c in assignment.chosen.values()}
    for series_uid, n in odd_instances(session, study.id, chosen_uids).items():
        log.info("study %s series %s: %d instance(s) of another SOP class than the series left out",
                 study.study_uid, series_uid, n)
    reason = skip_reason(assignment)
    version = study.latest_version + 1
    n = session.execute(select(func.count(Instance.id)).join(Series).where(Series.study_id == study.id)).scalar_one()
    # An older version still waiting is superseded: processing it would only produce stale results.
    session.execute(update(Case).where(Case.study_id == study.id, Case.state == QUEUED).values(
        state=SKIPPED, reason=f"superseded by version {version}", updated_at=now))
    case = Case(study_id=study.id, version=version, state=SKIPPED if reason else QUEUED, reason=reason or "",
                trigger=trigger, attempts=0, created_at=now, updated_at=now, n_instances=n,
                assignment=json.dumps(assignment.to_dict()), inputs=json.dumps(inputs))
    session.add(case)
    study.latest_version = version
    study.pending_since = None
    session.flush()
    roles = ", ".join(f"{r}={c.series_instance_uid}" for r, c in assignment.chosen.items()) or "none"
    if reason:
        log.info("study %s version %d skipped (%s): %s", study.study_uid, version, trigger, reason)
    else:
        log.info("study %s version %d queued (%s): %d instance(s), roles %s", study.study_uid, version, trigger, n, roles)
    return case


def route_complete_studies(db: Database, settings: CompletionSection, rules: RuleSet, *,
                           now: float | None = None) -> list[int]:
    """One completion pass over the studies with pending instances; returns the ids of the cases made."""
    now = time.time() if now is None else now
    made: list[int] = []
    with db.session() as s:
        pending = s.execute(select(Study.id).where(Study.pending_since.is_not(None))).scalars().all()
    for study_id in pending:
        with db.session() as s:
            study = s.get(Study, study_id)
            if study is None or study.pending_since is None:
                continue
            done = completion_trigger(s, study, settings, rules, now)
            if done is None:
                continue
            if study.latest_version > 0 and settings.late_instances == "ignore":
                n = s.execute(select(func.count(Instance.id)).join(Series).where(
                    Series.study_id == study.id, Instance.received_at >= study.pending_since)).scalar_one()
                study.ignored_instances += n
                study.pending_since = None
                log.info("study %s: %d instance(s) arrived after version %d was made; ignored "
                         "(completion.late_instances: ignore)", study.study_uid, n, study.latest_version)
                continue
            assignment = assign_roles(study_series(s, study.id, series_ids=done.series_ids), rules)
            if study.latest_version > 0:
                latest = s.execute(select(Case).where(Case.study_id == study.id, Case.version == study.latest_version)
                                   ).scalar_one()
                if json.loads(latest.inputs) == case_inputs(s, study.id, assignment):
                    # Late instances outside the chosen series (a report, a localizer): same inputs, same result.
                    study.pending_since = None
                    log.info("study %s: instances arrived after version %d but its inputs are unchanged; "
                             "not reprocessed", study.study_uid, study.latest_version)
                    continue
            made.append(make_case(s, study, assignment, done.trigger, now).id)
    return made


def reprocess(db: Database, study_uid: str, rules: RuleSet, *, now: float | None = None) -> Case:
    """Make a new case version of a study now, from every instance received so far (``dicom-node reprocess``).

    Raises KeyError when the study is unknown."""
    now = time.time() if now is None else now
    with db.session() as s:
        study = s.execute(select(Study).where(Study.study_uid == study_uid)).scalar_one_or_none()
        if study is None:
            raise KeyError(study_uid)
        assignment = assign_roles(study_series(s, study.id), rules)
        return make_case(s, study, assignment, "reprocess requested", now)
