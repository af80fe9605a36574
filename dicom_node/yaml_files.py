"""Admin-edited YAML files validated by a pydantic model, with errors a person can act on.

Shared by the node config (``config.py``) and the series rules (``rules.py``): every problem with
such a file becomes ONE line, ``FILE: KEY: expected ..., got ...``, so a start-up failure says what
to fix without a traceback.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class YamlFileError(ValueError):
    """A YAML file that cannot be read or does not fit its schema; the message is one line."""


def load_yaml_model(path: Path, model: type[M], *, what: str, reference: str, error: type[YamlFileError]) -> M:
    """Read ``path`` and validate it as ``model``.

    ``what`` names the file in messages ("config file"), ``reference`` is where the valid keys are
    documented ("config/node.yaml"); problems raise ``error`` (a ``YamlFileError`` subclass).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except OSError as exc:
        raise error(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"{where}: not valid YAML ({problem})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise error(f"{path}: (top level): expected a mapping of keys, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise error(f"{path}: {describe_error(errors[0], reference)}{more}") from None


def describe_error(err: Mapping[str, Any], reference: str) -> str:
    """One pydantic error as ``key: expected X, got Y``."""
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{key}: unknown key (check its spelling against {reference})"
    if err["type"] == "missing":
        return f"{key}: required key is missing"
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else f", got {got!r}"
    if err["type"] == "value_error":
        # Our own validators word their messages whole ("expected ...", "unknown family ...").
        return f"{key}: {err['msg'].removeprefix('Value error, ')}{shown}"
    # pydantic's built-in checks say "Input should be X": X is the expectation.
    return f"{key}: expected {err['msg'].removeprefix('Input should be ')}{shown}"
