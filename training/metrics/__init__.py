"""Evaluation metrics of the ILD method (``../shared/spec/ild-method.md``, "Threshold" and "Metrics").

* :mod:`training.metrics.voxel`: exact ROC curve / AUC, Youden threshold, voxel confusion ratios.
* :mod:`training.metrics.lesion`: 26-connected lesion detection, FP components, sensitivity by size, count groups.
* :mod:`training.metrics.patient`: all metrics of one patient, and mean +/- SD summaries over patients.
"""

from training.metrics.lesion import (
    COUNT_GROUPS,
    DEFAULT_SIZE_BINS_MM3,
    FP_MIN_VOLUME_MM3,
    LESION_5MM_VOLUME_MM3,
    LesionDetection,
    SizeBin,
    count_group,
    label_lesions,
    lesion_detection,
    lesion_sensitivity,
    sensitivity_by_size,
    validate_spacing,
    voxel_volume_mm3,
)
from training.metrics.patient import (
    SUMMARY_FIELDS,
    PatientMetrics,
    evaluate_patient,
    summarise,
)
from training.metrics.voxel import (
    VoxelCounts,
    as_bool,
    confusion,
    max_dice_threshold,
    roc_auc,
    roc_curve,
    youden_threshold,
)

__all__ = [
    "COUNT_GROUPS",
    "DEFAULT_SIZE_BINS_MM3",
    "FP_MIN_VOLUME_MM3",
    "LESION_5MM_VOLUME_MM3",
    "SUMMARY_FIELDS",
    "LesionDetection",
    "PatientMetrics",
    "SizeBin",
    "VoxelCounts",
    "as_bool",
    "confusion",
    "count_group",
    "evaluate_patient",
    "label_lesions",
    "lesion_detection",
    "lesion_sensitivity",
    "max_dice_threshold",
    "roc_auc",
    "roc_curve",
    "sensitivity_by_size",
    "summarise",
    "validate_spacing",
    "voxel_volume_mm3",
    "youden_threshold",
]
