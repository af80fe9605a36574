"""The outputs in ``--out``: ``report.html`` (self-contained: PNGs embedded as base64), ``report.pdf``
(:mod:`training.validate.pdf`), ``metrics.json`` (the whole document; undefined values are ``null``) and
``cases.csv`` (one row per case x model x combination)."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from training.metrics import PatientMetrics
from training.validate.content import SIGNATURE, TITLE, ReportContent
from training.validate.evaluate import CaseEvaluation
from training.validate.pdf import write_pdf
from training.validate.tables import Table

__all__ = ["json_safe", "render_html", "write_cases_csv", "write_outputs"]


def json_safe(value: Any) -> Any:
    """``value`` with NaN / inf replaced by None (strict JSON) and tuples as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _png(fig: Figure, dpi: int = 90) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _table_html(t: Table) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in t.header)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in t.rows)
    note = f'<p class="note">{e(t.note)}</p>' if t.note else ""
    return f"<h2>{e(t.title)}</h2>\n<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}\n"


_CSS = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}table{border-collapse:collapse;"
        "font-size:12px;margin-bottom:.3em}td,th{border:1px solid #bbb;padding:3px 6px;text-align:left}"
        "th{background:#eee}.note{font-size:11px;color:#555}img{max-width:100%}.cases img{width:260px}"
        ".sig{margin-top:3em;font-size:14px}")


def render_html(content: ReportContent) -> str:
    e = html.escape
    parts = [(f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(TITLE)}</title>"
              f"<style>{_CSS}</style></head><body><h1>{e(TITLE)}</h1><p>{e(content.byline())}</p>")]
    parts += [_table_html(t) for t in content.first + content.tables]
    for title, fig in content.figures:
        parts.append(f"<h2>{e(title)}</h2><img alt='{e(title)}' src='data:image/png;base64,{_png(fig)}'>")
    if content.worst is not None:
        parts.append(_table_html(content.worst))
        parts.append("<div class='cases'>" + "".join(
            f"<img alt='{e(cid)}' src='data:image/png;base64,{_png(fig)}'>" for cid, fig in content.overviews)
            + "</div>")
    parts.append(f"<p class='sig'>{e(SIGNATURE)}</p></body></html>\n")
    return "\n".join(parts)


_CSV_FIELDS = [f for f in PatientMetrics.__dataclass_fields__ if f != "case_id"]


def write_cases_csv(evaluations: Sequence[CaseEvaluation], path: Path) -> Path:
    """One row per case x model x combination: the patient's metrics and GT lesions hit per size bin."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        bins = evaluations[0].size_bins if evaluations else ()
        w.writerow(["model", "combination", "roles_given", "case_id", *_CSV_FIELDS,
                    *(f"hit_{b.low_mm3:g}_{b.high_mm3:g}mm3" for b in bins),
                    *(f"n_{b.low_mm3:g}_{b.high_mm3:g}mm3" for b in bins)])
        for ev in evaluations:
            m = ev.metrics
            w.writerow([ev.model, ev.combination, "+".join(ev.roles), m.case_id,
                        *(getattr(m, k) for k in _CSV_FIELDS), *(b.n_hit for b in ev.size_bins),
                        *(b.n_true for b in ev.size_bins)])
    return path


def write_outputs(doc: dict[str, Any], evaluations: Sequence[CaseEvaluation], out: Path,
                  overviews: Sequence[tuple[str, Figure]] = ()) -> dict[str, Path]:
    """Write the four files into ``out`` (created); returns their paths by name."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out / "metrics.json", "cases": out / "cases.csv", "html": out / "report.html",
             "pdf": out / "report.pdf"}
    paths["metrics"].write_text(json.dumps(json_safe(doc), indent=1, allow_nan=False))
    write_cases_csv(evaluations, paths["cases"])
    content = ReportContent.build(doc, overviews)
    try:
        paths["html"].write_text(render_html(content))
        write_pdf(content, paths["pdf"], TITLE, SIGNATURE)
    finally:
        content.close()
    return paths
