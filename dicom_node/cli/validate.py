"""``dicom-node validate DATA --model M``: the method's evaluation on a site's own cases, as a signed-off report.

Exit codes: 0 done, 1 the run failed (unreadable case, inference error, cannot write the outputs), 2 bad
arguments, an unreadable model, or no case to evaluate.
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from dicom_node.cli.exits import EXIT_USAGE, fail

_KINDS = ("nifti", "dicom", "brainmetshare")


def _load_model(path: Path, what: str):  # -> (ILDDeepLabV3, CheckpointMeta); torch imported lazily (slow)
    from pipeline.checkpoint import CheckpointError, load_checkpoint

    try:
        return load_checkpoint(path)
    except (CheckpointError, OSError) as exc:
        raise fail(f"{what} {path}: {exc}", EXIT_USAGE) from None


def _parse_roles(text: str) -> tuple[str, ...]:
    from pipeline.roles import ROLES

    roles = tuple(r.strip() for r in text.split(",") if r.strip())
    unknown = [r for r in roles if r not in ROLES]
    if not roles or unknown or len(set(roles)) != len(roles):
        raise fail(f"--roles: give distinct roles separated by commas, from {', '.join(ROLES)}; got {text!r}",
                   EXIT_USAGE)
    return roles


def _parse_threshold(text: str) -> float | None:
    """``--threshold``: a number in (0, 1), or None for "youden" (read from each checkpoint); exit 2 otherwise."""
    if text == "youden":
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value < 1.0:
        raise fail(f"--threshold must be a number in (0, 1) or youden, got {text}", EXIT_USAGE)
    return value


def _cases(data: Path, kind: str, cache: Path, grid, progress: bool) -> list:  # -> list[CachedCase]
    """Every case under ``data``, pre-processed onto the models' grid (cached under ``cache``); exit 2 if none."""
    from dicom_node.cli.train import _assign_roles
    from training.config import DataSection, SourceEntry, TrainConfig
    from training.data.case import CaseError
    from training.trainer import load_cases

    source = SourceEntry.model_validate({"kind": kind, "path": data.resolve()})  # kind: one of _KINDS, checked
    cfg = TrainConfig(data=DataSection(sources=[source], cache=cache.resolve()))
    try:
        return list(load_cases(cfg, _assign_roles(cfg), progress=progress, grid=grid).values())
    except CaseError as exc:
        if ("no " in str(exc) and "case found" in str(exc)) or "not a folder" in str(exc):
            raise fail(str(exc), EXIT_USAGE) from None
        raise fail(str(exc)) from None


