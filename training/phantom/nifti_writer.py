"""Write the ground truth of a :class:`SyntheticStudy`, and the co-registered NIfTI form of the study.

SimpleITK's ``WriteImage`` converts the LPS geometry of the images into the RAS affine NIfTI stores, so every
file here has the same physical geometry as the DICOM series it belongs to. Lesion centroids in
``lesions.json`` stay in DICOM LPS millimetres (the convention of the whole phantom).
"""

from __future__ import annotations

import json
from pathlib import Path

import SimpleITK as sitk

from training.phantom.types import ROLES, LesionTruth, SyntheticStudy

LABEL_FILE = "label.nii.gz"
BRAIN_MASK_FILE = "brain_mask.nii.gz"
LESIONS_FILE = "lesions.json"

# Diameter bins (mm) of the size counts: small lesions are what the model finds hardest.
SIZE_BINS_MM: tuple[tuple[str, float, float], ...] = (
    ("lt_5mm", 0.0, 5.0),
    ("5_to_10mm", 5.0, 10.0),
    ("10_to_20mm", 10.0, 20.0),
    ("ge_20mm", 20.0, float("inf")),
)


def _write_image(image: sitk.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def _size_bin(diameter_mm: float) -> str:
    return next(name for name, lo, hi in SIZE_BINS_MM if lo <= diameter_mm < hi)


def _lesion_record(lesion: LesionTruth) -> dict[str, object]:
    return {
        "label": lesion.label,
        "kind": lesion.kind,
        "centroid_lps_mm": [round(float(c), 4) for c in lesion.centroid_lps_mm],
        "volume_mm3": round(float(lesion.volume_mm3), 4),
        "diameter_mm": round(float(lesion.diameter_mm), 4),
        "edema": bool(lesion.edema),
        "size_bin": _size_bin(lesion.diameter_mm),
    }


def lesions_document(study: SyntheticStudy, reference_series_uid: str | None = None) -> dict[str, object]:
    """The content of ``lesions.json``: study-level facts plus one record per lesion (LPS mm, mm^3)."""
    counts = {name: 0 for name, _, _ in SIZE_BINS_MM}
    for lesion in study.lesions:
        counts[_size_bin(lesion.diameter_mm)] += 1
    ref = study.label
    return {
        "seed": study.seed,
        "vendor": study.vendor.value,
        "reference_kind": study.reference_kind.value,
        "reference_series_instance_uid": reference_series_uid,
        "reference_grid": {
            "size_xyz": list(ref.GetSize()),
            "spacing_mm": [float(s) for s in ref.GetSpacing()],
            "origin_lps_mm": [float(o) for o in ref.GetOrigin()],
            "direction": [float(d) for d in ref.GetDirection()],
        },
        "roles_present": [role for role in ROLES if any(s.kind.value == role for s in study.series)],
        "lesion_count": len(study.lesions),
        "counts_by_size": counts,
        "lesions": [_lesion_record(lesion) for lesion in sorted(study.lesions, key=lambda les: les.label)],
    }


def write_truth(study: SyntheticStudy, out_dir: Path, reference_series_uid: str | None = None) -> dict[str, Path]:
    """Write ``label.nii.gz``, ``brain_mask.nii.gz`` (reference grid) and ``lesions.json`` into ``out_dir``.

    ``reference_series_uid`` is the SeriesInstanceUID of the reference series when DICOM was written.
    Returns ``{"label": ..., "brain_mask": ..., "lesions": ...}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "label": _write_image(study.label, out_dir / LABEL_FILE),
        "brain_mask": _write_image(study.brain_mask, out_dir / BRAIN_MASK_FILE),
        "lesions": out_dir / LESIONS_FILE,
    }
    paths["lesions"].write_text(json.dumps(lesions_document(study, reference_series_uid), indent=2) + "\n")
    return paths


def write_nifti_study(study: SyntheticStudy, out_dir: Path, truth_dir: Path | None = None) -> dict[str, Path]:
    """Write ``<role>.nii.gz`` for every role in ``study.coregistered`` plus the truth files.

    All images lie on the reference grid (the fast training format). Truth goes to ``truth_dir``
    (default: ``out_dir`` itself). Returns role names and ``label``/``brain_mask``/``lesions`` to paths.
    """
    out_dir = Path(out_dir)
    unknown = set(study.coregistered) - set(ROLES)
    if unknown:
        raise ValueError(f"coregistered images with unknown role names: {sorted(unknown)}")
    paths = {role: _write_image(study.coregistered[role], out_dir / f"{role}.nii.gz")
             for role in ROLES if role in study.coregistered}
    paths.update(write_truth(study, truth_dir if truth_dir is not None else out_dir))
    return paths
