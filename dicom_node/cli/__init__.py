"""The ``dicom-node`` command line: one entry point, one module per subcommand group.

Exit codes (all subcommands): 0 success, 1 the work failed, 2 bad usage or bad configuration.
"""

from __future__ import annotations

from pathlib import Path

import typer

from dicom_node import __version__
from dicom_node.cli.demo import HELP as DEMO_HELP
from dicom_node.cli.demo import demo
from dicom_node.cli.exits import EXIT_USAGE, fail
from dicom_node.cli.network import echo, send
from dicom_node.cli.node import (
    ConfigOption,
    load_or_exit,
    purge,
    reprocess,
    resend,
    serve,
    status,
)
from dicom_node.cli.phantom import phantom
from dicom_node.cli.rules import app as rules_app
from dicom_node.cli.segment import segment
from dicom_node.cli.train import calibrate, model_card, train
from dicom_node.cli.validate import validate
from dicom_node.config import ConfigError, check_files, to_yaml

app = typer.Typer(
    name="dicom-node",
    help="DICOM node that finds brain metastases on MR studies routed to it by a PACS "
    "and sends back a DICOM SEG and a TID 1500 SR. Research use only.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Check or show the node's configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(rules_app, name="rules")
app.command(
    "phantom",
    help="Generate synthetic multi-sequence MR brain-metastasis studies (DICOM or NIfTI) with ground truth.",
)(phantom)
app.command("train", help="Train a model (ILD or baseline) with the method's recipe and calibrate it.")(train)
app.command("calibrate", help="Choose a model's threshold on validation cases; store per-combination figures.")(calibrate)
app.command("model-card", help="Test-set figures of a model (and a baseline) for its model card.")(model_card)
app.command("validate", help="Validation report on a site's own cases: every metric of the method, ROC/FROC, "
            "model comparison; HTML + PDF + metrics.json + cases.csv.")(validate)
app.command("serve", help="Run the node: receive studies over DICOM, process them, send SEG + SR back "
            "(until SIGTERM).")(serve)
app.command("status", help="Show the queue and recent studies: state, roles, lesion counts, deliveries, errors.")(status)
app.command("reprocess", help="Queue a new version of a study's case (roles assigned again).")(reprocess)
app.command("resend", help="Send a study's latest SEG and SR again to every destination.")(resend)
app.command("purge", help="Retention: delete studies (files, results, index) older than N days.")(purge)
app.command("echo", short_help="Test a DICOM destination with a C-ECHO (is it up, does it accept our AE title).")(echo)
app.command("send", short_help="Send DICOM files to a peer with C-STORE, as stored (tests, the demo, a PACS by hand).")(send)
app.command("segment", help="Segment brain metastases in one study folder: seg.dcm, sr.dcm, summary.json, overview.png.")(segment)
app.command("demo", help=DEMO_HELP,
            short_help="End-to-end demo: two synthetic studies through the node on its defaults (make demo).")(demo)



def _version(value: bool) -> None:
    if value:
        typer.echo(f"dicom-node {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """DICOM node for brain-metastasis segmentation (research use only)."""


@config_app.command("check")
def config_check(config: Path = ConfigOption) -> None:
    """Validate a config file and the files it names (model, series rules) as `serve` does at start-up; exit 0
    if it is valid, 2 with one line naming the key if not."""
    try:
        check_files(load_or_exit(config), config)
    except ConfigError as exc:
        raise fail(str(exc), EXIT_USAGE) from None
    typer.echo(f"{config}: OK")


@config_app.command("show")
def config_show(config: Path = ConfigOption) -> None:
    """Print the resolved configuration (defaults filled in, paths made absolute) as YAML."""
    typer.echo(to_yaml(load_or_exit(config)), nl=False)


def main() -> None:
    """Console-script entry point."""
    app()
