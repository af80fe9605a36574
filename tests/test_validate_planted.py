"""``dicom-node validate`` on planted predictions: three constructed patients (cubes as lesions, probability maps
written straight into the prediction cache) whose every figure is computed by hand below; the report renders
(HTML parses with its tables and images; the PDF converts to PNG and page 1 holds the summary table)."""

from __future__ import annotations

import csv
import json
import math
import shutil
import statistics
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from pipeline.checkpoint import CheckpointMeta
from pipeline.model import ILDDeepLabV3, ModelConfig, combination_key
from pipeline.roles import ROLES
from training.data.cache import CachedCase
from training.metrics import roc_auc, youden_threshold
from training.validate.evaluate import FROC_THRESHOLDS, evaluate_case, froc_points
from training.validate.predictions import PredictionCache
from training.validate.report import write_outputs
from training.validate.run import ModelRun, describe_dataset, validate

SHAPE = (10, 12, 12)  # 1 mm voxels: a voxel count is a volume in mm^3
THRESHOLD = 0.5
ALL = combination_key(ROLES)


def planted_case(case_id: str, truth: np.ndarray) -> CachedCase:
    """A pre-processed case held in memory: brain = every slice but the first; all four roles present (blank)."""
    brain = np.ones(SHAPE, np.uint8)
    brain[0] = 0
    meta = {"case_id": case_id, "key": "planted00000", "spacing_zyx_mm": [1.0, 1.0, 1.0], "reference_role": ROLES[0],
            "roles_present": list(ROLES), "n_lesions": int(truth.max())}
    return CachedCase(folder=Path("."), meta=meta, volumes={r: np.zeros(SHAPE, np.float16) for r in ROLES},
                      label=(truth > 0).astype(np.uint8), brain=brain)


def planted() -> list[tuple[CachedCase, np.ndarray]]:
    """(case, probability map). ``truth`` numbers the lesions only for n_lesions (read from the mask later)."""
    # case a: lesions of 8, 27 and 125 mm^3; the 8 at p 0.25 (missed at 0.5), the 27 at 0.75 (hit), 2 of the
    # 125's 5 slices at 1.0 (hit, 50 TP voxels); FP components of 12 mm^3 and 1 mm^3 at 0.5
    t, p = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.float32)
    t[1:3, 1:3, 1:3], p[1:3, 1:3, 1:3] = 1, 0.25
    t[1:4, 7:10, 7:10], p[1:4, 7:10, 7:10] = 2, 0.75
    t[4:9, 1:6, 1:6], p[4:6, 1:6, 1:6] = 3, 1.0
    p[6:9, 9:11, 9:11] = 0.5
    p[9, 0, 11] = 0.5
    a = (planted_case("a", t), p)
    # case b: no lesion; one FP component of exactly 10 mm^3 at 0.5 (counts in FP >= 10 mm^3)
    t, p = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.float32)
    p[3:5, 2:7, 4] = 0.5
    b = (planted_case("b", t), p)
    # case c: four 1-voxel lesions, two hit (p 1.0); a 0.75 voxel touching a missed one by a corner only (26-
    # connected but not overlapping: a false positive)
    t, p = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.float32)
    for k, (z, y, x) in enumerate([(2, 2, 2), (2, 2, 8), (7, 2, 2), (7, 8, 8)], start=1):
        t[z, y, x] = k
    p[2, 2, 2] = p[2, 2, 8] = 1.0
    p[8, 9, 9] = 0.75
    c = (planted_case("c", t), p)
    return [a, b, c]


# --- the hand-computed figures -------------------------------------------------------------------------------
N_NEG_WHOLE = {"a": 1440 - 160, "b": 1440, "c": 1440 - 4}
HAND = {
    # AUC in the brain (1296 voxels): P(score_pos > score_neg) + 1/2 P(tie), pairs counted by score
    "a": {"auc": (77 * 1136 + 8 * 1123 + 0.5 * 75 * 1123) / (160 * 1136), "sensitivity": 77 / 160,
              "specificity": 1123 / 1136, "dice": 2 * 77 / (2 * 77 + 13 + 83), "iou": 77 / (77 + 13 + 83), "precision": 77 / 90,
              "recall": 77 / 160, "fpr": 13 / 1280, "lesion_sensitivity": 2 / 3, "n_lesions": 3, "n_hit": 2, "fp": 2, "fp_10": 1,
              "count_group": "1-3"},
    "b": {"auc": None, "sensitivity": None, "specificity": (1296 - 10) / 1296, "dice": 0.0, "iou": 0.0, "precision": 0.0,
              "recall": None, "fpr": 10 / 1440, "lesion_sensitivity": None, "n_lesions": 0, "n_hit": 0, "fp": 1, "fp_10": 1,
              "count_group": "0"},
    "c": {"auc": (2 * 1292 + 0.5 * 2 * 1291) / (4 * 1292), "sensitivity": 2 / 4, "specificity": 1291 / 1292,
              "dice": 4 / 7, "iou": 2 / 5, "precision": 2 / 3, "recall": 2 / 4, "fpr": 1 / 1436, "lesion_sensitivity": 2 / 4,
              "n_lesions": 4, "n_hit": 2, "fp": 1, "fp_10": 0, "count_group": "4-10"},
}
# GT lesions hit / GT lesions per volume bin [0, 10), [10, 65), [65, 500), [500, inf): a's 8 missed, 27 and 125
# hit; c's four 1 mm^3, two hit
HAND_BINS = [(2, 5), (1, 1), (1, 1), (0, 0)]


