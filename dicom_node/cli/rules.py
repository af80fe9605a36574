"""``dicom-node rules``: try the series rules on exported studies before going live.

Only UIDs, series numbers, descriptions and decisions are printed: never patient names, IDs,
birth dates or file paths (folder names of exports often carry the patient name).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from dicom_node.cli.exits import EXIT_USAGE, fail
from dicom_node.headers import SeriesFeatures, scan_directory
from dicom_node.rules import RulesError, RuleSet, StudyAssignment, assign_studies, default_rules_path, load_rules

app = typer.Typer(
    help="Test the series rules (config/series_rules.yaml) on DICOM files: which series gets which role, and why.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _rules() -> None:
    """Series rules: recognise the series the model needs from their DICOM headers."""


@app.command("test")
def test(
    directory: Path = typer.Argument(
        ...,
        exists=True,
        file_okay=False,
        dir_okay=True,
        readable=True,
        help="Folder with DICOM files (searched recursively; any file name, GE files have no extension).",
    ),
    rules_file: Path = typer.Option(
        None,
        "--rules",
        "-r",
        help="Rules YAML to test (default: config/series_rules.yaml shipped with the node).",
        show_default=False,
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the decisions as JSON instead of text."),
) -> None:
    """Print, per study, every series with the role it got (or why it got none) and the rule that decided.

    Exit codes: 0 done, 1 no DICOM under DIRECTORY, 2 bad usage or unreadable rules file.
    """
    try:
        rules = load_rules(rules_file if rules_file is not None else default_rules_path())
    except RulesError as exc:
        raise fail(str(exc), EXIT_USAGE) from None
    series = scan_directory(directory)
    if not series:
        raise fail(f"no DICOM files found under {directory}")
    studies = assign_studies(series, rules)
    if as_json:
        typer.echo(json.dumps(_as_json(rules, series, studies), indent=2))
    else:
        typer.echo(_as_text(rules, series, studies), nl=False)


def _as_json(rules: RuleSet, series: list[SeriesFeatures], studies: list[StudyAssignment]) -> dict[str, object]:
    counts = {f.series_instance_uid: (f.n_instances, f.n_slices) for f in series}
    out: list[dict[str, object]] = []
    for study in studies:
        d = study.to_dict()
        for dec in d["decisions"]:
            n_instances, n_slices = counts[dec["series_instance_uid"]]
            dec["n_instances"] = n_instances
            dec["n_slices"] = n_slices
        out.append(d)
    return {"rules": rules.source, "studies": out}


def _as_text(rules: RuleSet, series: list[SeriesFeatures], studies: list[StudyAssignment]) -> str:
    by_uid = {f.series_instance_uid: f for f in series}
    lines = [f"rules: {rules.source}", ""]
    for study in studies:
        lines.append(f"study {study.study_instance_uid} ({len(study.decisions)} series)")
        for role in rules.roles:
            choice = study.chosen.get(role)
            if choice is None:
                lines.append(f"  {role:<14} MISSING")
            else:
                lines.append(
                    f"  {role:<14} <- '{choice.series_description}' {choice.series_instance_uid} ({choice.reason})"
                )
        lines.append("")
        for d in study.decisions:
            f = by_uid[d.series_instance_uid]
            number = f"#{d.series_number}" if d.series_number is not None else "#?"
            lines.append(
                f"  {number:<7} '{d.series_description}'  {d.series_instance_uid}  "
                f"[{f.n_instances} files, {f.n_slices} positions]"
            )
            lines.append(f"          role: {d.role or '-'}   decided by: {d.matcher}")
            if d.contrast:
                lines.append(f"          contrast: {d.contrast} ({d.contrast_evidence})")
            lines.append(f"          {d.reason}")
        lines.append("")
    return "\n".join(lines)
