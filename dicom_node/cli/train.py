"""``dicom-node train --config FILE`` and ``dicom-node calibrate``: the training package behind the CLI.

Exit codes: 0 done, 1 training/calibration failed (bad data, no usable case, invalid model), 2 bad usage or an
invalid training config (one line naming the key).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import typer

from dicom_node.cli.exits import EXIT_USAGE, fail


def _load_train_config(path: Path):  # -> training.config.TrainConfig (imported lazily: torch is slow to load)
    from dicom_node.yaml_files import YamlFileError, load_yaml_model
    from training.config import TrainConfig

    try:
        cfg = load_yaml_model(path, TrainConfig, what="training config", reference="config/train.yaml",
                              error=YamlFileError)
    except YamlFileError as exc:
        raise fail(str(exc), EXIT_USAGE) from None
    return cfg.resolve_paths(path.resolve().parent)


def _assign_roles(cfg):  # -> RulesRoleAssigner | None
    """Role assignment for DICOM training cases: the node's own series rules (only built when needed)."""
    if not any(src.kind == "dicom" for src in cfg.data.sources):
        return None
    from dicom_node.cli.roles_for_training import RulesRoleAssigner
    from dicom_node.rules import RulesError

    try:
        return RulesRoleAssigner.from_file()
    except RulesError as exc:
        raise fail(str(exc), EXIT_USAGE) from None


