"""Inference: the model over every axial slice of a :class:`~pipeline.preprocess.PreparedStudy`.

* Batched over centre slices; the 2.5D input of a batch is built only when the batch is run
  (``PreparedStudy.batches``), so memory is bounded by ``batch_size`` x channels x size^2 floats plus the
  output map (one float32 per model-grid voxel), whatever the study's length.
* CPU: ``torch.set_num_threads(threads)`` (default ``os.cpu_count()``; the previous setting is restored on
  return). CUDA (``device="auto"`` picks it when available, or ``"cuda"``/``"cuda:N"``): float16 autocast.
* Missing roles: the input channels of a missing role are zeros (``stack_25d``) and the ``present`` mask is
  passed to the model, whose input-level-dropout layer zeroes them and rescales the rest by
  ``n_roles / n_present`` (method spec). A model trained without ILD (baseline) refuses missing roles.
* The probability map (sigmoid of the logits, float32, model grid) is resampled onto the reference series' own
  grid by :func:`pipeline.preprocess.probability_to_reference`, which interpolates its log-odds trilinearly
  (continuing the model's bilinear upsampling of its logits; thresholding happens on the reference grid).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from pipeline.model import ILDDeepLabV3
from pipeline.preprocess import PreparedStudy, probability_to_reference

__all__ = ["InferenceResult", "ProgressCallback", "predict_probability", "resolve_device", "run_inference"]

#: ``progress(done_batches, total_batches)``, called after every batch (e.g. to advance a tqdm bar).
ProgressCallback = Callable[[int, int], Any]


@dataclass(frozen=True)
class InferenceResult:
    """The model's output for one study."""

    probability_grid: np.ndarray  # float32 (slice, row, column) on ``grid``
    grid: sitk.Image  # the model grid (geometry only)
    probability: sitk.Image  # float32 on the reference series' own grid
    device: str  # "cpu", "cuda:0", ...
    threads: int | None  # torch CPU threads used (None on CUDA)
    batch_size: int
    n_batches: int
    roles_used: tuple[str, ...]  # roles given to the model (present in the study and taken by the model)
    seconds_model: float  # forward passes (incl. building the batches)
    seconds_resample: float  # model grid -> reference grid


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else CPU; otherwise ``torch.device(device)``."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def _present_mask(model: ILDDeepLabV3, prepared: PreparedStudy) -> tuple[tuple[str, ...], list[bool]]:
    roles = tuple(model.config.roles)
    if tuple(prepared.roles) != roles:
        raise ValueError(f"the study was prepared for roles {list(prepared.roles)}, the model takes {list(roles)}")
    if prepared.slices_per_role != model.config.slices_per_role:
        raise ValueError(f"the study was prepared with {prepared.slices_per_role} slices per role, the model "
                         f"takes {model.config.slices_per_role}")
    present = [prepared.volumes.get(r) is not None for r in roles]
    if not any(present):
        raise ValueError(f"none of the model's roles {list(roles)} is present in the study")
    if not model.config.ild and not all(present):
        missing = [r for r, p in zip(roles, present) if not p]
        raise ValueError(f"this model was trained without input-level dropout and needs every one of its roles; "
                         f"missing: {missing}")
    return tuple(r for r, p in zip(roles, present) if p), present


def predict_probability(
    model: ILDDeepLabV3, prepared: PreparedStudy, *, batch_size: int = 8, device: str | torch.device = "auto",
    threads: int | None = None, progress: ProgressCallback | None = None,
) -> np.ndarray:
    """Sigmoid probability (float32, (slice, row, column)) on ``prepared.grid``; see the module doc."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    _, present = _present_mask(model, prepared)
    dev = resolve_device(device)
    model = model.to(dev).eval()
    n = prepared.n_slices
    size = tuple(reversed(prepared.grid.GetSize()))
    out = np.empty(size, dtype=np.float32)
    total = (n + batch_size - 1) // batch_size
    old_threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(max(1, int(threads if threads is not None else (os.cpu_count() or 1))))
    try:
        with torch.inference_mode():
            for done, (rng, stack) in enumerate(prepared.batches(batch_size), start=1):
                x = torch.from_numpy(stack).to(dev, non_blocking=True)
                mask = torch.tensor([present] * len(rng), dtype=torch.bool, device=dev)
                if dev.type == "cuda":
                    with torch.autocast(device_type="cuda", dtype=torch.float16):
                        logits = model(x, mask)
                else:
                    logits = model(x, mask)
                out[rng.start:rng.stop] = torch.sigmoid(logits.float())[:, 0].cpu().numpy()
                if progress is not None:
                    progress(done, total)
    finally:
        torch.set_num_threads(old_threads)
    return out


def run_inference(
    model: ILDDeepLabV3, prepared: PreparedStudy, reference: sitk.Image, *, batch_size: int = 8,
    device: str | torch.device = "auto", threads: int | None = None, progress: ProgressCallback | None = None,
) -> InferenceResult:
    """:func:`predict_probability`, then the map resampled onto ``reference``'s own grid."""
    roles_used, _ = _present_mask(model, prepared)
    dev = resolve_device(device)
    t0 = time.perf_counter()
    prob = predict_probability(model, prepared, batch_size=batch_size, device=dev, threads=threads,
                               progress=progress)
    t1 = time.perf_counter()
    on_ref = probability_to_reference(prob, prepared.grid, reference)
    t2 = time.perf_counter()
    n_threads = None
    if dev.type == "cpu":
        n_threads = max(1, int(threads if threads is not None else (os.cpu_count() or 1)))
    return InferenceResult(
        probability_grid=prob, grid=prepared.grid, probability=on_ref, device=str(dev), threads=n_threads,
        batch_size=batch_size, n_batches=(prepared.n_slices + batch_size - 1) // batch_size, roles_used=roles_used,
        seconds_model=t1 - t0, seconds_resample=t2 - t1,
    )
