"""Scale-out and load on PostgreSQL: the receiving node plus an extra ``serve --worker-only`` process share
one database (started by the test) and one storage folder; 50 small studies arrive over 4 parallel
associations. Every instance is indexed, every case is processed exactly once (by one of the two
processes, in one attempt), and each study's SEG and SR reach the destination exactly once.

The figures (instances/s, queue latency, end to end) are printed (``pytest -rP``); ``bench/load.py``
measures them with other sizes, 1 vs 2 workers, SQLite or PostgreSQL.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from load_harness import LoadStudy, run_load, study_copies
from support.known_model import known_checkpoint
from support.studies import lesion_study, write_study

pytestmark = pytest.mark.slow

N_STUDIES, ASSOCIATIONS, WORKERS = 50, 4, 2


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> list[LoadStudy]:
    """One synthetic 3 mm study, generated once, copied 50 times with new UIDs."""
    tmp = tmp_path_factory.mktemp("load")
    write_study(lesion_study(30), tmp / "template")
    return study_copies(tmp / "template", tmp / "studies", N_STUDIES)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return known_checkpoint(tmp_path_factory.mktemp("model") / "known.safetensors", "t1_cube_post")


def test_study_copies_are_distinct_studies(studies: list[LoadStudy]) -> None:
    import pydicom

    assert len({s.uid for s in studies}) == N_STUDIES
    first = sorted(studies[0].folder.rglob("*.dcm"))
    second = sorted(studies[1].folder.rglob("*.dcm"))
    a, b = (pydicom.dcmread(p[0]) for p in (first, second))
    assert a.StudyInstanceUID == studies[0].uid and b.StudyInstanceUID == studies[1].uid
    assert a.SeriesInstanceUID != b.SeriesInstanceUID and a.SOPInstanceUID != b.SOPInstanceUID
    assert (a.pixel_array == b.pixel_array).all()  # same pixels, patched UIDs only


@pytest.mark.timeout(1200)  # < 4 min on 2 idle cores; the margin is for a loaded CI runner
def test_load_50_studies_4_associations_2_workers_on_postgresql(tmp_path: Path, postgres, model,
                                                                 studies: list[LoadStudy]) -> None:
    run = run_load(tmp_path, studies, model=model, url=postgres.database("load"), associations=ASSOCIATIONS,
                   workers=WORKERS, timeout=1000)
    f = run.figures
    print("\n".join(f.lines()))
    print(f"all sent {run.total_seconds:.0f} s after the first association; cases per process: "
          f"{[len(c) for c in run.cases_per_process]}")
    assert run.store_failures == []
    assert f.instances == sum(s.n_instances for s in studies)  # every instance answered success is indexed
    assert (f.studies, f.studies_finished, f.attempts_max) == (N_STUDIES, N_STUDIES, 1)
    done = [case for cases in run.cases_per_process for case in cases]
    assert len(done) == N_STUDIES and len(set(done)) == N_STUDIES  # each case finished once, by one process
    assert all(run.cases_per_process), run.cases_per_process  # both processes took cases from the queue
    assert run.results_at_destination == {s.uid: {"SEG": 1, "SR": 1} for s in studies}
