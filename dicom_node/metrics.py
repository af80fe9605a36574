"""Prometheus metrics of the running node (served at ``/metrics`` by the dashboard, ``dicom_node/web``).

Counters and the stage histogram live in the receiving node's process, which serves the web app; the
stages feed them through the one-line hooks below. Worker processes (``dicom_node/worker.py``) forward
each hook call to it (:func:`forward_to`, :func:`apply`). Case counts by state are read from the database at
scrape time, so they are right whichever process changed them (``dicom-node reprocess`` from a shell, a second
node on PostgreSQL).

The metric objects are not registered in prometheus_client's global registry: :func:`registry` builds a
fresh one per web app, so tests can make as many apps as they like. Labels carry stage names, states and
destination names only: no UIDs (unbounded) and no patient data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# No *_created series: a timestamp per counter that the node's dashboards do not use.
disable_created_metrics()

#: Pipeline stages timed in ``summary.json`` (``timings_s``), in pipeline order.
STAGES = ("load", "register", "preprocess", "inference", "lesions", "dicom", "outputs", "total")

RECEIVED = Counter("dicom_node_received_instances", "DICOM instances received, stored and indexed (repeats of a "
                   "known SOP Instance UID not counted)", registry=None)
STAGE_SECONDS = Histogram("dicom_node_stage_seconds", "Wall seconds of each pipeline stage per processed case "
                          "(summary.json timings_s)", ["stage"], registry=None,
                          buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600))
CASE_FAILURES = Counter("dicom_node_case_failures", "Failed processing attempts: permanent (the study cannot be "
                        "processed) or retried (re-queued unless out of attempts)", ["kind"], registry=None)
SEND_FAILURES = Counter("dicom_node_send_failures", "Failed deliveries of SEG + SR by destination: transient "
                        "(retried) or permanent (the delivery failed)", ["destination", "kind"], registry=None)

_PROCESS_METRICS = (RECEIVED, STAGE_SECONDS, CASE_FAILURES, SEND_FAILURES)


# --------------------------------------------------------------------------- hooks (one line at each call site)

#: where hook calls go in a worker process (``events.put`` of a queue to the receiving node); None: here
_forward: Callable[[tuple[str, dict[str, Any]]], None] | None = None


def forward_to(put: Callable[[tuple[str, dict[str, Any]]], None] | None) -> None:
    """Send every hook call of this process to ``put`` as ``(hook name, keyword arguments)``; None: record here."""
    global _forward
    _forward = put


def apply(name: str, kwargs: dict[str, Any]) -> None:
    """Record a hook call forwarded by a worker process (unknown names are ignored, with a log line)."""
    hook = _HOOKS.get(name)
    if hook is None:
        log.warning("metrics: unknown event %r from a worker", name)
        return
    hook(**kwargs)


def _emit(name: str, **kwargs: Any) -> None:
    if _forward is not None:
        _forward((name, kwargs))
    else:
        _HOOKS[name](**kwargs)


def _instance_received() -> None:
    RECEIVED.inc()


def _case_finished(summary: dict[str, Any]) -> None:
    for stage, seconds in (summary.get("timings_s") or {}).items():
        if stage in STAGES and isinstance(seconds, (int, float)):
            STAGE_SECONDS.labels(stage).observe(seconds)


def _case_failed(permanent: bool) -> None:
    CASE_FAILURES.labels("permanent" if permanent else "retried").inc()


def _send_failed(destination: str, transient: bool) -> None:
    SEND_FAILURES.labels(destination, "transient" if transient else "permanent").inc()


_HOOKS: dict[str, Callable[..., None]] = {"instance_received": _instance_received, "case_finished": _case_finished,
                                          "case_failed": _case_failed, "send_failed": _send_failed}


def instance_received() -> None:
    """A new instance is stored and indexed (``index.Index.record``)."""
    _emit("instance_received")


def case_finished(summary: dict[str, Any]) -> None:
    """A case's results are written (``processor``): observe each stage of ``summary["timings_s"]``."""
    _emit("case_finished", summary={"timings_s": summary.get("timings_s") or {}})


def case_failed(*, permanent: bool) -> None:
    """A processing attempt failed (``processor``)."""
    _emit("case_failed", permanent=permanent)


def send_failed(destination: str, *, transient: bool) -> None:
    """Sending to ``destination`` failed (``dispatcher``)."""
    _emit("send_failed", destination=destination, transient=transient)


# --------------------------------------------------------------------------- scrape-time collectors


class NodeCollector(Collector):
    """Values read when Prometheus scrapes: cases by state (database), free disk, version and model."""

    def __init__(self, case_counts: Callable[[], dict[str, int]], free_bytes: Callable[[], float],
                 info: Callable[[], dict[str, str]]) -> None:
        self._case_counts = case_counts
        self._free_bytes = free_bytes
        self._info = info

    def describe(self) -> Iterator[Any]:
        return iter(())  # values come from the database at scrape time; nothing to check at registration

    def collect(self) -> Iterator[Any]:
        cases = GaugeMetricFamily("dicom_node_cases", "Case versions in the database by state (queued, running, "
                                  "done, failed, sent, skipped)", labels=["state"])
        try:
            for state, n in self._case_counts().items():
                cases.add_metric([state], n)
        except Exception:  # a scrape must not fail because the database is busy for a moment
            log.exception("metrics: could not read case counts")
        yield cases
        free = GaugeMetricFamily("dicom_node_storage_free_bytes", "Free disk on the filesystem of storage.root")
        free.add_metric([], self._free_bytes())
        yield free
        yield InfoMetricFamily("dicom_node", "Node version and the loaded model", value=self._info())


def registry(case_counts: Callable[[], dict[str, int]], free_bytes: Callable[[], float],
             info: Callable[[], dict[str, str]]) -> CollectorRegistry:
    """A registry with the process's counters and a :class:`NodeCollector` (one per web app)."""
    reg = CollectorRegistry(auto_describe=False)
    for metric in _PROCESS_METRICS:
        reg.register(metric)
    reg.register(NodeCollector(case_counts, free_bytes, info))
    return reg
