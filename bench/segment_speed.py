"""Whole ``dicom-node segment`` on a realistic 4-sequence 1 mm phantom study: wall time per stage and peak memory.

Targets: <= 60 s and <= 4 GiB on 2 CPU cores. The model is the bundled ``models/ild-demo.safetensors`` (or
``--model PATH``); ``--random ARCH`` times an architecture with random weights instead (inference costs the same
whatever the weights, but random weights find ~100 false lesions, which inflates the SEG/SR stages).

    .venv/bin/python bench/segment_speed.py [--seed 0] [--threads 2] [--model PATH | --random ild-base]

The phantom is generated in this process; ``dicom-node segment`` runs in a child process (as a user runs it,
imports included), whose peak resident memory is ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vendor", default="ge")
    ap.add_argument("--model", type=Path, default=Path(__file__).resolve().parents[1] / "models" / "ild-demo.safetensors")
    ap.add_argument("--random", metavar="ARCH", help="time this architecture with random weights instead")
    args = ap.parse_args()

    import torch

    from pipeline.checkpoint import CheckpointMeta, save_checkpoint
    from pipeline.model import build_model
    from training.phantom import generate_study
    from training.phantom.dicom_writer import write_dicom_study

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        t = time.perf_counter()
        study = generate_study(args.seed, vendor=args.vendor, voxel_mm=None)
        write_dicom_study(study, tmp / "dicom")
        t_phantom = time.perf_counter() - t
        model = args.model
        if args.random:
            torch.manual_seed(0)
            meta = CheckpointMeta(model_name=f"{args.random}-random", model_version="0", threshold=0.5,
                                  normalisation="per-slice robust", normalisation_version="1",
                                  training_data="none (random weights, timing only)")
            model = save_checkpoint(tmp / "m.safetensors", build_model(args.random), meta)
        cmd = [sys.executable, "-c", "from dicom_node.cli import main; main()", "segment", str(tmp / "dicom"),
               "--out", str(tmp / "out"), "--model", str(model), "--threads", str(args.threads)]
        t = time.perf_counter()
        run = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t
        if run.returncode != 0:
            print(run.stdout + run.stderr, file=sys.stderr)
            return 1
        s = json.loads((tmp / "out" / "summary.json").read_text())
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(f"phantom (generate + write DICOM, not timed against the target): {t_phantom:.1f} s")
    print(f"model: {model.name}; roles: {', '.join(s['roles'])}; model grid {s['inference']['model_grid_size']}; "
          f"batches {s['inference']['n_batches']} x {s['inference']['batch_size']}; lesions found {s['lesion_count']} "
          f"(phantom truth: {len(study.lesions)})")
    for k, v in s["timings_s"].items():
        print(f"  {k:<11} {v:7.2f} s")
    print(f"segment wall time (whole command: start-up, imports, series classification, checkpoint load): "
          f"{wall:.1f} s (target <= 60 s) "
          f"{'OK' if wall <= 60 else 'OVER'}")
    print(f"peak RSS of the segment process: {peak_gib:.2f} GiB (target <= 4 GiB) {'OK' if peak_gib <= 4 else 'OVER'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