def train(
    config: Path = typer.Option(..., "--config", "-c", exists=True, dir_okay=False,
                                help="Training YAML (data, model, recipe, output); every key and default is in "
                                     "config/train.yaml."),
    resume: bool = typer.Option(False, "--resume", help="Continue from <output.dir>/last.pt and its splits.json."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars (logs only)."),
) -> None:
    """Train a model (ILD or baseline) with the method's recipe, then calibrate its threshold on the validation
    split and write the checkpoint. Run under `torchrun --nproc_per_node N` for several GPUs / nodes."""
    cfg = _load_train_config(config)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from training.data.case import CaseError
    from training.trainer import train as run_training

    try:
        result = run_training(cfg, resume=resume, progress=not no_progress, assign_roles=_assign_roles(cfg))
    except (CaseError, ValueError, FileNotFoundError) as exc:
        raise fail(str(exc)) from None
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun only rank 0 reports
    typer.echo(f"checkpoint: {result.checkpoint}\nmetrics:    {result.metrics_csv}\nsplits:     "
               f"{result.splits_json}\n{result.epochs_run} epoch(s) in {result.seconds:.0f} s on {result.device}")


def calibrate(
    model: Path = typer.Argument(..., exists=True, dir_okay=False, help="Checkpoint to calibrate (.safetensors)."),
    out: Path = typer.Option(..., "--out", "-o", dir_okay=False,
                             help="Calibrated checkpoint to write (may equal MODEL to replace it)."),
    config: Path = typer.Option(None, "--config", "-c", exists=True, dir_okay=False,
                                help="Training YAML: calibrate on its validation split (<output.dir>/splits.json)."),
    data: Path = typer.Option(None, "--data", exists=True, file_okay=False,
                              help="Or: a folder of cases, ALL used for calibration (e.g. a site's own)."),
    kind: str = typer.Option("nifti", "--kind", help="Layout of --data: nifti, dicom or brainmetshare."),
    cache: Path = typer.Option(None, "--cache", file_okay=False, show_default="<out folder>/cache",
                               help="Where --data cases are pre-processed and kept."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    rule: str = typer.Option("lesion-froc", "--rule", help="lesion-froc (highest lesion sensitivity with <= 0.5 false "
                             "positives >= 10 mm3 per patient, ties to the best mean Dice), youden (maximum Youden "
                             "index of the voxel ROC, the method; stored beside whatever the rule) or max-dice "
                             "(maximum pooled voxel Dice)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars."),
) -> None:
    """Choose a model's threshold on validation cases (--rule; the Youden point is stored beside it) and store it,
    with AUC / Dice / lesion sensitivity for every role combination, in a new checkpoint."""
    from pipeline.checkpoint import THRESHOLD_RULES

    if rule not in THRESHOLD_RULES:
        raise fail(f"--rule: expected one of {', '.join(THRESHOLD_RULES)}, got {rule!r}", EXIT_USAGE)
    if (config is None) == (data is None):
        raise fail("give exactly one of --config (its validation split) or --data (a folder of cases)", EXIT_USAGE)
    from pipeline.checkpoint import CheckpointError, load_checkpoint
    from pipeline.inference import resolve_device
    from training.calibrate import calibrate_and_save
    from training.config import DataSection, ModelSection, SourceEntry, TrainConfig
    from training.data.cache import GridSettings
    from training.data.case import CaseError
    from training.splits import read_splits
    from training.trainer import describe_sources, load_cases

    try:
        net, meta = load_checkpoint(model)
    except CheckpointError as exc:
        raise fail(f"invalid model: {exc}") from None
    try:
        if config is not None:
            cfg = _load_train_config(config)
            if (cfg.model.in_plane_size, cfg.model.through_plane_mm) != (meta.in_plane_size, meta.through_plane_mm):
                raise fail(f"the model was trained on a {meta.in_plane_size} px / {meta.through_plane_mm} mm grid, "
                           f"{config} prepares {cfg.model.in_plane_size} px / {cfg.model.through_plane_mm} mm",
                           EXIT_USAGE)
            cases = load_cases(cfg, _assign_roles(cfg), progress=not no_progress,
                               grid=GridSettings(meta.in_plane_size, meta.through_plane_mm, net.config.slices_per_role))
            splits_file = cfg.output.dir / "splits.json"
            if not splits_file.is_file():
                raise fail(f"{splits_file} not found: train with this config first, or use --data", EXIT_USAGE)
            chosen = [cases[c] for c in read_splits(splits_file)["validation"]]
            description = describe_sources(cfg)
        else:
            if kind not in ("nifti", "dicom", "brainmetshare"):
                raise fail(f"--kind: expected nifti, dicom or brainmetshare, got {kind!r}", EXIT_USAGE)
            cfg = TrainConfig(data=DataSection(sources=[SourceEntry(kind=kind, path=data.resolve())],
                                               cache=(cache or out.resolve().parent / "cache").resolve()),
                              model=ModelSection(in_plane_size=meta.in_plane_size,
                                                 through_plane_mm=meta.through_plane_mm))
            chosen = list(load_cases(cfg, _assign_roles(cfg), progress=not no_progress,
                                     grid=GridSettings(meta.in_plane_size, meta.through_plane_mm,
                                                       net.config.slices_per_role)).values())
            description = meta.training_data
        cal_meta = calibrate_and_save(net, chosen, out, name=meta.model_name, version=meta.model_version,
                                      training_data=description, run_uid=meta.training_run_uid,
                                      grid=GridSettings(meta.in_plane_size, meta.through_plane_mm,
                                                        net.config.slices_per_role),
                                      report_path=out.with_suffix(".calibration.json"),
                                      device=resolve_device(device), progress=not no_progress, rule=rule)
    except (CaseError, ValueError) as exc:
        raise fail(str(exc)) from None
    typer.echo(f"threshold {cal_meta.threshold:.4g} ({rule}; was {meta.threshold:.4g}, {meta.threshold_rule}), "
               f"Youden point {cal_meta.youden_threshold:.4g}, on {len(chosen)} case(s)")
    for key, m in cal_meta.validation.items():
        typer.echo(f"  {key:45s} " + "  ".join(f"{k} {v:.3f}" for k, v in m.items()))
    typer.echo(f"wrote {out}")


def model_card(
    config: Path = typer.Option(..., "--config", "-c", exists=True, dir_okay=False,
                                help="The model's training YAML: its test split (<output.dir>/splits.json) is used."),
    model: Path = typer.Option(..., "--model", "-m", exists=True, dir_okay=False, help="The ILD checkpoint."),
    baseline: Path = typer.Option(None, "--baseline", exists=True, dir_okay=False,
                                  help="A baseline checkpoint reported beside it (same test cases)."),
    baseline_config: Path = typer.Option(None, "--baseline-config", exists=True, dir_okay=False,
                                         help="The baseline's training YAML (its metrics.csv joins the curves)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output stem: writes OUT.json, OUT.md, OUT-training.png."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars."),
) -> None:
    """Evaluate a model (and a baseline) on the held-out test split, every role combination, and write the
    figures of its model card (the method spec's table layout) as JSON and Markdown."""
    cfg = _load_train_config(config)
    from pipeline.checkpoint import CheckpointError
    from training.data.case import CaseError
    from training.model_card import write_model_card_figures

    try:
        text = write_model_card_figures(cfg, model, baseline, out, progress=not no_progress,
                                        baseline_cfg=_load_train_config(baseline_config) if baseline_config else None)
    except (CaseError, CheckpointError, ValueError, FileNotFoundError) as exc:
        raise fail(str(exc)) from None
    typer.echo(text)
