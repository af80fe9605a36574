"""How figures are written in the tables of the model card and the validation report: fixed digits, "n/a" for
an undefined value (NaN, inf), "mean +/- SD" over patients."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["fixed", "mean_sd"]


def fixed(v: float, digits: int = 3) -> str:
    """``v`` with ``digits`` decimals; "n/a" when it is not finite."""
    return f"{v:.{digits}f}" if math.isfinite(v) else "n/a"


def mean_sd(s: dict[str, Any], name: str, digits: int = 3) -> str:
    """``s[name]``'s "mean +/- SD" (a summary's ``{"mean", "sd"}``); the mean alone when the SD is undefined
    (one patient), "n/a" when the mean is."""
    mean, sd = s[name]["mean"], s[name]["sd"]
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} +/- {sd:.{digits}f}" if math.isfinite(sd) else f"{mean:.{digits}f}"
