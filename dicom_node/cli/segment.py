"""``dicom-node segment DICOM_DIR --out DIR``: the whole pipeline on one study in a folder.

Classifies the series under DICOM_DIR with the series rules, runs :func:`pipeline.study.run_study` and writes
``seg.dcm`` (only when there are lesions), ``sr.dcm``, ``summary.json`` and ``overview.png`` to ``--out``
(``docs/segment.md``); with ``--secondary-capture`` (or ``outputs.secondary_capture`` in the config) also the
Secondary Capture key images ``sc-0001.dcm``... Messages name UIDs, never patient data or file paths below DICOM_DIR.
Exit codes: 0 done, 1 the study could not be processed (no usable series, several studies or patients, missing
or invalid model, unreadable series), 2 bad usage or an invalid config/rules file.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from dicom_node.cli.exits import EXIT_USAGE, fail
from pipeline.outputs import SC_PATTERN

if TYPE_CHECKING:
    from dicom_node.rules import RuleSet


class StudyFolderError(ValueError):
    """A folder that does not hold exactly one study with a usable series; one line naming UIDs only."""


def study_role_files(folder: Path, rules: RuleSet, name: str) -> tuple[str, dict[str, list[Path]]]:
    """Classify the series under ``folder`` (recursive) with ``rules``, as ``segment`` does: the StudyInstanceUID
    and role -> the files of the series chosen for it. ``name`` is how messages call the folder.

    Raises :class:`StudyFolderError` when there is no DICOM file, several studies or no series for any role."""
    from dicom_node.headers import scan_directory
    from dicom_node.rules import assign_studies

    series = scan_directory(folder)
    if not series:
        raise StudyFolderError(f"no DICOM files found under {name}")
    studies = assign_studies(series, rules)
    if len(studies) > 1:
        uids = ", ".join(s.study_instance_uid for s in studies)
        raise StudyFolderError(f"{name} holds {len(studies)} studies ({uids}); give one study per folder")
    study = studies[0]
    if not study.chosen:
        raise StudyFolderError(f"study {study.study_instance_uid}: no usable series (no series matched a role "
                               f"of the rules; see `dicom-node rules test {name}`)")
    sources = {f.series_instance_uid: f.source for f in series}
    files = {role: [Path(p) for p in sources[c.series_instance_uid]] for role, c in study.chosen.items()}
    return study.study_instance_uid, files


def segment(
    dicom_dir: Path = typer.Argument(..., metavar="DICOM_DIR", exists=True, file_okay=False, dir_okay=True, readable=True,
                                     help="Folder with the DICOM files of ONE study (searched recursively)."),
    out: Path = typer.Option(..., "--out", "-o", file_okay=False, help="Output folder (created if missing)."),
    model_path: Path = typer.Option(None, "--model", "-m", show_default=False,
                                    help="Model checkpoint (.safetensors). Default: model.path of the config."),
    rules_file: Path = typer.Option(None, "--rules", "-r", show_default=False,
                                    help="Series rules YAML. Default: the rules file of the config."),
    config: Path = typer.Option(None, "--config", "-c", show_default="config/node.yaml",
                                help="Node config (for the default model, device and rules)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Slices per inference batch."),
    threads: int = typer.Option(None, "--threads", min=1, show_default="all CPU cores",
                                help="CPU threads for inference."),
    secondary_capture: bool | None = typer.Option(
        None, "--secondary-capture/--no-secondary-capture", show_default="outputs.secondary_capture of the config",
        help="Also write sc-0001.dcm...: Secondary Capture key images with the lesion outlines burned in, for "
             "viewers without SEG support."),
) -> None:
    """Segment brain metastases in one study: writes seg.dcm (only if lesions), sr.dcm, summary.json, overview.png."""
    from dicom_node import __version__
    from dicom_node.config import ConfigError, load_config
    from dicom_node.paths import DEFAULT_CONFIG
    from dicom_node.rules import RulesError, load_rules

    try:
        cfg = load_config(config if config is not None else DEFAULT_CONFIG)
    except ConfigError as exc:
        raise fail(str(exc), EXIT_USAGE) from None
    try:
        rules = load_rules(rules_file if rules_file is not None else cfg.rules)
    except RulesError as exc:
        raise fail(str(exc), EXIT_USAGE) from None
    model_file = model_path if model_path is not None else cfg.model.path
    if not model_file.is_file():
        default = " (model.path of the config; the bundled models/ild-demo.safetensors is rebuilt by `make model`)" \
            if model_path is None else ""
        raise fail(f"model file {model_file} does not exist{default}; pass --model PATH")

    try:
        study_uid, files = study_role_files(dicom_dir, rules, "DICOM_DIR")
    except StudyFolderError as exc:
        raise fail(str(exc)) from None

    from tqdm import tqdm

    from pipeline.checkpoint import CheckpointError, load_checkpoint, select_threshold
    from pipeline.io import SeriesLoadError
    from pipeline.outputs import write_outputs
    from pipeline.study import StudyError, StudySettings, run_study

    try:
        model, meta = load_checkpoint(model_file)
        meta = select_threshold(meta, cfg.model.threshold)
    except CheckpointError as exc:
        raise fail(f"invalid model: {exc}") from None
    except ValueError as exc:
        raise fail(f"model.{exc}") from None
    settings = StudySettings(batch_size=batch_size, device=cfg.model.device, threads=threads,
                             software_version=__version__,
                             secondary_capture=cfg.outputs.secondary_capture if secondary_capture is None
                             else secondary_capture)
    bar: list[tqdm] = []

    def progress(done: int, total: int) -> None:
        if not bar:
            bar.append(tqdm(total=total, desc="inference", unit="batch", file=sys.stderr, leave=False))
        bar[0].update(1)

    try:
        result = run_study(files, model, meta, settings=settings, progress=progress)
    except (StudyError, SeriesLoadError) as exc:
        raise fail(f"study {study_uid}: {exc}") from None
    finally:
        if bar:
            bar[0].close()
    written = write_outputs(result, out)
    res = result.lesions
    for w in result.warnings:
        typer.echo(f"warning: {w}", err=True)
    typer.echo(f"study {result.study_instance_uid}: {res.count_all} lesion(s), {res.count_ge_10mm3} >= 10 mm3, "
               f"total {res.total_volume_mm3:.0f} mm3 (threshold {res.threshold:g}; roles "
               f"{', '.join(result.inference.roles_used)}; reference {result.reference_role}); "
               f"wrote {', '.join(_file_names(written.values()))} to {out} in {result.timings_s['total']:.1f} s")


def _file_names(paths: Iterable[Path]) -> list[str]:
    """The names of ``paths``, the Secondary Capture files as one range (``sc-0001..0040.dcm (40)``)."""
    names = [p.name for p in paths]
    sc = [n for n in names if fnmatch(n, SC_PATTERN)]
    if len(sc) < 2:
        return names
    first = names.index(sc[0])
    rest = [n for n in names if n not in sc]
    return [*rest[:first], f"{sc[0].removesuffix('.dcm')}..{sc[-1].removeprefix('sc-')} ({len(sc)})", *rest[first:]]
