"""What the validation report shows, in order: built once from the ``metrics.json`` document and rendered by
both :mod:`training.validate.report` (HTML) and :mod:`training.validate.pdf`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from training.model_card import short_name
from training.validate.figures import box_figure, froc_figure, roc_figure
from training.validate.tables import (
    Table,
    all_tables,
    dataset_table,
    models_table,
    summary_table,
    worst_table,
)

__all__ = ["SIGNATURE", "TITLE", "ReportContent"]

TITLE = "Validation report: brain-metastasis segmentation"
SIGNATURE = ("Reviewed by (medical physicist): ______________________   Date: ____________   "
             "Signature: ______________________")


@dataclass
class ReportContent:
    """Everything both renderings show, in order."""

    doc: dict[str, Any]
    first: list[Table]  # the first page: models, data set, summary
    tables: list[Table]
    figures: list[tuple[str, Figure]]
    worst: Table | None
    overviews: list[tuple[str, Figure]]

    @classmethod
    def build(cls, doc: dict[str, Any], overviews: Sequence[tuple[str, Figure]]) -> ReportContent:
        has = any(m["combinations"] for m in doc["models"].values())
        figures = [("ROC curves", roc_figure(doc)), ("Dice, IoU and false positives per patient", box_figure(doc)),
                   ("Free-response ROC", froc_figure(doc))] if has else []
        return cls(doc=doc, first=[models_table(doc), dataset_table(doc), summary_table(doc)],
                   tables=all_tables(doc), figures=figures,
                   worst=worst_table(doc["worst_cases"]) if doc["worst_cases"] else None, overviews=list(overviews))

    def close(self) -> None:
        for _, fig in self.figures + self.overviews:
            plt.close(fig)

    def byline(self) -> str:
        d = self.doc
        return (f"{d['software']['name']} {d['software']['version']}, {d['date_utc']}; role combinations: "
                f"{d['mode']}{' ' + short_name('+'.join(d['roles'])) if d['roles'] else ''}. "
                "Research use only: not a medical device.")
