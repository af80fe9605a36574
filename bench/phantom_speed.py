"""Seconds per synthetic study, against the 20 s budget (2 cores): generation, then DICOM + truth writing.

Usage: python bench/phantom_speed.py [--seeds 0 1 2 3 4] [--voxel-mm 3] [--enhanced]

The first study is reported apart (cold: it includes loading the MNI template), because a
command-line run that writes one study pays that load once.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.phantom import generate_study
from training.phantom.dicom_writer import reference_series_uid, write_dicom_study
from training.phantom.nifti_writer import write_truth

BUDGET_S = 20.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--voxel-mm", type=float, default=None, help="forced isotropic voxel size (default: realistic)")
    parser.add_argument("--enhanced", action="store_true", help="write Enhanced MR multi-frame instead of classic")
    args = parser.parse_args()
    totals = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            study = generate_study(seed, voxel_mm=args.voxel_mm)
            t1 = time.perf_counter()
            files = write_dicom_study(study, Path(tmp) / "dicom", enhanced=args.enhanced)
            write_truth(study, Path(tmp) / "truth", reference_series_uid(study, args.enhanced))
            t2 = time.perf_counter()
        totals.append(t2 - t0)
        sizes = " ".join(f"{s.kind.value}{list(s.image.GetSize())}" for s in study.series)
        print(
            f"seed {seed}: generate {t1 - t0:5.2f} s + write {t2 - t1:5.2f} s = {t2 - t0:5.2f} s "
            f"({len(files)} files, {study.vendor.value}, {len(study.lesions)} lesions)  {sizes}",
            flush=True,
        )
    label = "realistic" if args.voxel_mm is None else f"voxel_mm={args.voxel_mm}"
    print(f"{label}: first (cold) {totals[0]:.2f} s = {totals[0] / BUDGET_S:.2f} x budget", end="")
    if len(totals) > 1:
        warm = totals[1:]
        print(
            f"; warm mean {statistics.mean(warm):.2f} s, max {max(warm):.2f} s = {max(warm) / BUDGET_S:.2f} x budget "
            f"({BUDGET_S:.0f} s) over {len(warm)} studies"
        )
    else:
        print()


if __name__ == "__main__":
    main()