def hand_froc(t: float) -> tuple[float, float]:
    """(pooled lesion sensitivity, mean FP per patient) at threshold t: each case's counts change at its values."""
    if t <= 0.25:
        hits, fps = 3 + 2, 2 + 1 + 1
    elif t <= 0.5:
        hits, fps = 2 + 2, 2 + 1 + 1
    elif t <= 0.75:
        hits, fps = 2 + 2, 0 + 0 + 1
    else:
        hits, fps = 1 + 2, 0
    return hits / 7, fps / 3


def tiny_model(ild: bool = True) -> ILDDeepLabV3:
    roles = ROLES if ild else ROLES[1:]
    return ILDDeepLabV3(ModelConfig(backbone_depth=10, base_width=4, ild=ild, roles=roles))


def meta(name: str) -> CheckpointMeta:
    return CheckpointMeta(model_name=name, model_version="9.9.9", threshold=THRESHOLD, normalisation="n",
                          normalisation_version="1", training_data="planted", training_run_uid="1.2.3.4")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("planted")
    cases = planted()
    cache = PredictionCache(tmp / "pred", "planted-model")
    for case, prob in cases:
        cache.store(case, ROLES, prob)
    run = ModelRun("model", tmp / "planted.safetensors", tiny_model(), meta("planted"), THRESHOLD, "checkpoint",
                   cache)
    result = validate([run], [c for c, _ in cases], dataset=describe_dataset([c for c, _ in cases], "planted", "nifti"),
                      bootstrap=200, seed=1, progress=False)
    from training.validate.figures import case_figure

    overviews = [(w["case_id"], case_figure(cases[0][0], cases[0][1], THRESHOLD, w["case_id"]))
                 for w in result.doc["worst_cases"]]
    paths = write_outputs(result.doc, result.evaluations, tmp / "out", overviews)
    return {"paths": paths, "doc": json.loads(paths["metrics"].read_text()), "cache": cache, "cases": cases}


def test_no_inference_on_planted_predictions(outputs):
    assert outputs["cache"].n_inferred == 0
    assert outputs["doc"]["models"]["model"]["inferred"] == 0


def test_every_patient_metric_equals_the_hand_computed_value(outputs):
    combo = outputs["doc"]["models"]["model"]["combinations"]["as-acquired"]
    got = {p["case_id"]: p for p in combo["patients"]}
    assert set(got) == set(HAND)
    for case_id, expected in HAND.items():
        for name, value in expected.items():
            if value is None:
                assert got[case_id][name] is None, (case_id, name)  # NaN is null in metrics.json
            elif isinstance(value, float):
                assert got[case_id][name] == pytest.approx(value, rel=1e-12), (case_id, name)
            else:
                assert got[case_id][name] == value, (case_id, name)


def test_summaries_subgroups_size_bins_and_fp(outputs):
    combo = outputs["doc"]["models"]["model"]["combinations"]["as-acquired"]
    s = combo["summary"]
    dice = [HAND[c]["dice"] for c in "abc"]
    assert s["dice"]["mean"] == pytest.approx(statistics.mean(dice))
    assert s["dice"]["sd"] == pytest.approx(statistics.stdev(dice))
    assert s["auc"]["n"] == 2 and s["auc"]["mean"] == pytest.approx((HAND["a"]["auc"] + HAND["c"]["auc"]) / 2)
    assert s["fp_per_patient"] == pytest.approx(4 / 3)
    assert s["fp_10_per_patient"] == pytest.approx(2 / 3)
    assert s["pooled_lesion_sensitivity"] == pytest.approx(4 / 7)
    assert {g: v["n_patients"] for g, v in s["groups"].items()} == {"1-3": 1, "4-10": 1, ">10": 0}
    assert s["groups"]["4-10"]["dice"]["mean"] == pytest.approx(4 / 7)
    assert [(b["n_hit"], b["n_true"]) for b in combo["size_bins"]] == HAND_BINS
    assert combo["size_bins"][0]["sensitivity"] == pytest.approx(2 / 5)
    assert combo["size_bins"][3]["sensitivity"] is None
    assert outputs["doc"]["dataset"]["count_groups"] == {"0": 1, "1-3": 1, "4-10": 1, ">10": 0}
    assert outputs["doc"]["dataset"]["n_lesions"] == 7


