"""The training loop: the ILD recipe (or the baseline's), one process or many through ``torchrun``.

* Data: every source is cached once (:mod:`training.data.cache`), split by patient (:mod:`training.splits`),
  and batches are drawn by :mod:`training.batches` (half lesion slices, flips, 90-degree rotations).
* Optimisation: Adam (betas 0.9/0.999, lr 1e-3, L2 weight decay 1e-5), weighted BCE (:mod:`training.loss`),
  ``batch_size`` samples per optimiser step split over processes and ``accumulation`` micro-batches.
* Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel (NCCL on
  GPUs, Gloo on CPUs); each rank draws its own batches from its own seeded stream; rank 0 alone writes.
* Mixed precision (float16 autocast + gradient scaling) on CUDA when ``recipe.amp``.
* Every epoch: a row in ``<output.dir>/metrics.csv`` (training loss, validation loss and Dice at 0.5 on a fixed
  sample of validation slices, learning rate, seconds, samples/s) and the resume state ``last.pt`` (weights,
  optimiser, scaler, random streams, epoch) written atomically; ``resume=True`` continues from it.
* At the end rank 0 calibrates on the validation cases (:mod:`training.calibrate`) and writes the checkpoint.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pydicom.uid import generate_uid
from tqdm import tqdm

from pipeline.model import ARCHITECTURES, ILDDeepLabV3, build_model
from training.batches import SliceSampler, build_batch
from training.config import TrainConfig
from training.cpu_safety import safe_cpu_autograd
from training.data.cache import CachedCase, GridSettings, cache_case
from training.data.dicom import RoleAssigner
from training.data.sources import find_sources
from training.loss import segmentation_loss
from training.splits import make_splits, read_splits, write_splits

__all__ = ["DistEnv", "TrainResult", "describe_sources", "grid_settings", "load_cases", "split_cases", "train"]

log = logging.getLogger(__name__)

METRICS_FIELDS = ("epoch", "step", "train_loss", "val_loss", "val_dice", "lr", "seconds", "samples_per_s")


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environ(cls) -> DistEnv:
        """The ``torchrun`` environment (RANK, WORLD_SIZE, LOCAL_RANK); a single process without it."""
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path
    metrics_csv: Path
    splits_json: Path
    epochs_run: int
    seconds: float
    device: str


def describe_sources(config: TrainConfig) -> str:
    """One line for the checkpoint's ``training_data`` field (kinds and folder names, no patient data)."""
    return "; ".join(f"{s.kind}:{s.path.name}" for s in config.data.sources)


def grid_settings(config: TrainConfig) -> GridSettings:
    """The model grid of ``config`` (its model section and its architecture's slices per role)."""
    return GridSettings(size=config.model.in_plane_size, through_plane_mm=config.model.through_plane_mm,
                        slices_per_role=ARCHITECTURES[config.model.architecture].slices_per_role)


def load_cases(config: TrainConfig, assign_roles: RoleAssigner | None = None, *, progress: bool = True,
               grid: GridSettings | None = None) -> dict[str, CachedCase]:
    """Every case of every source, cached (built on first use); ids must be unique across sources.
    ``assign_roles`` (needed for DICOM sources; its ``key`` attribute, when it has one, joins the cache key)
    maps a case folder to its role series."""
    grid = grid or grid_settings(config)
    sources = []
    for e in config.data.sources:
        if e.kind == "dicom":
            if assign_roles is None:
                raise ValueError(f"{e.path}: DICOM training data needs a role assigner (the node's series rules)")
            sources += find_sources("dicom", e.path, assign_roles=assign_roles,
                                    assignment_key=getattr(assign_roles, "key", ""))
        else:
            sources += find_sources(e.kind, e.path, spacing_mm=e.spacing_mm)
    ids = [s.case_id for s in sources]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"case ids must be unique across data sources; repeated: {dupes[:5]}")
    out = {}
    for s in tqdm(sources, desc="cache cases", unit="case", disable=not progress):
        out[s.case_id] = cache_case(s, config.data.cache, grid)
    return out


def split_cases(config: TrainConfig, cases: dict[str, CachedCase], *, reuse: bool) -> dict[str, list[str]]:
    """The patient-level split, read from ``splits.json`` when ``reuse`` and it exists, else made and written."""
    path = config.output.dir / "splits.json"
    if reuse and path.is_file():
        splits = read_splits(path)
        unknown = sorted({case for split in splits.values() for case in split} - set(cases))
        if unknown:
            raise ValueError(f"{path}: case(s) {unknown[:5]} are not in the data sources")
        return splits
    counts = {cid: c.n_lesions for cid, c in cases.items()}
    s = config.data.split
    splits = make_splits(counts, validation=s.validation, test=s.test, seed=s.seed)
    write_splits(path, splits, seed=s.seed, lesion_counts=counts)
    return splits


