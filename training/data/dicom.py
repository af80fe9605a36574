"""Cases from folders of DICOM series with ground truth, read and registered exactly as at inference::

    <root>/<case>/...                   the case's DICOM files, any nesting, several series (as a scanner sends)
    <root>/<case>/truth/label.nii.gz    lesion mask (non-zero = lesion; .nii also accepted), any grid of the
                                        study's frame of reference (scanner LPS coordinates)
        or a DICOM SEG anywhere in <case>   Segmentation Storage; all segments merged into one lesion mask
    <root>/<case>/truth/brain_mask.nii.gz   optional brain mask, same convention as the label

Exactly one truth per case: a case with both forms, several SEGs or none is a :class:`CaseError`.

Which series plays which role is not decided here: the caller passes ``assign_roles`` (case folder -> role ->
the files of the series chosen for it; the DICOM node builds it from its series rules,
``dicom_node.cli.roles_for_training``). The case is then built like :func:`pipeline.study.run_study` does:
every role's series loaded (:func:`pipeline.io.load_series`), one study checked, the reference chosen
(:func:`pipeline.roles.choose_reference`) and every other series rigidly registered to it
(:func:`pipeline.registration.register_study`); the :class:`Case` carries the transforms.

The case id is the folder name; messages name the case, series and study UIDs, never patient data.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.uid import SegmentationStorage

from pipeline.io import group_files, load_series
from pipeline.registration import register_study
from pipeline.roles import choose_reference
from pipeline.study import check_one_study
from training.data.cache import CaseSource, file_fingerprint
from training.data.case import Case, CaseError
from training.data.nifti import find_image, read_image

__all__ = ["RoleAssigner", "dicom_sources", "find_dicom_cases", "load_dicom_case", "read_seg_mask"]

log = logging.getLogger(__name__)

RoleAssigner = Callable[[Path], Mapping[str, Sequence[Path]]]
"""Case folder -> role -> the files of the series chosen for that role; raises :class:`CaseError` (one line
naming the case) when it cannot assign the folder."""

_FRACTION = 0.5  # a FRACTIONAL SEG voxel is lesion from this fraction on (BINARY voxels are 0 or 1)


def find_dicom_cases(root: str | Path) -> list[Path]:
    """The case folders: the sub-folders of ``root`` that hold at least one file, sorted by name (hidden folders,
    such as a cache, are skipped)."""
    root = Path(root)
    if not root.is_dir():
        raise CaseError(f"{root}: not a folder")
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and any(f.is_file() for f in p.rglob("*")))


def read_seg_mask(path: Path, case_id: str) -> sitk.Image:
    """The union of all segments of the DICOM SEG at ``path`` as a uint8 0/1 image in LPS mm.

    highdicom places every frame by its Plane Position (frames need not cover every source slice: empty ones
    are usually omitted; the slice step is the SEG's SpacingBetweenSlices, else the smallest gap between
    frames), so the mask lies where it was drawn whatever series it was drawn on."""
    try:
        seg = hd.seg.segread(path)
        volume = seg.get_volume()  # (slice, row, column, segment), frames placed by position
    except (ValueError, RuntimeError) as exc:  # not a SEG, or frames that form no regular stack
        raise CaseError(f"case {case_id}: cannot read the SEG {path.name}: {exc}") from None
    mask = np.asarray((np.asarray(volume.array) >= _FRACTION).any(axis=-1))
    return volume.with_array(mask.astype(np.uint8), channels={}).to_simpleitk()


def _truth_label(folder: Path, series: Mapping[str, Sequence[Path]], case_id: str) -> sitk.Image:
    """The one ground truth of the case: ``truth/label.nii.gz`` or the one SEG file among ``series``
    (SeriesInstanceUID -> files, :func:`pipeline.io.group_files`)."""
    segs = [p for files in series.values()
            if str(pydicom.dcmread(files[0], stop_before_pixels=True).SOPClassUID) == SegmentationStorage
            for p in files]
    nifti = find_image(folder / "truth", "label")
    found = len(segs) + (nifti is not None)
    if found != 1:
        raise CaseError(f"case {case_id}: needs exactly one ground truth, truth/label.nii.gz or one DICOM SEG "
                        f"in the case folder; found {found}")
    return read_image(nifti, case_id) if nifti is not None else read_seg_mask(segs[0], case_id)


def load_dicom_case(folder: str | Path, assign_roles: RoleAssigner) -> Case:
    """Read, register and label one case folder (see the module doc)."""
    folder = Path(folder)
    case_id = folder.name
    files = {role: list(paths) for role, paths in assign_roles(folder).items() if paths}
    if not files:
        raise CaseError(f"case {case_id}: no series was assigned a role")
    label = _truth_label(folder, group_files(folder), case_id)
    try:
        reference = choose_reference(files)
        loaded = {role: load_series(paths) for role, paths in files.items()}
        study_uid = check_one_study(loaded)
    except ValueError as exc:  # an unknown role name, SeriesLoadError, StudyError: one line naming UIDs
        raise CaseError(f"case {case_id}: {exc}") from None
    images = {role: s.image for role, s in loaded.items()}
    registrations = register_study(images, reference_role=reference)
    for r in registrations.values():
        if r.warning:  # the series stays in scanner coordinates, as at inference
            log.warning("case %s (study %s): %s", case_id, study_uid, r.warning)
    brain_path = find_image(folder / "truth", "brain_mask")
    return Case(
        case_id=case_id,
        reference_role=reference,
        images=images,
        label=label,
        brain_mask=read_image(brain_path, case_id) if brain_path is not None else None,
        transforms={role: r.transform for role, r in registrations.items() if role != reference},
        source=f"dicom:{folder}",
    )


def dicom_sources(root: str | Path, assign_roles: RoleAssigner, *, assignment_key: str = "") -> list[CaseSource]:
    """A :class:`CaseSource` per case folder under ``root`` (:func:`find_dicom_cases`); nothing is read yet.

    The fingerprint covers every file of the case folder and ``assignment_key``, a string identifying how
    ``assign_roles`` decides (e.g. a hash of the rules): change the rules and the cached cases are rebuilt."""
    out = []
    for folder in find_dicom_cases(root):
        fingerprint = file_fingerprint([p for p in folder.rglob("*") if p.is_file()])
        if assignment_key:
            fingerprint = hashlib.sha256(f"{fingerprint}\0{assignment_key}".encode()).hexdigest()[:16]
        out.append(CaseSource(case_id=folder.name, kind="dicom", path=folder.resolve(), fingerprint=fingerprint,
                              load=partial(load_dicom_case, folder, assign_roles)))
    return out