def test_froc_points(outputs):
    combo = outputs["doc"]["models"]["model"]["combinations"]["as-acquired"]
    assert [p["threshold"] for p in combo["froc"]] == list(FROC_THRESHOLDS)
    for p in combo["froc"]:
        sens, fp = hand_froc(p["threshold"])
        assert (p["lesion_sensitivity"], p["fp_per_patient"]) == (pytest.approx(sens), pytest.approx(fp)), p
    assert combo["operating_point"] == {"threshold": THRESHOLD, "lesion_sensitivity": pytest.approx(4 / 7),
                                        "fp_per_patient": pytest.approx(4 / 3)}
    # the same from evaluate_case at thresholds of one's choice
    evals = [evaluate_case(p, c, THRESHOLD, model="m", combination="x", roles=ROLES, froc_thresholds=(0.25, 0.6, 1.0))
             for c, p in outputs["cases"]]
    assert [(q["lesion_sensitivity"], q["fp_per_patient"]) for q in froc_points(evals, (0.25, 0.6, 1.0))] == [
        pytest.approx(hand_froc(t)) for t in (0.25, 0.6, 1.0)]


def test_pooled_roc_and_youden_point(outputs):
    roc = outputs["doc"]["models"]["model"]["combinations"]["as-acquired"]["roc"]
    scores = np.concatenate([p[c.brain > 0] for c, p in outputs["cases"]])
    labels = np.concatenate([c.label[c.brain > 0] > 0 for c, _ in outputs["cases"]])
    assert roc["auc"] == pytest.approx(roc_auc(scores, labels), rel=1e-12)
    # by hand: 0.25 gives sens 87/164 (a's 85 + c's 2), spec 1 - 14/(1136 + 1296 + 1292 - 0) counted per case
    n_neg = 1136 + 1296 + 1292
    assert roc["youden"]["threshold"] == 0.25
    assert roc["youden"]["sensitivity"] == pytest.approx(87 / 164)
    assert roc["youden"]["specificity"] == pytest.approx((n_neg - 13 - 10 - 1) / n_neg)
    assert (roc["youden"]["threshold"], roc["youden"]["sensitivity"], roc["youden"]["specificity"]) == \
        pytest.approx(youden_threshold(scores, labels))


def test_cases_csv(outputs):
    rows = list(csv.DictReader(outputs["paths"]["cases"].open()))
    assert [r["case_id"] for r in rows] == ["a", "b", "c"]
    a = rows[0]
    assert (a["model"], a["combination"], a["roles_given"]) == ("model", "as-acquired", ALL)
    assert float(a["dice"]) == pytest.approx(HAND["a"]["dice"])
    assert (a["hit_0_10mm3"], a["n_0_10mm3"], a["fp_10"]) == ("0", "1", "1")
    assert rows[1]["recall"] == "nan"


class _Html(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: dict[str, int] = {}
        self.images: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_data(self, data):
        self.text.append(data)


def test_html_report_is_self_contained_with_tables_and_images(outputs):
    parser = _Html()
    parser.feed(outputs["paths"]["html"].read_text())
    parser.close()
    text = " ".join(parser.text)
    for title in ("Summary (papers' layout)", "Voxel operating point and pooled ROC", "By number of lesions",
                  "Lesion sensitivity by lesion volume", "Worst cases (lowest Dice)", "Models", "Data set",
                  "ROC curves", "Free-response ROC", "Dice, IoU and false positives per patient", "Signature"):
        assert title in text, title
    assert parser.tags["table"] >= 7
    # ROC, box plots, FROC and one overview per worst case, all embedded
    assert len(parser.images) == 3 + len(outputs["doc"]["worst_cases"]) == 6
    assert all(src.startswith("data:image/png;base64,") for src in parser.images)
    assert "1.2.3.4" in text and "planted 9.9.9" in text  # device UID, model name and version
    assert f"{statistics.mean(HAND[c]['dice'] for c in 'abc'):.3f}" in text


@pytest.mark.skipif(not shutil.which("pdftoppm"), reason="needs poppler-utils (make debian-tools)")
def test_pdf_converts_to_png_and_page_one_is_the_summary(outputs, tmp_path):
    pdf = outputs["paths"]["pdf"]
    subprocess.run(["pdftoppm", "-png", "-r", "50", "-f", "1", "-l", "1", str(pdf), str(tmp_path / "page")],
                   check=True, timeout=60)
    [png] = list(tmp_path.glob("page*.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    page1 = subprocess.run(["pdftotext", "-f", "1", "-l", "1", "-layout", str(pdf), "-"], check=True, timeout=60,
                           capture_output=True, text=True).stdout
    assert "Summary (papers' layout)" in page1
    assert "AUC" in page1 and "Dice" in page1
    dice = [HAND[c]["dice"] for c in "abc"]
    assert f"{statistics.mean(dice):.3f} +/- {statistics.stdev(dice):.3f}" in page1
    pages = subprocess.run(["pdfinfo", str(pdf)], check=True, timeout=60, capture_output=True, text=True).stdout
    assert int(next(ln.split()[-1] for ln in pages.splitlines() if ln.startswith("Pages:"))) >= 4
    assert not math.isnan(outputs["doc"]["models"]["model"]["combinations"]["as-acquired"]["roc"]["auc"])
