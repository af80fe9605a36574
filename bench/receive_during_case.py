"""Receive rate of the running node while it processes a case, against the same node idle (issue #19).

    .venv/bin/python bench/receive_during_case.py [--rounds 3] [--seed 0] [--workers 1] [--model PATH]

One realistic 1 mm phantom study (4 sequences, GE, no distractors) is generated and copied with new UIDs
(tests/load_harness.py ``study_copies``). The node (``dicom-node serve``: receiver, ``--workers`` worker
processes at ``queue.worker_nice``, the bundled model, SQLite) runs on loopback. Each round:

* idle: one copy sent with DCMTK ``storescu`` (one association) while no case runs;
* busy: one copy sent so that its case starts, then, as soon as that case is ``running``, the next copy is
  sent and timed; the round counts only when the case was still running when the send ended.

Printed: instances/s of each send, the medians, and busy / idle (target >= 0.8). Run it on an otherwise
idle machine: other load on the cores lowers both figures unevenly.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the loopback harness the tests use: real node, real DCMTK peers


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--rounds", type=int, default=3, help="idle + busy measurements (default 3)")
    ap.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    ap.add_argument("--workers", type=int, default=1, help="queue.workers of the node (default 1)")
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "ild-demo.safetensors",
                    help="model the node runs (default: the bundled one)")
    args = ap.parse_args()

    from load_harness import study_copies
    from node_harness import NodeProcess, node_config, storescu

    from training.phantom import generate_study
    from training.phantom.dicom_writer import write_dicom_study

    with tempfile.TemporaryDirectory(prefix="receive-during-case-") as tmp_s:
        tmp = Path(tmp_s)
        t = time.perf_counter()
        write_dicom_study(generate_study(args.seed, vendor="ge", voxel_mm=None, distractors=False), tmp / "template")
        copies = study_copies(tmp / "template", tmp / "copies", 3 * args.rounds)
        n = copies[0].n_instances
        print(f"study: {n} instances, {len(copies)} copies, generated in {time.perf_counter() - t:.0f} s; "
              f"{os.cpu_count()} CPUs, {args.workers} worker process(es)", flush=True)
        cfg = node_config(tmp, model=args.model, queue={"workers": args.workers},
                          completion={"series_quiet_seconds": 1.0, "study_quiet_seconds": 2.0,
                                      "start_when_roles_complete": True})
        idle: list[float] = []
        busy: list[float] = []
        with NodeProcess(cfg) as node:

            def send(i: int) -> float:
                t0 = time.perf_counter()
                run = storescu(node.port, [copies[i].folder], timeout=900)
                if run.returncode != 0:
                    raise SystemExit(f"storescu failed ({run.returncode}): {run.stderr[-1000:]}")
                return n / (time.perf_counter() - t0)

            def settled(i: int) -> None:
                node.wait_state(copies[i].uid, {"done", "sent", "failed", "skipped"}, timeout=900)

            for r in range(args.rounds):
                first, timed, rest = 3 * r, 3 * r + 1, 3 * r + 2
                idle.append(send(first))
                settled(first)
                send(timed)  # its case is the load
                node.wait_state(copies[timed].uid, {"running"}, timeout=300)
                rate = send(rest)
                still = (node.study(copies[timed].uid) or {}).get("state") == "running"
                print(f"  round {r + 1}: idle {idle[-1]:.0f} instances/s, during a case {rate:.0f} instances/s"
                      f"{'' if still else ' (the case ended before the send: not counted)'}", flush=True)
                if still:
                    busy.append(rate)
                settled(timed)
                settled(rest)
        if not busy:
            print("no send overlapped a whole case: nothing to compare")
            return 1
        ratio = statistics.median(busy) / statistics.median(idle)
        print(f"median idle {statistics.median(idle):.0f} instances/s, during a case {statistics.median(busy):.0f} "
              f"instances/s: ratio {ratio:.2f} (target >= 0.80: {'OK' if ratio >= 0.8 else 'BELOW'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
