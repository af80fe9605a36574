"""Per-case probability maps kept on disk, so that a rerun (another threshold, another report) does no inference.

Layout: ``<root>/<model hash>/<case id>-<case cache key>/<combination key>.npy``, float16 (slice, row, column)
on the model grid. The model hash is the checkpoint file's SHA-256 (any retraining or recalibration changes
it), the case key is :func:`training.data.cache.cache_case`'s (changes with the case's files or the grid), the
combination key names the roles the model was given. Beside each map, ``<combination key>.froc.json`` keeps
its FROC counts (threshold-independent, and the slow part of an evaluation). Writes go to a temporary file
renamed into place, so an interrupted run never leaves a truncated map that looks complete.

float16 keeps 3 significant digits (relative step 2^-11): metrics computed from a cached map may differ from
the node's float32 map for voxels within that step of the threshold.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline.model import ILDDeepLabV3, combination_key
from training.calibrate import predict_case
from training.data.cache import CachedCase

__all__ = ["PredictionCache", "file_sha256"]


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The first 16 hex digits of the file's SHA-256."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


class PredictionCache:
    """Probability maps of one model (identified by ``model_hash``) under ``root``; ``n_inferred`` counts the
    maps this object had to compute (0 on a rerun that only changes the threshold)."""

    def __init__(self, root: str | os.PathLike[str], model_hash: str) -> None:
        self.folder = Path(root) / model_hash
        self.n_inferred = 0

    def path(self, case: CachedCase, roles: Sequence[str]) -> Path:
        return self.folder / f"{case.case_id}-{case.meta['key']}" / f"{combination_key(roles)}.npy"

    def store(self, case: CachedCase, roles: Sequence[str], prob: np.ndarray) -> Path:
        """Write ``prob`` (any float array, values in [0, 1]) as float16, atomically."""
        target = self.path(case, roles)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".", suffix=".npy", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, np.asarray(prob, dtype=np.float16))
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    def _froc_path(self, case: CachedCase, roles: Sequence[str]) -> Path:
        return self.path(case, roles).with_suffix(".froc.json")

    def store_froc(self, case: CachedCase, roles: Sequence[str], thresholds: Sequence[float],
                   counts: Sequence[tuple[int, int, int]]) -> None:
        """Keep the map's FROC counts (they do not depend on the operating threshold; the sweep is the slow part
        of an evaluation), atomically, beside the map."""
        target = self._froc_path(case, roles)
        fd, tmp = tempfile.mkstemp(prefix=".", suffix=".json", dir=target.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({"thresholds": list(thresholds), "counts": [list(c) for c in counts]}, f)
        os.replace(tmp, target)

    def load_froc(self, case: CachedCase, roles: Sequence[str], thresholds: Sequence[float]
                  ) -> tuple[tuple[int, int, int], ...] | None:
        """The stored FROC counts when they were made at ``thresholds`` (and the map has not been replaced)."""
        p, m = self._froc_path(case, roles), self.path(case, roles)
        if not p.is_file() or p.stat().st_mtime_ns < m.stat().st_mtime_ns:
            return None
        doc = json.loads(p.read_text())
        if doc.get("thresholds") != list(thresholds):
            return None
        return tuple((int(a), int(b), int(c)) for a, b, c in doc["counts"])

    def load(self, case: CachedCase, roles: Sequence[str]) -> np.ndarray | None:
        """The cached map as float32 (exactly the float16 values), or None when there is none."""
        p = self.path(case, roles)
        return np.load(p).astype(np.float32) if p.is_file() else None

    def get(self, model: ILDDeepLabV3, case: CachedCase, roles: Sequence[str],
            device: torch.device | str = "cpu") -> np.ndarray:
        """The map of ``case`` given ``roles``: read back, or predicted (:func:`training.calibrate.predict_case`,
        the inference code itself) and stored first."""
        prob = self.load(case, roles)
        if prob is None:
            self.store(case, roles, predict_case(model, case, roles, device))
            self.n_inferred += 1
            # read back, so that a first run and a rerun score the same (float16) map
            prob = self.load(case, roles)
            if prob is None:
                raise RuntimeError(f"prediction cache: the map of case {case.case_id} was written but reads back as "
                                   "missing (is the cache folder writable and on a working disk?)")
        return prob
