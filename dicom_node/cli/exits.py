"""Exit codes shared by every ``dicom-node`` subcommand, and the one way to fail with a message."""

from __future__ import annotations

import typer

EXIT_FAILED = 1  # the work failed (bad input data, missing model, ...)
EXIT_USAGE = 2  # bad usage, invalid config or rules file


def fail(message: str, code: int = EXIT_FAILED) -> typer.Exit:
    """Print ``error: message`` on stderr and return the ``typer.Exit`` to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)
