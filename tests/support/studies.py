"""Small synthetic studies for the tests: 3 mm GE phantoms whose lesions the known model (``known_model``) finds."""

from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

from training.phantom import generate_study
from training.phantom.dicom_writer import plan_study, write_dicom_study
from training.phantom.types import SeriesKind


def lesion_study(seed: int, missing: tuple[str, ...] = (), blank_lesions: bool = False):
    """A 3 mm GE phantom whose t1_cube_pre is the reference with the lesions zeroed (``blank_lesions``: the
    reference itself has its lesions removed too, i.e. a study without lesions)."""
    study = generate_study(seed, vendor="ge", voxel_mm=3.0, distractors=False, missing=missing)
    ref = study.series_of(study.reference_kind)
    keep = sitk.Cast(study.label == 0, ref.image.GetPixelID())
    pre = study.series_of(SeriesKind.T1_CUBE_PRE)
    if blank_lesions:
        ref.image = ref.image * keep
        pre.image = sitk.Image(ref.image)
    else:
        pre.image = ref.image * keep
    pre.plane = ref.plane
    return study


def write_study(study, out: Path) -> dict[str, list[Path]]:
    write_dicom_study(study, out)
    plan = plan_study(study)
    return {study.series[sp.index].kind.value: sorted((out / sp.folder).glob("*.dcm")) for sp in plan.series}
