"""Training batches: which slices (half with lesion), their 2.5D inputs, crops and augmentation.

* :class:`SliceSampler`: a ``lesion_fraction`` share of every batch is drawn uniformly from the slices that
  contain lesion, the rest uniformly from all slices of all training cases (method spec: half and half, as
  lesion slices are > 30x rarer).
* :func:`build_batch`: the 2.5D input of each drawn slice through :func:`pipeline.preprocess.stack_25d` (the
  inference code), the ``present`` role mask, and the centre slice's label; optionally a square in-plane crop
  that contains a lesion voxel (lesion draws) or a brain voxel (other draws); then per-sample random flips
  and rotations by multiples of 90 degrees, applied identically to input and label.

Arrays are (batch, channel, row, column) float32; labels (batch, 1, row, column) float32 0/1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.preprocess import stack_25d
from training.data.cache import CachedCase

__all__ = ["Batch", "SliceSampler", "augment", "build_batch"]


@dataclass(frozen=True)
class Batch:
    x: np.ndarray  # (B, roles * slices_per_role, H, W) float32
    present: np.ndarray  # (B, roles) bool
    y: np.ndarray  # (B, 1, H, W) float32
    lesion_draw: np.ndarray  # (B,) bool: drawn from the lesion slices


class SliceSampler:
    """Draws ``(case index, slice index, lesion draw)`` triples; see the module doc."""

    def __init__(self, cases: Sequence[CachedCase], lesion_fraction: float, rng: np.random.Generator):
        if not cases:
            raise ValueError("no training case")
        self.rng = rng
        self.lesion_fraction = float(lesion_fraction)
        self._all = np.concatenate([np.stack([np.full(c.n_slices, i), np.arange(c.n_slices)], axis=1)
                                    for i, c in enumerate(cases)])
        lesion = [np.stack([np.full(len(c.lesion_slices), i), c.lesion_slices], axis=1)
                  for i, c in enumerate(cases) if len(c.lesion_slices)]
        self._lesion = np.concatenate(lesion) if lesion else np.zeros((0, 2), dtype=np.intp)

    @property
    def n_slices(self) -> int:
        return len(self._all)

    def draw(self, n: int) -> list[tuple[int, int, bool]]:
        n_lesion = int(round(n * self.lesion_fraction)) if len(self._lesion) else 0
        picks = [(*self._lesion[j], True) for j in self.rng.integers(0, len(self._lesion), n_lesion)] if n_lesion else []
        picks += [(*self._all[j], False) for j in self.rng.integers(0, len(self._all), n - n_lesion)]
        return [(int(c), int(k), bool(les)) for c, k, les in picks]


def _crop_origin(focus: np.ndarray, shape: tuple[int, int], crop: int, rng: np.random.Generator) -> tuple[int, int]:
    """Top-left corner of a ``crop`` x ``crop`` window inside ``shape`` that contains a random ``focus`` voxel."""
    out = []
    for axis in range(2):
        hi = shape[axis] - crop
        if focus.size:
            p = int(focus[rng.integers(len(focus)), axis])
            lo_o, hi_o = max(0, p - crop + 1), min(hi, p)
        else:
            lo_o, hi_o = 0, hi
        out.append(int(rng.integers(lo_o, hi_o + 1)))
    return out[0], out[1]


def augment(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, *, flips: bool, rot90: bool) -> tuple[np.ndarray, np.ndarray]:
    """One sample's (C, H, W) input and (1, H, W) label, flipped / rotated identically (square H = W for
    rotations)."""
    if flips:
        for axis in (1, 2):
            if rng.random() < 0.5:
                x, y = np.flip(x, axis), np.flip(y, axis)
    if rot90:
        k = int(rng.integers(4))
        if k:
            x, y = np.rot90(x, k, axes=(1, 2)), np.rot90(y, k, axes=(1, 2))
    return np.ascontiguousarray(x), np.ascontiguousarray(y)


def build_batch(cases: Sequence[CachedCase], picks: Sequence[tuple[int, int, bool]], roles: Sequence[str], *,
                slices_per_role: int, crop: int | None, flips: bool, rot90: bool,
                rng: np.random.Generator) -> Batch:
    """The batch for ``picks`` (from :meth:`SliceSampler.draw`); roles the case lacks are zeros and not present."""
    xs, ys, present = [], [], []
    for ci, k, lesion_draw in picks:
        case = cases[ci]
        x = stack_25d(case.volumes, roles, slices_per_role, [k])[0]
        y = np.asarray(case.label[k], dtype=np.float32)[None]
        if crop is not None and crop < min(y.shape[1:]):
            focus_map = case.label[k] if lesion_draw else case.brain[k]
            r0, c0 = _crop_origin(np.argwhere(np.asarray(focus_map) > 0), y.shape[1:], crop, rng)
            x, y = x[:, r0:r0 + crop, c0:c0 + crop], y[:, r0:r0 + crop, c0:c0 + crop]
        x, y = augment(x, y, rng, flips=flips, rot90=rot90)
        xs.append(x)
        ys.append(y)
        present.append([case.volumes.get(r) is not None for r in roles])
    return Batch(x=np.stack(xs), present=np.asarray(present, dtype=bool), y=np.stack(ys),
                 lesion_draw=np.asarray([p[2] for p in picks], dtype=bool))
