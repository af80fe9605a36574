"""The ``dicom-node`` command line: one entry point, one module per subcommand group.

Exit codes (all subcommands): 0 success, 1 the work failed, 2 bad usage or bad configuration,
3 the feature is not built yet.
"""

from __future__ import annotations

from pathlib import Path

import typer

from dicom_node import __version__
from dicom_node.cli.exits import EXIT_NOT_BUILT, EXIT_USAGE, fail
from dicom_node.cli.phantom import phantom
from dicom_node.cli.rules import app as rules_app
from dicom_node.cli.segment import segment
from dicom_node.cli.train import calibrate, model_card, train
from dicom_node.config import ConfigError, NodeConfig, check_ports_free, load_config, to_yaml
from dicom_node.paths import DEFAULT_CONFIG

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
app.command("segment", help="Segment brain metastases in one study folder: seg.dcm, sr.dcm, summary.json, overview.png.")(segment)

ConfigOption = typer.Option(
    DEFAULT_CONFIG,
    "--config",
    "-c",
    help="YAML config file (defaults: config/node.yaml; relative paths inside it are resolved against its folder).",
    show_default="config/node.yaml",
)


def _load_or_exit(path: Path) -> NodeConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        raise fail(str(exc), EXIT_USAGE) from None


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
    """Validate a config file; exit 0 if it is valid, 2 with one line naming the key if not."""
    _load_or_exit(config)
    typer.echo(f"{config}: OK")


@config_app.command("show")
def config_show(config: Path = ConfigOption) -> None:
    """Print the resolved configuration (defaults filled in, paths made absolute) as YAML."""
    typer.echo(to_yaml(_load_or_exit(config)), nl=False)


@app.command()
def serve(config: Path = ConfigOption) -> None:
    """Run the node: receive studies over DICOM, process them, send results back (until SIGTERM)."""
    resolved = _load_or_exit(config)
    try:
        check_ports_free(resolved, config)
    except ConfigError as exc:
        raise fail(str(exc), EXIT_USAGE) from None
    typer.echo("# resolved configuration")
    typer.echo(to_yaml(resolved), nl=False)
    typer.echo(
        "dicom-node serve: the DICOM listener, queue and dispatcher are not built yet (issue #5); "
        "the configuration above is valid and its ports are free, but nothing is listening.",
        err=True,
    )
    raise typer.Exit(EXIT_NOT_BUILT)


def main() -> None:
    """Console-script entry point."""
    app()
