"""Forward ms per 256x256 slice on this CPU for each shipped architecture, against the 25 ms target.

Usage: python bench/model_speed.py [--threads 2] [--batch 8] [--repeats 7] [--warmup 2] [--size 256] [ARCH ...]

Measured with torch.set_num_threads(THREADS), eval mode, torch.inference_mode(), random input,
after warm-up passes. Reports the median and the minimum wall time over the repeats, and the CPU time
divided by the thread count (less sensitive to other processes competing for the cores: when the
machine is shared, the minimum and the CPU figure are the better estimate of the uncontended speed),
and the forward FLOPs per slice (torch.utils.flop_counter; independent of the machine and its load).
For reference, the paper reports ~250 ms/slice on 2x GTX 1080 Ti (Grøvik, Yi et al. 2021).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.model import (
    ARCHITECTURES,
    DEFAULT_ARCHITECTURE,
    ILDDeepLabV3,
    count_parameters,
)

TARGET_MS = 25.0
PAPER_MS = 250.0  # ms/slice on 2x GTX 1080 Ti, study 2


def measure(name: str, *, batch: int, size: int, repeats: int, warmup: int, threads: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = ILDDeepLabV3(ARCHITECTURES[name]).eval()
    x = torch.randn(batch, model.config.in_channels, size, size)
    walls, cpus = [], []
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        for _ in range(repeats):
            c0, t0 = time.process_time(), time.perf_counter()
            model(x)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x[:1])
    per = 1000.0 / batch
    return {
        "gflop": counter.get_total_flops() / 1e9,
        "params": float(count_parameters(model)),
        "median_ms": statistics.median(walls) * per,
        "min_ms": min(walls) * per,
        "cpu_ms": statistics.median(cpus) * per / threads,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=list(ARCHITECTURES), help="architectures (default: all shipped)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, {args.size}x{args.size}, "
        f"median/min of {args.repeats} after {args.warmup} warm-up; load average {load:.2f} on {os.cpu_count()} CPUs"
    )
    print(f"paper: ~{PAPER_MS:.0f} ms/slice on 2x GTX 1080 Ti; target: <= {TARGET_MS:.0f} ms/slice on 2 CPU cores")
    header = (f"{'architecture':<16}{'params':>11}{'GFLOP':>7}{'median ms':>11}{'min ms':>9}{'cpu ms':>9}"
              f"{'min/target':>12}{'paper/min':>11}")
    print(header)
    for name in args.names:
        r = measure(name, batch=args.batch, size=args.size, repeats=args.repeats, warmup=args.warmup, threads=args.threads)
        flag = " (default)" if name == DEFAULT_ARCHITECTURE else ""
        print(
            f"{name:<16}{int(r['params']):>11,}{r['gflop']:>7.2f}{r['median_ms']:>11.1f}{r['min_ms']:>9.1f}{r['cpu_ms']:>9.1f}"
            f"{r['min_ms'] / TARGET_MS:>12.2f}{PAPER_MS / r['min_ms']:>11.1f}{flag}",
            flush=True,
        )


if __name__ == "__main__":
    main()
