"""Edge quality of the lesions (#18 part 5): how the model-grid probability map is brought onto the reference grid.

For each phantom study (known truth on the reference series' grid) the whole pipeline runs once
(``pipeline.study.run_study``, bundled model ``models/ild-demo.safetensors``); then its model-grid map is brought
onto the reference grid three ways and thresholded there at the checkpoint's threshold:

* ``nearest``     - nearest-neighbour resampling of the probability (computed here, for comparison);
* ``linear-prob`` - trilinear interpolation of the probability: the pipeline before #18 part 5 (computed here);
* ``log-odds``    - the pipeline now, :func:`pipeline.preprocess.probability_to_reference` (trilinear log-odds).

Printed per study and way: the mean symmetric surface distance (mm, :mod:`training.metrics.boundary`) of the
predicted lesions that overlap a true lesion to the true lesions they overlap, the voxel Dice of the whole
thresholded map against the truth, the lesion count and the seconds of the resampling step; and the pipeline's
stage times. Seeds 0-2 (GE, 1 mm) have a 256 reference grid equal to the model grid in-plane; seeds 3, 5, 6
reconstruct the BRAVO at 512 (0.5 mm pixels, 1.2 mm slices), where the model grid is coarser than the reference.

    .venv/bin/python bench/edge_quality.py [--seeds 0 1 2 3 5 6] [--vendor ge] [--threads 2] [--model PATH]

Measured (2-core dev container, shared and loaded; 2026-12-08), mean of seeds 3, 5, 6 (0.5 mm reference):
MSD nearest 2.03 / linear-prob 2.28 / log-odds 1.88 mm, Dice 0.349 / 0.316 / 0.369, lesions 117 / 92 / 80 in all,
resample 0.66 / 1.59 / 2.15 s. Seeds 0-2 (reference = model grid): identical by construction, MSD 2.09 mm,
Dice 0.314; resample 0.27 / 0.46 / 0.70 s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from pipeline.checkpoint import load_checkpoint
from pipeline.lesions import STRUCTURE_26
from pipeline.preprocess import probability_to_reference
from pipeline.study import StudySettings, run_study
from training.metrics.boundary import mean_surface_distance
from training.metrics.voxel import confusion
from training.phantom import generate_study
from training.phantom.dicom_writer import plan_study, write_dicom_study
from training.phantom.types import ROLES

WAYS = ("nearest", "linear-prob", "log-odds")


def _resample_probability(interpolator: int) -> Callable[[np.ndarray, sitk.Image, sitk.Image], sitk.Image]:
    def resample(prob: np.ndarray, grid: sitk.Image, reference: sitk.Image) -> sitk.Image:
        img = sitk.GetImageFromArray(prob)
        img.CopyInformation(grid)
        return sitk.Resample(img, reference, sitk.Transform(3, sitk.sitkIdentity), interpolator, 0.0,
                             sitk.sitkFloat32)
    return resample


RESAMPLERS: dict[str, Callable[[np.ndarray, sitk.Image, sitk.Image], sitk.Image]] = {
    "nearest": _resample_probability(sitk.sitkNearestNeighbor),
    "linear-prob": _resample_probability(sitk.sitkLinear),
    "log-odds": probability_to_reference,
}


def edge_figures(pred: np.ndarray, truth: np.ndarray, spacing_zyx: Sequence[float]) -> tuple[float, float, int]:
    """(mean symmetric surface distance mm of the predicted components that overlap the truth to the true
    lesions they overlap, voxel Dice, number of predicted components)."""
    labels, n = ndimage.label(pred, structure=STRUCTURE_26)
    hit_labels = np.unique(labels[truth & pred])
    pred_hit = np.isin(labels, hit_labels[hit_labels > 0])
    truth_labels, _ = ndimage.label(truth, structure=STRUCTURE_26)
    hit_truth = np.unique(truth_labels[truth & pred])
    truth_hit = np.isin(truth_labels, hit_truth[hit_truth > 0])
    msd = mean_surface_distance(pred_hit, truth_hit, spacing_zyx)
    return msd, confusion(pred, truth).dice, int(n)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 5, 6])
    ap.add_argument("--vendor", default="ge")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", type=Path, default=Path(__file__).resolve().parents[1] / "models" / "ild-demo.safetensors")
    args = ap.parse_args()

    model, meta = load_checkpoint(args.model)
    settings = StudySettings(threads=args.threads, device="cpu")
    limit = np.float32(meta.threshold)
    rows: list[tuple[str, str, float, float, int, float]] = []  # (grid group, way, MSD, Dice, n, s)
    print(f"model {args.model.name}, threshold {meta.threshold:.6g} (the checkpoint's), {args.threads} CPU threads")
    for seed in args.seeds:
        study = generate_study(seed, vendor=args.vendor, voxel_mm=None)
        with tempfile.TemporaryDirectory() as tmp_s:
            tmp = Path(tmp_s)
            write_dicom_study(study, tmp)
            files = {study.series[sp.index].kind.value: sorted((tmp / sp.folder).glob("*.dcm"))
                     for sp in plan_study(study).series if study.series[sp.index].kind.value in ROLES}
            t = time.perf_counter()
            result = run_study(files, model, meta, settings=settings)
            wall = time.perf_counter() - t
        inf = result.inference
        reference = result.reference_image
        truth = sitk.GetArrayFromImage(study.label) > 0
        if truth.shape != tuple(reversed(reference.GetSize())):
            raise RuntimeError(f"seed {seed}: the truth is not on the pipeline's reference grid")
        spacing = tuple(float(v) for v in reversed(reference.GetSpacing()))
        print(f"\nseed {seed}: reference {reference.GetSize()} @ {tuple(round(v, 3) for v in reference.GetSpacing())} "
              f"mm, model grid {inf.grid.GetSize()} @ {tuple(round(v, 3) for v in inf.grid.GetSpacing())} mm, "
              f"{len(study.lesions)} true lesions; run_study {wall:.1f} s ("
              + ", ".join(f"{k} {v:.1f}" for k, v in result.timings_s.items()) + ")")
        print(f"  {'way':<12} {'MSD mm':>7} {'Dice':>6} {'lesions':>7} {'resample s':>10}")
        for way in WAYS:
            t = time.perf_counter()
            on_ref = RESAMPLERS[way](inf.probability_grid, inf.grid, reference)
            seconds = time.perf_counter() - t
            msd, dice, n = edge_figures(sitk.GetArrayFromImage(on_ref) >= limit, truth, spacing)
            finer = reference.GetSpacing()[0] < 0.75 * inf.grid.GetSpacing()[0]
            rows.append(("reference finer" if finer else "same in-plane", way, msd, dice, n, seconds))
            print(f"  {way:<12} {msd:7.3f} {dice:6.3f} {n:7d} {seconds:10.2f}")
    print("\nmean over the seeds, by reference vs model grid in-plane (MSD mm / Dice / resample s):")
    for group in sorted({r[0] for r in rows}):
        for way in WAYS:
            mine = [r for r in rows if r[0] == group and r[1] == way]
            print(f"  {group:<15} {way:<12} n={len(mine)} "
                  + " / ".join(f"{statistics.fmean(float(r[k]) for r in mine):.3f}" for k in (2, 3, 5)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
