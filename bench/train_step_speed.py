"""Seconds per CPU training step with oneDNN (MKL-DNN) on and off, and their ratio.

Usage: python bench/train_step_speed.py [--arch ild-small-os8] [--threads 2] [--batch 16] [--crop 160]
                                         [--steps 6] [--warmup 2]

Why: torch's oneDNN AVX2 backward-weights kernel corrupts the heap on CPUs without AVX-512 (see
``training/cpu_safety.py``), so CPU training runs with oneDNN off there. This prints what that costs on the
machine it runs on. Each step is what the trainer does: forward, the method's loss, backward, Adam. Each
setting runs in a fresh process (``ONEDNN_MAX_CPU_ISA`` must be set before torch loads), so run it once per
ISA, e.g. ``ONEDNN_MAX_CPU_ISA=AVX2 python bench/train_step_speed.py`` to see an AVX2-only CPU's figures on
an AVX-512 machine. The "on" figure is skipped where it would crash (AVX2 ISA on one thread).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _child(arch: str, threads: int, batch: int, crop: int, steps: int, warmup: int, onednn: bool) -> None:
    sys.path.insert(0, str(ROOT))
    import torch

    from pipeline.model import ARCHITECTURES, ILDDeepLabV3
    from training.loss import segmentation_loss

    torch.set_num_threads(threads)
    with torch.backends.mkldnn.flags(enabled=onednn):
        torch.manual_seed(0)
        cfg = ARCHITECTURES[arch]
        model = ILDDeepLabV3(cfg).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        x = torch.rand(batch, cfg.in_channels, crop, crop)
        y = (torch.rand(batch, 1, crop, crop) > 0.99).float()
        times = []
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            segmentation_loss(model(x), y, positive_weight=10.0, dice_weight=1.0).backward()
            opt.step()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    print(json.dumps({"median": statistics.median(times), "min": min(times),
                      "capability": torch.backends.cpu.get_cpu_capability()}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="ild-small-os8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--crop", type=int, default=160)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        _child(a.arch, a.threads, a.batch, a.crop, a.steps, a.warmup, a.child == "on")
        return 0
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "(all the CPU has)")
    print(f"{a.arch}, batch {a.batch} x {a.crop}^2, {a.threads} thread(s), ONEDNN_MAX_CPU_ISA={isa}")
    results = {}
    for mode in ("on", "off"):
        if mode == "on" and a.threads == 1 and os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper().startswith("AVX2"):
            print("  oneDNN on : skipped (this setting corrupts the heap)")
            continue
        cmd = [sys.executable, __file__, "--child", mode, *(f"--{k}={v}" for k, v in
               (("arch", a.arch), ("threads", a.threads), ("batch", a.batch), ("crop", a.crop),
                ("steps", a.steps), ("warmup", a.warmup)))]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            print(f"  oneDNN {mode:3}: the process died (exit {run.returncode}): {run.stderr.strip().splitlines()[-1:]}")
            continue
        results[mode] = r = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"  oneDNN {mode:3}: {r['median']:.3f} s/step median, {r['min']:.3f} min (torch capability {r['capability']})")
    if len(results) == 2:
        print(f"  off / on: {results['off']['median'] / results['on']['median']:.2f}x the time per step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
