"""Seconds per synthetic study (generation only, no file writing).

Usage: python bench/phantom_speed.py [--seeds 0 1 2 3 4] [--voxel-mm 3]

Prints the first (cold: includes loading the MNI template) and the following (warm) studies separately,
because a command-line run that writes one study pays the template load once.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.phantom import generate_study  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--voxel-mm", type=float, default=None, help="forced isotropic voxel size (default: realistic)")
    args = parser.parse_args()
    times = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        study = generate_study(seed, voxel_mm=args.voxel_mm)
        dt = time.perf_counter() - t0
        times.append(dt)
        sizes = " ".join(f"{s.kind.value}{list(s.image.GetSize())}" for s in study.series)
        print(f"seed {seed}: {dt:6.2f} s  {study.vendor.value:8s} {len(study.lesions):2d} lesions  {sizes}", flush=True)
    label = "realistic" if args.voxel_mm is None else f"voxel_mm={args.voxel_mm}"
    print(f"{label}: first (cold, incl. template load) {times[0]:.2f} s", end="")
    if len(times) > 1:
        warm = times[1:]
        print(f"; warm mean {statistics.mean(warm):.2f} s, max {max(warm):.2f} s over {len(warm)} studies")
    else:
        print()


if __name__ == "__main__":
    main()
