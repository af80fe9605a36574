"""Secondary Capture key images of the lesions, for PACS viewers that cannot show a DICOM SEG (issue #18).

One new series in the study, RGB Secondary Capture Image Storage, optional (``outputs.secondary_capture``):

* instance 1, the **summary**: the overview picture (:func:`pipeline.overview.draw_overview`: the largest
  lesions outlined, counts, threshold and model), given to :func:`write_sc` as an RGB array;
* instance n + 1, the **key image of lesion n** (n = 1..N, by decreasing volume; at most
  :data:`MAX_KEY_IMAGES`): the reference series' frame where the lesion's in-plane diameter is longest
  (:attr:`pipeline.lesions.InPlaneDiameter.slice_index`), in that frame's own pixel grid (the reference's rows x
  columns and pixel spacing, greys windowed to the study), with the outline (its boundary pixels) of every lesion
  on that frame burned in: the key lesion yellow, the others red, each numbered beside its outline; a white
  caption (``"Met 3 - 0.42 mL, longest 9.1 mm"``, the reference image it was drawn from) and ``RESEARCH USE
  ONLY - NOT FOR DIAGNOSIS`` at the top and bottom edges (swapped when a lesion lies under the top one); the
  outlines are painted last, so no text hides them. Captions are 1/32 of the rows high (8 px at least):
  legible from about 256 rows, clipped on smaller images.

Never mistakable for acquired images: Image Type ``DERIVED\\SECONDARY\\OTHER``, Burned In Annotation ``YES``,
Conversion Type ``WSD``, Series Description :data:`SC_SERIES_DESCRIPTION`, the algorithm as Contributing
Equipment, and each instance's Source Image Sequence naming the reference instance (and frame) it was derived
from (purpose DCM 121322), Derivation Code DCM 113076 "Segmentation". Patient and study attributes are copied
from the reference series by highdicom.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from pipeline.dicom_out import common
from pipeline.dicom_out.seg import segment_label
from pipeline.lesions import Lesion, LesionResult
from pipeline.overview import display_window, figure_rgb, pyplot

__all__ = ["DEFAULT_SC_SERIES_NUMBER", "KEY_COLOUR", "MAX_KEY_IMAGES", "OTHER_COLOUR", "SC_SERIES_DESCRIPTION",
           "key_image_pixels", "write_sc"]

DEFAULT_SC_SERIES_NUMBER = 9903
#: Key images beyond this many lesions (the smallest ones) are not written: a model that finds hundreds of
#: specks must not flood the PACS. The summary's comment says when lesions were left out.
MAX_KEY_IMAGES = 100
SC_SERIES_DESCRIPTION = f"{common.research_description('outlines')} - NOT FOR DIAGNOSIS"
NOT_FOR_DIAGNOSIS = f"{common.RESEARCH_USE} - NOT FOR DIAGNOSIS"
KEY_COLOUR = (255, 255, 0)  # the key image's lesion (yellow, as in overview.png)
OTHER_COLOUR = (255, 0, 0)  # the other lesions on the same frame (red)

_DPI = 100  # matplotlib draws the captions at 1 figure pixel = 1 image pixel
_MIN_FONT_PX = 8  # captions below this many pixels are unreadable
_FONT_FRACTION = 1 / 32  # caption height as a fraction of the image rows (16 px on a 512-row image)


@dataclass(frozen=True)
class _Text:
    x: float  # column (pixel centre coordinates)
    y: float  # row
    text: str
    colour: tuple[int, int, int]
    ha: str = "left"
    va: str = "top"


def _outline(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a 2D mask (its pixels with a 4-neighbour outside it or on the image border)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _code(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning)


def _paint_outlines(rgb: np.ndarray, labels: np.ndarray, key: int) -> np.ndarray:
    """``rgb`` with the outline of lesion ``key`` in :data:`KEY_COLOUR` and of every other label of ``labels``
    in :data:`OTHER_COLOUR` (in place; returned)."""
    for number in np.unique(labels[labels > 0]).tolist():
        rgb[_outline(labels == number)] = KEY_COLOUR if number == key else OTHER_COLOUR
    return rgb


def key_image_pixels(grey: np.ndarray, labels: np.ndarray, key: int, window: tuple[float, float]) -> np.ndarray:
    """(rows, columns, 3) uint8: ``grey`` (one frame, any real type) windowed to ``window`` (low, high), the
    outline of lesion ``key`` in :data:`KEY_COLOUR` and of every other label of ``labels`` (same shape, 0 =
    background) in :data:`OTHER_COLOUR`. No text: see :func:`write_sc`."""
    lo, hi = window
    scaled = np.clip((np.asarray(grey, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)
    rgb = np.repeat(np.rint(scaled * 255).astype(np.uint8)[..., None], 3, axis=2)
    return _paint_outlines(rgb, labels, key)


def _font_px(rows: int) -> float:
    return max(_MIN_FONT_PX, rows * _FONT_FRACTION)


def _burn_in(rgb: np.ndarray, texts: Sequence[_Text]) -> np.ndarray:
    """``rgb`` with ``texts`` drawn on it (each in its colour on a translucent black box), same size."""
    plt = pyplot()
    rows, cols = rgb.shape[:2]
    font_pt = _font_px(rows) * 72.0 / _DPI
    fig = plt.figure(figsize=(cols / _DPI, rows / _DPI), dpi=_DPI)
    try:
        ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
        ax.set_axis_off()
        ax.imshow(rgb, interpolation="none")
        ax.set_xlim(-0.5, cols - 0.5)
        ax.set_ylim(rows - 0.5, -0.5)
        for t in texts:
            ax.text(t.x, t.y, t.text, color=np.asarray(t.colour) / 255.0, fontsize=font_pt, ha=t.ha, va=t.va,
                    clip_on=True, bbox={"facecolor": "black", "alpha": 0.6, "pad": 1.0, "linewidth": 0})
        out = figure_rgb(fig)
    finally:
        plt.close(fig)
    if out.shape != rgb.shape:
        raise RuntimeError(f"captions drawn at {out.shape[:2]}, not the image's {rows} x {cols}")
    return out


def _captions(labels: np.ndarray, caption: str, lines: int) -> list[_Text]:
    """The caption (``lines`` lines) at the top and the disclaimer at the bottom, swapped when a lesion lies
    under the caption's band and not under the disclaimer's: text is never drawn where it need not hide one."""
    rows = labels.shape[0]
    band = int(np.ceil(_font_px(rows) * 1.4 * lines)) + 2
    top_free = not labels[:band].any()
    bottom_free = not labels[rows - band:].any()
    caption_on_top = top_free or not bottom_free
    white = (255, 255, 255)
    if caption_on_top:
        return [_Text(1, 1, caption, white), _Text(1, rows - 2, NOT_FOR_DIAGNOSIS, white, va="bottom")]
    return [_Text(1, 1, NOT_FOR_DIAGNOSIS, white), _Text(1, rows - 2, caption, white, va="bottom")]


def _number_labels(labels: np.ndarray, key: int) -> list[_Text]:
    """Each lesion's number just right of (or, at the right edge, left of) its outline's top."""
    texts = []
    cols = labels.shape[1]
    for number, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        top, left, right = box[0].start, box[1].start, box[1].stop - 1
        colour = KEY_COLOUR if number == key else OTHER_COLOUR
        if right + 2 < cols * 0.85:
            texts.append(_Text(right + 2, top, str(number), colour, ha="left", va="bottom"))
        else:
            texts.append(_Text(left - 2, top, str(number), colour, ha="right", va="bottom"))
    return texts


def _source_item(source: Dataset, frames: Sequence[int] | None) -> Dataset:
    """Source Image Sequence item: ``source`` (1-based ``frames`` of a multi-frame instance)."""
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frames is not None:
        item.ReferencedFrameNumber = list(frames) if len(frames) > 1 else frames[0]
    item.PurposeOfReferenceCodeSequence = [_code(common.SOURCE_FOR_PROCESSING)]
    return item


def _sources_of(sources: Sequence[Dataset], frames: Sequence[int]) -> list[Dataset]:
    """Source Image Sequence of the 0-based source ``frames``: one item per classic instance, or one item
    listing the frames of the single multi-frame instance."""
    if len(sources) == 1 and common.source_frame_positions(sources).shape[0] > 1:
        return [_source_item(sources[0], [f + 1 for f in frames])]
    return [_source_item(sources[f], None) for f in frames]


def _frame_name(sources: Sequence[Dataset], frame: int) -> str:
    """How a viewer finds the frame: the classic instance's Instance Number, or the multi-frame's frame."""
    if len(sources) == 1 and common.source_frame_positions(sources).shape[0] > 1:
        return f"frame {frame + 1}"
    number = sources[frame].get("InstanceNumber")
    return f"image {number}" if number is not None else f"slice {frame + 1}"


def _mark_derived(sc: Dataset, description: str, comment: str, source_items: list[Dataset]) -> None:
    sc.BurnedInAnnotation = "YES"
    sc.ConversionType = "WSD"  # made by a workstation (the node), not digitised
    sc.DerivationDescription = description[:1024]
    sc.DerivationCodeSequence = [_code(common.DERIVATION_SEGMENTATION)]
    sc.SourceImageSequence = source_items
    sc.ImageComments = comment[:10240]


def write_sc(
    source_datasets: Sequence[Dataset],
    image: sitk.Image,
    lesions: LesionResult,
    algorithm: common.AlgorithmInfo,
    *,
    summary: np.ndarray,
    series_number: int = DEFAULT_SC_SERIES_NUMBER,
    series_description: str = SC_SERIES_DESCRIPTION,
) -> list[Dataset]:
    """The Secondary Capture series of ``lesions``: the summary (instance 1), then one key image per lesion.

    ``source_datasets``: the reference series as for :func:`pipeline.dicom_out.seg.write_seg` (headers
    suffice). ``image``: the reference volume (grey values, the grid of ``lesions.labels``). ``summary``:
    (rows, columns, 3) uint8 RGB, e.g. :func:`pipeline.overview.figure_rgb` of the overview. Raises
    ``ValueError`` when the frames do not lie on the label grid. New Series/SOP Instance UIDs on every call.
    """
    if image.GetSize() != lesions.labels.GetSize():
        raise ValueError(f"image {image.GetSize()} and labels {lesions.labels.GetSize()} differ in size")
    summary = np.asarray(summary)
    if summary.ndim != 3 or summary.shape[2] != 3 or summary.dtype != np.uint8:
        raise ValueError(f"summary must be (rows, columns, 3) uint8 RGB, got {summary.shape} {summary.dtype}")
    sources = list(source_datasets)
    slice_of_frame = common.source_frame_slices(lesions.labels, sources)
    frame_of_slice = {int(k): f for f, k in enumerate(slice_of_frame)}
    grey = sitk.GetArrayFromImage(image)
    labels = sitk.GetArrayFromImage(lesions.labels)
    window = display_window(grey)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    row_dir, col_dir, _ = hd.spatial.get_closest_patient_orientation(direction)
    spacing = image.GetSpacing()
    series_uid = generate_uid()
    equipment = common.contributing_equipment(algorithm)
    shown = lesions.lesions[:MAX_KEY_IMAGES]

    def new_instance(pixels: np.ndarray, number: int, orientation: tuple[str, str],
                     pixel_spacing: tuple[float, float] | None) -> Dataset:
        sc: Dataset = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=sources[0], pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
            coordinate_system="PATIENT", series_instance_uid=series_uid, series_number=series_number,
            sop_instance_uid=generate_uid(), instance_number=number, manufacturer=algorithm.manufacturer,
            patient_orientation=orientation,
            pixel_spacing=pixel_spacing,  # type: ignore[arg-type]  # annotated tuple[int, int]; mm are floats
            transfer_syntax_uid=ExplicitVRLittleEndian, contributing_equipment=equipment)
        sc.SeriesDescription = series_description
        # General Series' Laterality is Type 2C, for paired body parts: a body part (the source's, else the
        # head: the node reads brain MR) says that it is absent for a reason.
        sc.BodyPartExamined = sources[0].get("BodyPartExamined") or "HEAD"
        sc.ManufacturerModelName = algorithm.model
        sc.SoftwareVersions = algorithm.software_versions
        return sc

    left_out = len(lesions.lesions) - len(shown)
    note = f"; key images of the {len(shown)} largest only" if left_out else ""
    first = new_instance(summary, 1, ("L", "P"), None)  # the overview's panels: radiological axial views
    _mark_derived(
        first, f"Summary of {algorithm.name} {algorithm.version}: lesions outlined on the reference series",
        f"Summary: {lesions.count_all} lesion(s), total {lesions.total_volume_mm3 / 1000.0:.2f} mL{note}. "
        f"{NOT_FOR_DIAGNOSIS}", _sources_of(sources, sorted(frame_of_slice.values())))
    out = [first]
    for lesion in shown:
        out.append(_key_image(lesion, grey, labels, window, frame_of_slice, sources, algorithm,
                              lambda px, n: new_instance(px, n, (row_dir.value, col_dir.value),
                                                         (float(spacing[1]), float(spacing[0])))))
    return out


def _key_image(lesion: Lesion, grey: np.ndarray, labels: np.ndarray, window: tuple[float, float],
               frame_of_slice: dict[int, int], sources: Sequence[Dataset], algorithm: common.AlgorithmInfo,
               new_instance: Callable[[np.ndarray, int], Dataset]) -> Dataset:
    """The key image of ``lesion`` on its longest in-plane diameter's frame."""
    z = lesion.in_plane.slice_index
    frame = frame_of_slice[z]
    frame_labels = labels[z]
    caption = f"{segment_label(lesion)}, longest {lesion.in_plane.long_axis_mm:.1f} mm"
    where = f"reference {_frame_name(sources, frame)}"
    pixels = _burn_in(key_image_pixels(grey[z], frame_labels, lesion.number, window),
                      [*_captions(frame_labels, f"{caption}\n{where}", 2),
                       *_number_labels(frame_labels, lesion.number)])
    # the outlines again, over any text that reached them: a caption never hides where a lesion ends
    _paint_outlines(pixels, frame_labels, lesion.number)
    sc = new_instance(pixels, lesion.number + 1)
    _mark_derived(sc, f"Outlines of the lesions found by {algorithm.name} {algorithm.version} burned into the "
                      f"reference image", f"{caption}; {where}. {NOT_FOR_DIAGNOSIS}",
                  _sources_of(sources, [frame]))
    return sc