def validate(
    data: Path = typer.Argument(..., exists=True, file_okay=False,
                                help="Folder of cases (see --kind for the layouts), each with its ground truth."),
    model: Path = typer.Option(..., "--model", "-m", exists=True, dir_okay=False, help="Checkpoint to validate."),
    baseline: Path = typer.Option(None, "--baseline", exists=True, dir_okay=False,
                                  help="A second checkpoint evaluated on the same cases and compared per patient."),
    kind: str = typer.Option("nifti", "--kind", help="Layout of DATA (and of --calibrate-on): nifti "
                             "(<case>/nifti/<role>.nii.gz + truth/label.nii.gz), dicom (DICOM study + truth as SEG "
                             "or NIfTI; roles from the node's series rules) or brainmetshare."),
    roles: str = typer.Option(None, "--roles", help="Force this role subset for every case, e.g. "
                              "t1_cube_pre,t1_cube_post,flair (default: the roles each case has)."),
    all_combinations: bool = typer.Option(False, "--all-combinations",
                                          help="Every role combination the model takes (15; one for a baseline)."),
    calibrate_on: Path = typer.Option(None, "--calibrate-on", exists=True, file_okay=False,
                                      help="Choose each model's threshold on these cases (maximum Youden index of "
                                           "the pooled voxel ROC in the brain masks) instead of the checkpoint's."),
    threshold: str = typer.Option(None, "--threshold", help="Use this operating threshold for every model instead "
                                  "of the checkpoint's: a number 0 < T < 1, or youden (each checkpoint's stored "
                                  "validation Youden point, the method's rule)."),
    out: Path = typer.Option(Path("validation"), "--out", "-o", file_okay=False,
                             help="Output folder: report.html, report.pdf, metrics.json, cases.csv."),
    cache: Path = typer.Option(None, "--cache", file_okay=False, show_default="<out>/cache",
                               help="Pre-processed cases and cached predictions (a rerun does no inference)."),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples over patients for the ROC "
                                  "bands (0: no band)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N (inference)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars."),
) -> None:
    """Evaluate a model (and optionally a baseline) on a folder of cases with ground truth: every metric of the
    method (voxel AUC, sensitivity/specificity, Dice, IoU, precision, recall, FPR, lesion sensitivity overall and
    by size, FP/patient, lesion-count subgroups), ROC with bootstrap bands, FROC, per-patient model comparison
    (Wilcoxon rank-sum and signed-rank), and a report to sign (HTML + PDF) with metrics.json and cases.csv."""
    if kind not in _KINDS:
        raise fail(f"--kind: expected one of {', '.join(_KINDS)}, got {kind!r}", EXIT_USAGE)
    if roles is not None and all_combinations:
        raise fail("give at most one of --roles and --all-combinations", EXIT_USAGE)
    if threshold is not None and calibrate_on is not None:
        raise fail("give at most one of --threshold and --calibrate-on", EXIT_USAGE)
    fixed_threshold = _parse_threshold(threshold) if threshold is not None else None
    if bootstrap < 0:
        raise fail(f"--bootstrap must be >= 0, got {bootstrap}", EXIT_USAGE)
    forced = _parse_roles(roles) if roles is not None else ()
    progress = not no_progress
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("fontTools").setLevel(logging.WARNING)  # the PDF's font subsetting logs every table

    loaded = [("model", model, *_load_model(model, "model"))]
    if baseline is not None:
        loaded.append(("baseline", baseline, *_load_model(baseline, "baseline")))
    grids = {(m.in_plane_size, m.through_plane_mm, net.config.slices_per_role) for _, _, net, m in loaded}
    if len(grids) != 1:
        raise fail(f"the models were trained on different grids {sorted(grids)}: they cannot share cases",
                   EXIT_USAGE)

    from pipeline.checkpoint import select_threshold
    from pipeline.inference import resolve_device
    from training.calibrate import pooled_threshold
    from training.data.cache import GridSettings
    from training.validate.figures import case_figure
    from training.validate.predictions import PredictionCache, file_sha256
    from training.validate.report import write_outputs
    from training.validate.run import ModelRun, describe_dataset
    from training.validate.run import validate as run_validation

    grid = GridSettings(*grids.pop())
    cache_root = (cache or out / "cache").resolve()
    try:
        dev = resolve_device(device)
    except (ValueError, RuntimeError) as exc:
        raise fail(f"--device: {exc}", EXIT_USAGE) from None
    cases = _cases(data, kind, cache_root / "cases", grid, progress)
    val_cases = _cases(calibrate_on, kind, cache_root / "cases", grid, progress) if calibrate_on else []
    try:
        runs = []
        for label, path, net, meta in loaded:
            if calibrate_on is not None:
                t = pooled_threshold(net, val_cases, device=dev, progress=progress)[0]
                source = f"calibrated on {calibrate_on.name} ({len(val_cases)} cases, youden)"
            elif fixed_threshold is not None:
                t, source = fixed_threshold, "--threshold"
            elif threshold == "youden":
                try:
                    t, source = select_threshold(meta, "youden").threshold, "checkpoint's Youden point (youden)"
                except ValueError as exc:
                    raise fail(f"--threshold youden: {path}: {exc}", EXIT_USAGE) from None
            else:
                t, source = meta.threshold, f"checkpoint ({meta.threshold_rule})"
            runs.append(ModelRun(label, path, net, meta, float(t), source,
                                 PredictionCache(cache_root / "predictions", file_sha256(path))))
        mode = "all" if all_combinations else "roles" if forced else "as-acquired"
        result = run_validation(runs, cases, mode=mode, roles=forced,
                                dataset=describe_dataset(cases, data.resolve().name, kind),
                                bootstrap=bootstrap, seed=seed, device=dev, progress=progress)
        empty = [r.meta.model_name for r in runs if not result.doc["models"][r.label]["combinations"]]
        if empty:
            raise fail(f"no case can be evaluated by {', '.join(empty)} with these roles "
                       f"(see the skipped cases in {out / 'metrics.json'})", EXIT_USAGE)
        by_id = {c.case_id: c for c in cases}
        overviews = []
        for w in result.doc["worst_cases"]:
            case = by_id[w["case_id"]]
            prob = runs[0].cache.load(case, w["roles"])
            overviews.append((case.case_id, case_figure(case, prob, runs[0].threshold,
                                                        f"{case.case_id}: Dice {w['dice']:.3f}, FP {w['fp']}")))
        paths = write_outputs(result.doc, result.evaluations, out, overviews)
    except typer.Exit:
        raise
    except (ValueError, RuntimeError, OSError) as exc:
        raise fail(str(exc)) from None
    for run in runs:
        m = result.doc["models"][run.label]
        for key, c in m["combinations"].items():
            s = c["summary"]
            typer.echo(f"{m['name']} [{key}] threshold {run.threshold:.4g}: {s['n_patients']} case(s), "
                       f"Dice {s['dice']['mean']:.3f}, lesion sensitivity {s['pooled_lesion_sensitivity']:.3f}, "
                       f"FP/patient {s['fp_per_patient']:.1f}")
        typer.echo(f"{m['name']}: {run.cache.n_inferred} prediction(s) computed, the rest from {run.cache.folder}")
    for name, p in paths.items():
        typer.echo(f"{name + ':':9s}{p}")
