"""Synthetic multi-sequence MR brain-metastasis studies (anatomy, lesions, vessels, MR contrast, acquisition)."""

from training.phantom.generate import generate_study, generate_study_with_tissues
from training.phantom.preview import render_preview
from training.phantom.types import (
    ROLES,
    LesionTruth,
    PatientInfo,
    Plane,
    SeriesKind,
    SyntheticSeries,
    SyntheticStudy,
    Vendor,
)

__all__ = [
    "ROLES",
    "LesionTruth",
    "PatientInfo",
    "Plane",
    "SeriesKind",
    "SyntheticSeries",
    "SyntheticStudy",
    "Vendor",
    "generate_study",
    "generate_study_with_tissues",
    "render_preview",
]
