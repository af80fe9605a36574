"""Load test of the running node: N small studies over K parallel associations, W worker processes.

    .venv/bin/python bench/load.py [--studies 50] [--associations 4] [--workers 1] [--database sqlite|postgresql]

One 3 mm synthetic study (4 sequences, ~250 instances; tests/test_pipeline_study.py's ``lesion_study``) is
generated and copied N times with new UIDs. The node (``dicom-node serve``, the fast "known-function"
test model, so the figures measure the node rather than the network), W - 1 extra workers
(``serve --worker-only``) on the same database and storage, and a DCMTK ``storescp`` destination run on
loopback; with ``--database postgresql`` a throw-away PostgreSQL server is started (tests/pg_harness.py).
K DCMTK ``storescu`` runs send the studies at once. Printed: instances/s, queue latency (study complete ->
case started), end to end per study (first instance -> SEG + SR delivered), cases per worker, and whether
anything was lost (every study sent, exactly one SEG and one SR each at the destination).
Exit code 0 when nothing was lost, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the loopback harness the tests use: real node, real DCMTK peers


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=50, help="studies sent (copies of one synthetic study)")
    ap.add_argument("--associations", type=int, default=4, help="parallel associations (storescu runs)")
    ap.add_argument("--workers", type=int, default=1, help="worker processes: the node plus W - 1 --worker-only")
    ap.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic study")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds to wait for every case to be sent")
    args = ap.parse_args()
    if args.workers > 1 and args.database == "sqlite":
        print("note: several workers on SQLite share one file lock; PostgreSQL is the multi-worker set-up")

    from load_harness import run_load, study_copies
    from pg_harness import postgres_server
    from test_pipeline_study import known_checkpoint, lesion_study, write_study

    with tempfile.TemporaryDirectory() as tmp_s, ExitStack() as stack:
        tmp = Path(tmp_s)
        t = time.perf_counter()
        write_study(lesion_study(args.seed), tmp / "template")
        studies = study_copies(tmp / "template", tmp / "studies", args.studies)
        model = known_checkpoint(tmp / "known.safetensors", "t1_cube_post")
        n_instances = sum(s.n_instances for s in studies)
        print(f"{len(studies)} studies, {n_instances} instances, made in {time.perf_counter() - t:.0f} s", flush=True)
        if args.database == "postgresql":
            url = stack.enter_context(postgres_server()).database("load")
        else:
            url = f"sqlite:///{tmp / 'node.db'}"
        run = run_load(tmp / "run", studies, model=model, url=url, associations=args.associations,
                       workers=args.workers, timeout=args.timeout)

    f = run.figures
    print(f"{args.associations} associations, {args.workers} worker(s), {args.database}:")
    for line in f.lines():
        print("  " + line)
    print(f"  sending took {run.send_seconds:.1f} s ({n_instances / run.send_seconds:.0f} instances/s seen by the "
          f"senders); all {len(studies)} studies sent {run.total_seconds:.1f} s after the first association "
          f"({len(studies) / run.total_seconds * 60:.1f} studies/min)")
    print("  cases finished per process: " + ", ".join(
        f"{'node' if i == 0 else f'worker {i + 1}'} {len(c)}" for i, c in enumerate(run.cases_per_process)))
    done = [c for cases in run.cases_per_process for c in cases]
    lost = [s.uid for s in studies if run.results_at_destination.get(s.uid) != {"SEG": 1, "SR": 1}]
    problems = []
    if run.store_failures:
        problems.append(f"{len(run.store_failures)} storescu run(s) failed: {run.store_failures[0]}")
    if f.instances != n_instances:
        problems.append(f"{f.instances} of {n_instances} instances indexed")
    if lost:
        problems.append(f"{len(lost)} studies without exactly one SEG and one SR at the destination")
    if len(done) != len(set(done)):
        problems.append("a case was finished by more than one worker")
    print("  nothing lost, each case processed once" if not problems else "  PROBLEMS: " + "; ".join(problems))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
