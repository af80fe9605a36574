"""DICOM outputs of the pipeline: a BINARY SEG of the lesions, a TID 1500 Comprehensive 3D SR and, optionally, a
Secondary Capture series of key images with the lesions' outlines burned in (for viewers without SEG support).

Public API::

    from pipeline.dicom_out import AlgorithmInfo, write_seg, write_sr, write_sc, ordered_sources

``write_seg`` raises ``ValueError`` for zero lesions: then only the SR is written (lesion count 0).
"""

from pipeline.dicom_out.common import AlgorithmInfo, ordered_sources, source_frame_positions
from pipeline.dicom_out.sc import write_sc
from pipeline.dicom_out.seg import segment_label, tracking_id, write_seg
from pipeline.dicom_out.sr import write_sr

__all__ = [
    "AlgorithmInfo",
    "ordered_sources",
    "segment_label",
    "source_frame_positions",
    "tracking_id",
    "write_sc",
    "write_seg",
    "write_sr",
]
