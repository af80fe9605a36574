"""Rigid co-registration (``pipeline.registration``) on realistic phantom studies: seconds per series and the
residual misalignment against the phantom's TRUE transform (mean / max over a spread of brain points, mm), for
the previous defaults ("before") and the current ``RegistrationSettings()`` defaults ("after").

    .venv/bin/python bench/registration_speed.py [--seeds 0 3 6] [--threads 2] [--cache DIR] [--only after]

Realistic geometry (``voxel_mm=None``): 0.9-1.2 mm 3D series, 3-5 mm 2D FLAIR, 256/512 matrices; target on
2 CPU cores: <= ~12 s for the 3 non-reference series of a study, residual < ~0.6 mm mean / 1 mm max.
``--cache DIR`` keeps the generated series (MetaImage) between runs (generation is ~10 s per study).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from pipeline.registration import ROLES, RegistrationSettings, register  # noqa: E402

# the defaults before the speed-up (1 mm working grid, full-resolution finest level, 200 iterations per level)
BEFORE = RegistrationSettings(
    histogram_bins=32, sampling_fraction=0.05, shrink_factors=(4, 2, 1), smoothing_sigmas_mm=(4.0, 2.0, 1.0),
    iterations=200, learning_rate=1.0, min_step=1e-3, relaxation=0.5, working_spacing_mm=1.0,
)


def load(seed: int, cache: Path | None) -> tuple[str, dict[str, sitk.Image], dict[str, np.ndarray], sitk.Image]:
    """(reference role, role -> series image, role -> true 4x4 map reference point -> series point, brain mask)."""
    d = cache / f"ge_{seed}" if cache is not None else None
    if d is not None and (d / "ref.txt").exists():
        ref = (d / "ref.txt").read_text().strip()
        roles = [r for r in ROLES if (d / f"{r}.mha").exists()]
        return (ref, {r: sitk.ReadImage(str(d / f"{r}.mha")) for r in roles},
                {r: np.load(d / f"{r}_truth.npy") for r in roles}, sitk.ReadImage(str(d / "brain.mha")))
    from test_pipeline_registration import true_point_maps

    from training.phantom import generate_study
    from training.phantom.types import SeriesKind

    st = generate_study(seed, vendor="ge")
    ref, maps = true_point_maps(seed, "ge", None)
    assert ref == st.reference_kind.value
    images = {}
    for r in maps:
        series = st.series_of(SeriesKind(r))
        assert series is not None, f"the phantom study has no {r} series"
        images[r] = series.image
    if d is not None:
        d.mkdir(parents=True, exist_ok=True)
        for r, img in images.items():
            sitk.WriteImage(img, str(d / f"{r}.mha"))
            np.save(d / f"{r}_truth.npy", maps[r])
        sitk.WriteImage(st.brain_mask, str(d / "brain.mha"))
        (d / "ref.txt").write_text(ref)
    return ref, images, maps, st.brain_mask


def brain_points(brain: sitk.Image, step: int = 37) -> np.ndarray:
    idx = np.argwhere(sitk.GetArrayViewFromImage(brain) > 0)[::step, ::-1].astype(np.float64)  # (i, j, k)
    d = np.asarray(brain.GetDirection()).reshape(3, 3) * np.asarray(brain.GetSpacing())
    return idx @ d.T + np.asarray(brain.GetOrigin())


def as_matrix(tx: sitk.Transform) -> np.ndarray:
    e = sitk.Euler3DTransform(tx)
    r = np.asarray(e.GetMatrix()).reshape(3, 3)
    c = np.asarray(e.GetCenter())
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = np.asarray(e.GetTranslation()) + c - r @ c
    return m


def run(name: str, settings: RegistrationSettings, data) -> list[dict]:
    rows = []
    for seed, (ref, images, maps, brain) in data.items():
        pts = brain_points(brain)
        fixed = images[ref]
        total = 0.0
        for role in ROLES:
            if role not in images or role == ref:
                continue
            res = register(fixed, images[role], role, settings=settings)
            m, t = as_matrix(res.transform), maps[role]
            err = np.linalg.norm((pts @ m[:3, :3].T + m[:3, 3]) - (pts @ t[:3, :3].T + t[:3, 3]), axis=1)
            total += res.seconds
            sp = images[role].GetSpacing()
            row = dict(settings=name, seed=seed, ref=ref, role=role, size=images[role].GetSize(),
                       spacing=tuple(round(s, 2) for s in sp), seconds=round(res.seconds, 2),
                       err_mean=round(float(err.mean()), 3), err_max=round(float(err.max()), 3),
                       fell_back=res.fell_back)
            rows.append(row)
            print(f"{name:6s} seed {seed} {role:14s} {row['size']!s:16s} {res.seconds:6.2f} s  "
                  f"err mean {err.mean():.3f} max {err.max():.3f} mm{'  FELL BACK' if res.fell_back else ''}",
                  flush=True)
        print(f"{name:6s} seed {seed} total {total:6.2f} s", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 3, 6])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--only", choices=["before", "after"], default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = ap.parse_args()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    t0 = time.perf_counter()
    data = {s: load(s, args.cache) for s in args.seeds}
    print(f"phantoms ready in {time.perf_counter() - t0:.1f} s; {args.threads} SimpleITK threads", flush=True)
    rows = []
    if args.only in (None, "before"):
        rows += run("before", BEFORE, data)
    if args.only in (None, "after"):
        rows += run("after", RegistrationSettings(), data)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
