"""``dicom-node phantom``: generate synthetic MR brain-metastasis studies with their ground truth.

Register on the main app with ``app.command("phantom")(phantom)``; ``app`` below is the same command on its
own (tests drive it with ``typer.testing.CliRunner``). The generator and the writers (SimpleITK, pydicom,
numpy) are imported inside the command so that ``dicom-node --help`` stays fast.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from dicom_node.cli.exits import EXIT_USAGE, fail

if TYPE_CHECKING:
    from training.phantom.types import SyntheticStudy


FORMAT_CHOICES = ("dicom", "nifti")
RANDOM_VENDOR = "random"

LAYOUT_HELP = (
    "Output folder. Each study goes to OUT/case-<seed>-<vendor>/ (e.g. case-0000-ge) with: "
    "dicom/<SeriesNumber>_<SeriesDescription>/IM0001.dcm... (--format dicom) or "
    "nifti/<role>.nii.gz on the reference grid (--format nifti); "
    "truth/label.nii.gz (one value per lesion), truth/brain_mask.nii.gz and truth/lesions.json; "
    "preview.png with --preview. An existing case folder is replaced."
)


def _usage_error(message: str) -> typer.Exit:
    return fail(message, EXIT_USAGE)


def _parse_missing(values: list[str], known: tuple[str, ...]) -> list[str]:
    """Role names from repeated and/or comma-separated ``--missing`` values."""
    roles = [v.strip().lower() for value in values for v in value.split(",") if v.strip()]
    unknown = [r for r in roles if r not in known]
    if unknown:
        raise _usage_error(f"unknown role {unknown[0]!r} for --missing (choose from {', '.join(known)})")
    return roles


def _case_name(study: SyntheticStudy) -> str:
    return f"case-{study.seed:04d}-{study.vendor.value}"


def _write_case(study: SyntheticStudy, case_dir: Path, fmt: str, enhanced: bool, preview: bool) -> str:
    """Write one study in the documented layout; returns a one-line summary."""
    from training.phantom.dicom_writer import reference_series_uid, write_dicom_study
    from training.phantom.nifti_writer import write_nifti_study, write_truth

    if case_dir.exists():
        shutil.rmtree(case_dir)
    truth_dir = case_dir / "truth"
    if fmt == "dicom":
        files = write_dicom_study(study, case_dir / "dicom", enhanced=enhanced)
        write_truth(study, truth_dir, reference_series_uid=reference_series_uid(study, enhanced))
        written = f"{len(study.series)} series, {len(files)} files"
    else:
        paths = write_nifti_study(study, case_dir / "nifti", truth_dir=truth_dir)
        written = f"{sum(1 for k in paths if k in study.coregistered)} role images"
    if preview:
        from training.phantom.preview import render_preview

        render_preview(study, case_dir / "preview.png")
    return f"{case_dir}: {fmt}, {written}, {len(study.lesions)} lesions"


def phantom(
    out: Path = typer.Argument(..., metavar="OUT", file_okay=False, dir_okay=True, writable=True,
                               help=LAYOUT_HELP, show_default=False),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the first study; study i uses seed + i. "
                             "The same seed always gives the same study (pixels, truth and DICOM UIDs)."),
    count: int = typer.Option(1, "--count", min=1, help="Number of studies to generate."),
    vendor: str = typer.Option("random", "--vendor", metavar="[ge|siemens|philips|random]",
                               help="Scanner vendor whose header style the DICOM imitates; random picks one "
                               "per study from its seed."),
    missing: list[str] = typer.Option([], "--missing", metavar="ROLE",
                                      help="Leave this role's series out of the study (repeatable or "
                                      "comma-separated): t1_bravo_post, t1_cube_pre, t1_cube_post, flair."),
    enhanced: bool = typer.Option(False, "--enhanced", help="Write Enhanced MR Image Storage (one multi-frame "
                                  "file per acquired series) instead of classic one-file-per-slice MR; ADC and "
                                  "MPR series stay classic."),
    fmt: str = typer.Option("dicom", "--format", metavar="[dicom|nifti]",
                            help="dicom: every series as the scanner would send it (for the node). nifti: the "
                            "role images co-registered on the reference grid (for training)."),
    preview: bool = typer.Option(False, "--preview", help="Also render preview.png (role images with lesion "
                                 "outlines) per study."),
    voxel_mm: float = typer.Option(None, "--voxel-mm",
                                   help="Voxel size in mm of the generated series (default: the generator's "
                                   "realistic protocol resolutions). 3 is quick, for tests.",
                                   show_default=False),
    distractors: bool = typer.Option(True, "--distractors/--no-distractors",
                                     help="Include distractor series (localizer, DWI, ADC, MPR) next to the "
                                     "four roles."),
) -> None:
    """Generate synthetic multi-sequence MR brain-metastasis studies (DICOM or NIfTI) with ground truth.

    Exit codes: 0 done, 1 generation or writing failed, 2 bad arguments.
    """
    from training.phantom.types import ROLES, Vendor

    vendors = (*(v.value for v in Vendor), RANDOM_VENDOR)
    vendor_value = vendor.strip().lower()
    if vendor_value not in vendors:
        raise _usage_error(f"unknown vendor {vendor!r} for --vendor (choose from {', '.join(vendors)})")
    fmt_value = fmt.strip().lower()
    if fmt_value not in FORMAT_CHOICES:
        raise _usage_error(f"unknown format {fmt!r} for --format (choose from {', '.join(FORMAT_CHOICES)})")
    roles = _parse_missing(missing, ROLES)
    if voxel_mm is not None and not voxel_mm > 0:
        raise _usage_error(f"--voxel-mm must be > 0 mm, got {voxel_mm}")
    if enhanced and fmt_value != "dicom":
        raise _usage_error("--enhanced only applies to --format dicom")

    from tqdm import tqdm

    from training.phantom.generate import generate_study

    out.mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(count), desc="phantom studies", unit="study", file=sys.stderr):
        try:
            study = generate_study(seed + i, vendor=None if vendor_value == RANDOM_VENDOR else vendor_value,
                                   missing=roles, voxel_mm=voxel_mm, distractors=distractors)
            summary = _write_case(study, out / _case_name(study), fmt_value, enhanced, preview)
        except (OSError, ValueError) as exc:
            raise fail(f"study with seed {seed + i}: {exc}") from None
        tqdm.write(summary, file=sys.stdout)


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command("phantom")(phantom)