def _usable(cases: Sequence[CachedCase], roles: Sequence[str], need_all: bool) -> list[CachedCase]:
    if need_all:
        return [c for c in cases if all(c.volumes.get(r) is not None for r in roles)]
    return [c for c in cases if any(c.volumes.get(r) is not None for r in roles)]


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _monitor(model: ILDDeepLabV3, cases: Sequence[CachedCase], n: int, seed: int, config: TrainConfig,
             device: torch.device) -> tuple[float, float]:
    """Validation loss and Dice (threshold 0.5, pooled over the sample) on a fixed sample of slices."""
    if n == 0 or not cases:
        return float("nan"), float("nan")
    cfg = model.config
    rng = np.random.default_rng(seed)
    picks = SliceSampler(cases, config.recipe.lesion_fraction, rng).draw(n)
    model.eval()
    losses, inter, total = [], 0.0, 0.0
    with torch.inference_mode():
        for a in range(0, n, 16):
            b = build_batch(cases, picks[a:a + 16], cfg.roles, slices_per_role=cfg.slices_per_role,
                            crop=None, flips=False, rot90=False, rng=rng)
            x, y = torch.from_numpy(b.x).to(device), torch.from_numpy(b.y).to(device)
            logits = model(x, torch.from_numpy(b.present).to(device)).float()
            losses.append(float(segmentation_loss(logits, y, positive_weight=config.recipe.positive_weight,
                                                  dice_weight=config.recipe.dice_weight)) * len(picks[a:a + 16]))
            pred = (logits > 0).float()
            inter += float((pred * y).sum())
            total += float(pred.sum() + y.sum())
    model.train()
    return sum(losses) / n, (2 * inter / total if total else 1.0)


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True,
          assign_roles: RoleAssigner | None = None, calibrate: bool = True) -> TrainResult:
    """Run the recipe of ``config`` (see the module doc); returns where everything was written (rank 0)."""
    from training.calibrate import calibrate_and_save  # the calibration imports the metrics (heavier)

    env = DistEnv.from_environ()
    use_cuda = torch.cuda.is_available()
    if env.world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{env.local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(config.recipe.threads or max(1, (os.cpu_count() or 1) // max(1, env.world_size)))
    rcp = config.recipe
    per_rank = rcp.batch_size // env.world_size
    if per_rank * env.world_size != rcp.batch_size or per_rank % rcp.accumulation or per_rank // rcp.accumulation < 2:
        raise ValueError(f"recipe.batch_size {rcp.batch_size} must split into {env.world_size} process(es) x "
                         f"{rcp.accumulation} micro-batch(es) of >= 2 samples")
    micro = per_rank // rcp.accumulation
    out = config.output.dir
    t_start = time.perf_counter()

    # rank 0 builds the cache and the split first; the others then read both
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        cases = load_cases(config, assign_roles, progress=progress)
        splits = split_cases(config, cases, reuse=resume)
    if env.world_size > 1:
        dist.barrier()
    if not env.is_main:
        cases = load_cases(config, assign_roles, progress=False)
        splits = read_splits(out / "splits.json")

    torch.manual_seed(rcp.seed * 1000 + env.rank)  # before build_model: the seed decides the initial weights too
    model = build_model(config.model.architecture).to(device)
    arch = model.config
    train_cases = _usable([cases[c] for c in splits["train"]], arch.roles, need_all=not arch.ild)
    val_cases = _usable([cases[c] for c in splits["validation"]], arch.roles, need_all=not arch.ild)
    if not train_cases or not val_cases:
        raise ValueError(f"no training or validation case has the roles the model needs ({list(arch.roles)})")
    rng = np.random.default_rng([rcp.seed, env.rank])
    sampler = SliceSampler(train_cases, rcp.lesion_fraction, rng)
    steps = rcp.steps_per_epoch or max(1, sampler.n_slices // rcp.batch_size)
    optimiser = torch.optim.Adam(model.parameters(), lr=rcp.learning_rate, betas=(0.9, 0.999),
                                 weight_decay=rcp.weight_decay)
    amp = use_cuda and rcp.amp
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    start_epoch, run_uid = 0, str(generate_uid())
    state_path = out / "last.pt"
    if resume and state_path.is_file():
        state = torch.load(state_path, map_location=device, weights_only=False)  # our own file, written below
        if state["architecture"] != arch.to_dict():
            raise ValueError(f"{state_path}: was trained with another architecture; start a fresh output.dir")
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, run_uid = int(state["epoch"]), str(state["run_uid"])
        rng.bit_generator.state = state["numpy_rng"][env.rank] if env.rank < len(state["numpy_rng"]) else rng.bit_generator.state
        torch.set_rng_state(state["torch_rng"])
    net: torch.nn.Module = model
    if env.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[env.local_rank] if use_cuda else None)
    metrics_csv = out / "metrics.csv"
    if env.is_main and not (resume and metrics_csv.is_file()):
        with metrics_csv.open("w", newline="") as f:
            csv.writer(f).writerow(METRICS_FIELDS)
    if env.is_main:
        (out / "run.json").write_text(json.dumps({
            "run_uid": run_uid, "config": json.loads(config.model_dump_json()), "world_size": env.world_size,
            "device": str(device), "torch": torch.__version__, "train_cases": len(train_cases),
            "validation_cases": len(val_cases), "train_slices": sampler.n_slices, "steps_per_epoch": steps,
            "started_utc": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()}, indent=1))
        log.info("training %s: %d train / %d validation cases, %d steps/epoch x %d epochs on %s x %d",
                 config.model.architecture, len(train_cases), len(val_cases), steps, rcp.epochs, device,
                 env.world_size)

    model.train()
    with safe_cpu_autograd(device):  # oneDNN's AVX2 backward is unsafe (training/cpu_safety.py)
        for epoch in range(start_epoch, rcp.epochs):
            t0 = time.perf_counter()
            running, n_loss = 0.0, 0
            bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{rcp.epochs}", unit="step",
                       disable=not (progress and env.is_main))
            for _ in bar:
                optimiser.zero_grad(set_to_none=True)
                step_loss = 0.0
                for m in range(rcp.accumulation):
                    b = build_batch(train_cases, sampler.draw(micro), arch.roles, slices_per_role=arch.slices_per_role,
                                    crop=rcp.crop, flips=rcp.flips, rot90=rcp.rot90, rng=rng)
                    x = torch.from_numpy(b.x).to(device, non_blocking=True)
                    y = torch.from_numpy(b.y).to(device, non_blocking=True)
                    present = torch.from_numpy(b.present).to(device)
                    # gradients are all-reduced across processes on the last micro-batch only
                    last = m == rcp.accumulation - 1
                    ctx = (net.no_sync() if isinstance(net, torch.nn.parallel.DistributedDataParallel) and not last
                           else contextlib.nullcontext())
                    with ctx, torch.autocast(device_type="cuda", dtype=torch.float16, enabled=amp):
                        loss = segmentation_loss(net(x, present), y, positive_weight=rcp.positive_weight,
                                                 dice_weight=rcp.dice_weight) / rcp.accumulation
                    scaler.scale(loss).backward()
                    step_loss += float(loss.detach())
                scaler.step(optimiser)
                scaler.update()
                running += step_loss
                n_loss += 1
                bar.set_postfix(loss=f"{running / n_loss:.4f}")
            seconds = time.perf_counter() - t0
            if env.world_size > 1:  # the logged training loss is the mean over every process's batches
                total = torch.tensor([running, float(n_loss)], dtype=torch.float64, device=device)
                dist.all_reduce(total)
                running, n_loss = float(total[0]) / env.world_size, int(total[1]) // env.world_size
            if env.is_main:
                val_loss, val_dice = _monitor(model, val_cases, rcp.monitor_slices, rcp.seed, config, device)
                row = [epoch + 1, (epoch + 1) * steps, f"{running / max(n_loss, 1):.6f}", f"{val_loss:.6f}",
                       f"{val_dice:.4f}", f"{optimiser.param_groups[0]['lr']:.3g}", f"{seconds:.1f}",
                       f"{steps * rcp.batch_size / seconds:.1f}"]
                with metrics_csv.open("a", newline="") as f:
                    csv.writer(f).writerow(row)
                log.info("epoch %d: train loss %.4f, val loss %.4f, val Dice@0.5 %.3f, %.0f s", epoch + 1,
                         running / max(n_loss, 1), val_loss, val_dice, seconds)
            rngs = [rng.bit_generator.state]
            if env.world_size > 1:
                gathered: list[Any] = [None] * env.world_size
                dist.all_gather_object(gathered, rng.bit_generator.state)
                rngs = gathered
            if env.is_main:
                _atomic_torch_save({"architecture": arch.to_dict(), "model": model.state_dict(),
                                    "optimiser": optimiser.state_dict(), "scaler": scaler.state_dict(),
                                    "epoch": epoch + 1, "run_uid": run_uid, "numpy_rng": rngs,
                                    "torch_rng": torch.get_rng_state()}, state_path)
    if env.world_size > 1:
        dist.barrier()
    ckpt = config.output.checkpoint
    if env.is_main and calibrate:
        calibrate_and_save(model, val_cases, config.output.checkpoint, name=config.model.name,
                           version=config.model.version, training_data=describe_sources(config),
                           run_uid=run_uid, grid=grid_settings(config), report_path=out / "calibration.json", device=device,
                           progress=progress, rule=rcp.threshold_rule)
    if env.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return TrainResult(checkpoint=ckpt, metrics_csv=metrics_csv, splits_json=out / "splits.json",
                       epochs_run=rcp.epochs - start_epoch, seconds=time.perf_counter() - t_start,
                       device=str(device))
