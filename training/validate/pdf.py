"""``report.pdf``: the HTML report's content on landscape A4 pages, the summary table on page 1.

Library: matplotlib's ``PdfPages``. It is already a dependency (the plots are matplotlib figures, drawn into
the PDF as vectors), installs from wheels on a fresh Debian machine with pip alone, and needs no system
libraries (weasyprint needs Pango/cairo, wkhtmltopdf a binary). Tables are drawn with ``Axes.table``;
fonts are embedded as TrueType (``pdf.fonttype`` 42) so the text can be searched and extracted (pdftotext).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import matplotlib.image as mpimg
import matplotlib.pyplot as plt
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox

from training.validate.content import ReportContent
from training.validate.tables import Table

__all__ = ["write_pdf"]

PAGE_IN = (11.69, 8.27)  # A4 landscape
_ROW = 0.026  # table row height, fraction of the page height
_FONT = 6.5
_TOP, _BOTTOM, _LEFT, _WIDTH = 0.93, 0.05, 0.04, 0.92


class _Pages:
    """Stacks titled tables down pages, starting a new page when the next table (or a part of it) does not fit."""

    def __init__(self, pdf: PdfPages, title: str, byline: str) -> None:
        self.pdf, self.title, self.byline = pdf, title, byline
        self.fig: Figure | None = None
        self.y = _TOP

    def _page(self, height: float) -> Figure:
        """The current page, or a new one when less than ``height`` (figure fraction) is left on it."""
        if self.fig is not None and self.y - height >= _BOTTOM:
            return self.fig
        self.flush()
        self.fig = fig = plt.figure(figsize=PAGE_IN)
        fig.text(_LEFT, 0.965, self.title, fontsize=12, weight="bold", va="center")
        fig.text(_LEFT, 0.935, self.byline, fontsize=7, va="center")
        self.y = _TOP - 0.03
        return fig

    def flush(self) -> None:
        if self.fig is not None:
            self.pdf.savefig(self.fig)
            plt.close(self.fig)
            self.fig = None

    def text(self, line: str, size: float = 9) -> None:
        self._page(0.04).text(_LEFT, self.y - 0.02, line, fontsize=size, va="center")
        self.y -= 0.04

    def table(self, t: Table) -> None:
        rows = t.rows or [["(none)"] + [""] * (len(t.header) - 1)]
        start = 0
        while start < len(rows):
            fig = self._page(0.04 + 3 * _ROW)
            fit = max(1, int((self.y - 0.035 - _BOTTOM - (0.02 if t.note else 0)) / _ROW) - 1)
            chunk = rows[start:start + fit]
            fig.text(_LEFT, self.y - 0.012, t.title + (" (continued)" if start else ""), fontsize=9,
                     weight="bold", va="center")
            h = _ROW * (len(chunk) + 1)
            ax = fig.add_axes((_LEFT, self.y - 0.03 - h, _WIDTH, h))
            ax.axis("off")
            widths = [max(len(str(r[i])) for r in [t.header, *rows]) + 2 for i in range(len(t.header))]
            table = ax.table(cellText=chunk, colLabels=t.header, cellLoc="left", bbox=Bbox.from_bounds(0, 0, 1, 1),
                             colWidths=[w / sum(widths) for w in widths])
            table.auto_set_font_size(False)
            # a character of DejaVu Sans is ~0.6 em wide, plus the cells' padding: shrink wide tables to fit
            table.set_fontsize(min(_FONT, 0.8 * _WIDTH * PAGE_IN[0] * 72 / (0.6 * sum(widths))))
            for (r, _), cell in table.get_celld().items():
                if r == 0:
                    cell.set_facecolor("#eeeeee")
            self.y -= 0.03 + h
            start += len(chunk)
            if t.note and start >= len(rows):
                fig.text(_LEFT, self.y - 0.012, t.note, fontsize=6, color="#555555", va="center")
                self.y -= 0.02
            self.y -= 0.015


def _figure_page(pdf: PdfPages, title: str, fig: Figure) -> None:
    if not fig.get_suptitle():
        fig.suptitle(title, fontsize=10, weight="bold")
    pdf.savefig(fig)


def _images_page(pdf: PdfPages, title: str, figures: Sequence[tuple[str, Figure]]) -> None:
    """The worst cases' overview figures side by side on one page (as raster images, like the HTML)."""
    page = plt.figure(figsize=PAGE_IN)
    page.text(_LEFT, 0.965, title, fontsize=12, weight="bold", va="center")
    n = max(len(figures), 1)
    for i, (_, fig) in enumerate(figures):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        buf.seek(0)
        ax = page.add_axes((_LEFT + i * _WIDTH / n, 0.1, _WIDTH / n, 0.8))
        ax.imshow(mpimg.imread(buf))
        ax.axis("off")
    pdf.savefig(page)
    plt.close(page)


def write_pdf(content: ReportContent, path: Path, title: str, signature: str) -> Path:
    with matplotlib.rc_context({"pdf.fonttype": 42}), PdfPages(path) as pdf:
        pages = _Pages(pdf, title, content.byline())
        for t in content.first:  # page 1: models, data set, summary
            pages.table(t)
        pages.flush()
        for t in content.tables:
            pages.table(t)
        if content.worst is not None:
            pages.table(content.worst)
        pages.text(signature)
        pages.flush()
        for fig_title, fig in content.figures:
            _figure_page(pdf, fig_title, fig)
        if content.overviews:
            _images_page(pdf, "Worst cases: truth green, prediction red", content.overviews)
        info = pdf.infodict()
        info["Title"] = title
    return path
