"""Patient-level splits: train / validation / held-out test, the test set stratified by lesion count.

A case is a patient (one study per case folder): a patient's slices never reach two sets. The test set takes
from each lesion-count group (0, 1-3, 4-10, >10; :func:`training.metrics.count_group`) its share of the
requested size (largest remainders first), so the subgroup figures of the method spec are all populated;
validation is then drawn the same way from the rest. Everything is decided by ``seed`` (recorded in
``splits.json``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from training.metrics import count_group

__all__ = ["SPLITS", "make_splits", "read_splits", "write_splits"]

SPLITS = ("train", "validation", "test")


def _size(request: float, n: int) -> int:
    """A count (>= 1) or a fraction (< 1) of ``n``."""
    return int(request) if request >= 1 else int(round(request * n))


def _stratified_take(ids: Sequence[str], groups: Mapping[str, str], k: int, rng: np.random.Generator) -> list[str]:
    by_group: dict[str, list[str]] = {}
    for cid in ids:
        by_group.setdefault(groups[cid], []).append(cid)
    names = sorted(by_group)
    exact = {g: k * len(by_group[g]) / len(ids) for g in names}
    take = {g: math.floor(exact[g]) for g in names}
    for g in sorted(names, key=lambda g: (take[g] - exact[g], g))[: k - sum(take.values())]:
        take[g] += 1  # largest remainders
    out = []
    for g in names:
        members = sorted(by_group[g])
        out += [members[i] for i in rng.permutation(len(members))[: take[g]]]
    return sorted(out)


def make_splits(lesion_counts: Mapping[str, int], *, validation: float, test: float, seed: int) -> dict[str, list[str]]:
    """Split case ids (keys of ``lesion_counts``, value = the case's lesion count) into
    ``{"train", "validation", "test"}`` (sorted id lists); see the module doc."""
    ids = sorted(lesion_counts)
    n = len(ids)
    n_test, n_val = _size(test, n), _size(validation, n)
    if n_val < 1 or n - n_test - n_val < 1:
        raise ValueError(f"{n} case(s) cannot give >= 1 training and >= 1 validation case with "
                         f"validation={validation} and test={test}")
    groups = {cid: count_group(int(c)) for cid, c in lesion_counts.items()}
    rng = np.random.default_rng(seed)
    test_ids = _stratified_take(ids, groups, n_test, rng) if n_test else []
    rest = [c for c in ids if c not in set(test_ids)]
    val_ids = _stratified_take(rest, groups, n_val, rng)
    train_ids = sorted(set(rest) - set(val_ids))
    return {"train": train_ids, "validation": val_ids, "test": test_ids}


def write_splits(path: Path, splits: Mapping[str, Sequence[str]], *, seed: int, lesion_counts: Mapping[str, int]) -> None:
    doc = {"seed": seed, **{k: list(splits[k]) for k in SPLITS},
           "lesion_count_groups": {k: {g: sum(1 for c in splits[k] if count_group(lesion_counts[c]) == g)
                                       for g in ("0", "1-3", "4-10", ">10")} for k in SPLITS}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))


def read_splits(path: Path) -> dict[str, list[str]]:
    doc = json.loads(Path(path).read_text())
    return {k: list(doc[k]) for k in SPLITS}
