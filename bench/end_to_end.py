"""End to end through the running node: seconds from the last C-STORE of a 4-sequence study to its SEG + SR
arriving at the destination, minus the configured quiet period. Target on 2 CPU cores: <= 60 s.

    .venv/bin/python bench/end_to_end.py [--seed 0] [--quiet 5] [--model PATH] [--repeat 1]

A realistic 1 mm phantom study (4 sequences plus distractors, ~800 instances) is generated, the node
(`dicom-node serve`, bundled model, SQLite) and a DCMTK `storescp` destination are started on loopback, and
DCMTK `storescu` sends the study. With `completion.start_when_roles_complete` (the default) a study is
complete `series_quiet_seconds` after the last instance of its last role series: that quiet period is
subtracted. Printed: receive rate, the quiet period, the case's stages (from summary.json), and the total.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the loopback harness the tests use: real node, real DCMTK peers


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0, help="phantom seed")
    ap.add_argument("--quiet", type=float, default=5.0, help="completion.series_quiet_seconds of the node (s)")
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "ild-demo.safetensors")
    ap.add_argument("--repeat", type=int, default=1, help="studies sent one after another (new seeds)")
    args = ap.parse_args()

    import pydicom
    from node_harness import NodeProcess, node_config, storescp, storescu, wait_for
    from pydicom.errors import InvalidDicomError

    from training.phantom import generate_study
    from training.phantom.dicom_writer import write_dicom_study

    rows = []
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        with storescp(tmp / "dest") as dest_port:
            cfg = node_config(tmp, model=args.model, destinations=[
                {"name": "pacs", "ae_title": "DEST", "host": "127.0.0.1", "port": dest_port}],
                completion={"series_quiet_seconds": args.quiet, "study_quiet_seconds": 2 * args.quiet})
            with NodeProcess(cfg) as node:
                for i in range(args.repeat):
                    seed = args.seed + i
                    t = time.perf_counter()
                    study = generate_study(seed, vendor="ge", voxel_mm=None)
                    folder = tmp / f"study-{seed}"
                    write_dicom_study(study, folder)
                    files = sorted(p for p in folder.rglob("*") if p.is_file())
                    size = sum(p.stat().st_size for p in files)
                    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
                    print(f"study {i + 1}: {len(files)} instances, {size / 1e6:.0f} MB, generated in "
                          f"{time.perf_counter() - t:.0f} s", flush=True)
                    t0 = time.perf_counter()
                    sent = storescu(node.port, [folder], timeout=1800)
                    t_last = time.perf_counter()
                    if sent.returncode != 0:
                        print(sent.stderr, file=sys.stderr)
                        return 1

                    def arrived(uid: str = uid) -> bool:
                        got = set()
                        for p in (tmp / "dest").iterdir():
                            try:
                                ds = pydicom.dcmread(p, stop_before_pixels=True)
                            except (InvalidDicomError, EOFError, OSError):
                                continue  # storescp is still writing it
                            if ds.StudyInstanceUID == uid:
                                got.add(str(ds.Modality))
                        return {"SEG", "SR"} <= got or ("SR" in got and _no_lesions(node, uid))

                    wait_for(arrived, 900, "SEG + SR at the destination", interval=0.1)
                    t_arrived = time.perf_counter()
                    st = node.study(uid)
                    root = Path(node.settings["storage"]["root"])
                    summary = json.loads((root / st["case"]["result_dir"] / "summary.json").read_text())
                    rows.append({
                        "instances": len(files), "receive_s": t_last - t0, "mb": size / 1e6,
                        "after_last_store_s": t_arrived - t_last, "net_s": t_arrived - t_last - args.quiet,
                        "stages": summary["timings_s"], "lesions": summary["lesion_count"],
                    })
                    r = rows[-1]
                    print(f"  storescu: {r['receive_s']:.1f} s ({r['instances'] / r['receive_s']:.0f} instances/s, "
                          f"{r['mb'] / r['receive_s']:.0f} MB/s)")
                    print(f"  last C-STORE -> SEG + SR at the destination: {r['after_last_store_s']:.1f} s; minus the "
                          f"{args.quiet:g} s quiet period: {r['net_s']:.1f} s (target <= 60 s)")
                    print("  case stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in r["stages"].items()))
                    print(f"  {r['lesions']} lesion(s)")
    if len(rows) > 1:
        print(f"median over {len(rows)} studies: {statistics.median(r['net_s'] for r in rows):.1f} s "
              "after the quiet period")
    return 0


def _no_lesions(node, uid: str) -> bool:
    st = node.study(uid)
    return bool(st and st["case"] and st["case"]["lesions"] and st["case"]["lesions"]["count"] == 0)


if __name__ == "__main__":
    raise SystemExit(main())
