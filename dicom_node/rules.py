"""Series rules engine: decide from headers alone which received series plays which role.

Pipeline (all pure functions except :func:`load_rules`):

1. exclusions  - localizers, derived/reformatted images, DWI/ADC, EPI, secondary captures, SR ...
2. family      - which kind of series it is (T1 GRE "BRAVO family", T1 FSE "CUBE family", FLAIR),
                 decided by the first family (in file order) that has a matching preset
3. contrast    - post / pre / unknown from ContrastBolusAgent or the Contrast/Bolus Usage Sequence,
                 then description/protocol keywords (negatives first), then acquisition order
                 among the study's series of the same family
4. role        - the role whose family and contrast state fit
5. selection   - several candidates for one role: the best score wins, the others record why they lost

The rules file format, the contrast policy and the score are documented in ``docs/rules.md`` and in
the comments of ``config/series_rules.yaml``.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)
from pydicom.uid import UID

from dicom_node.headers import SeriesFeatures
from dicom_node.paths import DEFAULT_RULES
from dicom_node.yaml_files import YamlFileError, load_yaml_model

POST, PRE, UNKNOWN = "post", "pre", "unknown"


class RulesError(YamlFileError):
    """A rules file that cannot be used; the message is one line naming the file and the key."""


# --------------------------------------------------------------------------- rules file schema


@functools.lru_cache(maxsize=4096)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


def _as_list(v: Any) -> Any:
    return [v] if isinstance(v, (str, int, float)) else v


def _check_patterns(patterns: list[str]) -> list[str]:
    for p in patterns:
        try:
            _regex(p)
        except re.error as exc:
            raise ValueError(f"invalid regular expression {p!r}: {exc}") from None
    return patterns


def _upper(values: list[str]) -> list[str]:
    return [str(v).upper() for v in values]


Patterns = Annotated[list[str], BeforeValidator(_as_list), AfterValidator(_check_patterns)]
Values = Annotated[list[str], BeforeValidator(_as_list), AfterValidator(_upper)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Codes(_Strict):
    """Coded multi-valued attribute test; a bare list is shorthand for ``any``."""

    any: Values = Field(default_factory=list)
    all: Values = Field(default_factory=list)
    none: Values = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"any": data} if isinstance(data, (list, str)) else data


class Range(_Strict):
    """Inclusive numeric range; a missing header value never satisfies a range."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.min is None and self.max is None:
            raise ValueError("a range needs min and/or max")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is greater than max {self.max}")
        return self


_TEXT_FIELDS = ("description", "protocol", "sequence", "names", "manufacturer")
_CODE_FIELDS = ("sop_class_uid", "scanning_sequence", "sequence_variant", "scan_options", "image_type")
_VALUE_FIELDS = ("mr_acquisition_type", "echo_pulse_sequence", "acquisition_contrast", "orientation")
_RANGE_FIELDS = (
    "inversion_time",
    "repetition_time",
    "echo_time",
    "flip_angle",
    "slice_thickness",
    "n_slices",
    "max_b_value",
)
_BOOL_FIELDS = ("inversion_recovery", "parallel_stack", "enhanced")


class Match(_Strict):
    """All given conditions must hold; ``any_of`` needs one branch to hold, ``not`` must not hold."""

    description: Patterns | None = None
    protocol: Patterns | None = None
    sequence: Patterns | None = None
    names: Patterns | None = None
    manufacturer: Patterns | None = None
    sop_class_uid: Codes | None = None
    scanning_sequence: Codes | None = None
    sequence_variant: Codes | None = None
    scan_options: Codes | None = None
    image_type: Codes | None = None
    mr_acquisition_type: Values | None = None
    echo_pulse_sequence: Values | None = None
    acquisition_contrast: Values | None = None
    orientation: Values | None = None
    inversion_time: Range | None = None
    repetition_time: Range | None = None
    echo_time: Range | None = None
    flip_angle: Range | None = None
    slice_thickness: Range | None = None
    n_slices: Range | None = None
    max_b_value: Range | None = None
    inversion_recovery: bool | None = None
    parallel_stack: bool | None = None
    enhanced: bool | None = None
    any_of: list[Match] | None = None
    all_of: list[Match] | None = None
    not_: Match | None = Field(default=None, alias="not")

    @model_validator(mode="after")
    def _not_empty(self) -> Match:
        if not any(getattr(self, name) is not None for name in type(self).model_fields):
            raise ValueError("an empty match would match every series; give at least one condition")
        if self.any_of is not None and not self.any_of:
            raise ValueError("any_of needs at least one branch")
        if self.all_of is not None and not self.all_of:
            raise ValueError("all_of needs at least one block")
        return self


class Preset(_Strict):
    """One vendor/naming convention that recognises a family."""

    name: str
    label: str = ""
    weight: float = 0.0
    allow_exclusions: list[str] = Field(default_factory=list)
    match: Match


class Family(_Strict):
    label: str
    default_contrast: Literal["pre", "unknown"] = "unknown"
    presets: list[Preset] = Field(min_length=1)


class Role(_Strict):
    family: str
    contrast: Literal["post", "pre", "any"]
    description: str = ""


class Exclusion(_Strict):
    name: str
    reason: str
    overridable: bool = True
    match: Match


KeywordField = Literal["series_description", "protocol_name"]
_KEYWORD_FIELDS: tuple[KeywordField, ...] = ("series_description", "protocol_name")


class ContrastPolicy(_Strict):
    use_agent: bool = True
    keyword_fields: list[KeywordField] = Field(default_factory=lambda: list(_KEYWORD_FIELDS))
    negative: Patterns = Field(default_factory=list)
    positive: Patterns = Field(default_factory=list)
    use_timing: bool = True


class Scoring(_Strict):
    three_d: float = 1000.0
    original: float = 500.0
    per_slice: float = 0.5
    max_slices_counted: int = Field(default=400, ge=0)
    per_mm_thinner: float = 20.0
    reference_thickness_mm: float = Field(default=6.0, gt=0)
    latest_post: float = 10.0


class RuleSet(_Strict):
    """A validated rules file."""

    version: Literal[1]
    roles: dict[str, Role]
    families: dict[str, Family]
    exclusions: list[Exclusion] = Field(default_factory=list)
    contrast: ContrastPolicy = Field(default_factory=ContrastPolicy)
    scoring: Scoring = Field(default_factory=Scoring)
    # Free-form place for YAML anchors (&name) reused in match blocks; the engine never reads it.
    definitions: dict[str, Any] = Field(default_factory=dict)
    source: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> RuleSet:
        if not self.roles:
            raise ValueError("roles: at least one role is needed")
        for name, role in self.roles.items():
            if role.family not in self.families:
                raise ValueError(
                    f"roles.{name}.family: unknown family {role.family!r}, expected one of {sorted(self.families)}"
                )
        names = [e.name for e in self.exclusions]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"exclusions: duplicate name(s) {dupes}")
        for fam_name, fam in self.families.items():
            preset_names = [p.name for p in fam.presets]
            if len(set(preset_names)) != len(preset_names):
                raise ValueError(f"families.{fam_name}.presets: duplicate preset names")
            for i, preset in enumerate(fam.presets):
                unknown = sorted(set(preset.allow_exclusions) - set(names))
                if unknown:
                    raise ValueError(
                        f"families.{fam_name}.presets.{i}.allow_exclusions: unknown exclusion(s) {unknown}, "
                        f"expected some of {names}"
                    )
        return self


def default_rules_path() -> Path:
    """The shipped rules file, ``config/series_rules.yaml`` beside the ``dicom_node`` package."""
    return DEFAULT_RULES


def load_rules(path: str | Path | None = None) -> RuleSet:
    """Read and validate a rules file; raise :class:`RulesError` with one clear line on any problem."""
    p = Path(path) if path is not None else default_rules_path()
    rules = load_yaml_model(p, RuleSet, what="rules file", reference="docs/rules.md", error=RulesError)
    return rules.model_copy(update={"source": str(p)})


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class SeriesDecision:
    """What the rules made of one series. ``role`` is None when it got no role; ``reason`` says why."""

    series_instance_uid: str
    study_instance_uid: str
    series_number: int | None
    series_description: str
    role: str | None
    candidate_role: str | None  # the role it qualified for (kept when it lost the selection)
    family: str | None
    preset: str | None
    matcher: str  # what decided: "exclusion:<name>", "<family>/<preset>" or "no rule"
    excluded_by: tuple[str, ...]
    contrast: str  # post / pre / unknown, "" when not evaluated (excluded or no family)
    contrast_evidence: str
    score: float | None
    score_detail: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class RoleChoice:
    role: str
    series_instance_uid: str
    series_description: str
    score: float
    score_detail: str
    reason: str


@dataclass(frozen=True)
class StudyAssignment:
    """Roles of one study: the chosen series per role and a decision for every series."""

    study_instance_uid: str
    chosen: dict[str, RoleChoice]
    decisions: tuple[SeriesDecision, ...]
    missing_roles: tuple[str, ...]

    def decision_for(self, series_instance_uid: str) -> SeriesDecision:
        for d in self.decisions:
            if d.series_instance_uid == series_instance_uid:
                return d
        raise KeyError(series_instance_uid)

    def to_dict(self) -> dict[str, Any]:
        return {
            "study_instance_uid": self.study_instance_uid,
            "chosen": {role: dataclasses.asdict(c) for role, c in self.chosen.items()},
            "missing_roles": list(self.missing_roles),
            "decisions": [d.to_dict() for d in self.decisions],
        }


# --------------------------------------------------------------------------- matching


def _text_values(field: str, f: SeriesFeatures) -> tuple[tuple[str, str], ...]:
    if field == "description":
        return (("series_description", f.series_description),)
    if field == "protocol":
        return (("protocol_name", f.protocol_name),)
    if field == "manufacturer":
        return (("manufacturer", f.manufacturer),)
    seq = (
        ("sequence_name", f.sequence_name),
        ("pulse_sequence_name", f.pulse_sequence_name),
        ("vendor_sequence_name", f.vendor_sequence_name),
    )
    if field == "sequence":
        return seq
    return (("series_description", f.series_description), ("protocol_name", f.protocol_name)) + seq


def _sop_label(uid: str) -> str:
    name = UID(uid).name if uid else ""
    return f"{uid} ({name})" if name and name != uid else uid or "(none)"


def evaluate(match: Match, f: SeriesFeatures) -> tuple[bool, tuple[str, ...]]:
    """Test one match block; return (matched, human-readable facts that decided it)."""
    facts: list[str] = []
    for field in _TEXT_FIELDS:
        patterns = getattr(match, field)
        if patterns is None:
            continue
        hit = next(
            (
                f"{name} '{text}' ~ /{p}/"
                for p in patterns
                for name, text in _text_values(field, f)
                if text and _regex(p).search(text)
            ),
            None,
        )
        if hit is None:
            return False, (f"{field} matches none of {patterns}",)
        facts.append(hit)
    for field in _CODE_FIELDS:
        codes: Codes | None = getattr(match, field)
        if codes is None:
            continue
        have = (f.sop_class_uid,) if field == "sop_class_uid" else tuple(getattr(f, field))
        shown = _sop_label(f.sop_class_uid) if field == "sop_class_uid" else "\\".join(have) or "(empty)"
        ok = (
            (not codes.any or any(c in have for c in codes.any))
            and all(c in have for c in codes.all)
            and not any(c in have for c in codes.none)
        )
        if not ok:
            return False, (f"{field} {shown} fails {_codes_text(codes)}",)
        facts.append(f"{field} {shown}")
    for field in _VALUE_FIELDS:
        values = getattr(match, field)
        if values is None:
            continue
        have_v = str(getattr(f, field)).upper()
        if have_v not in values:
            return False, (f"{field} '{have_v}' not in {values}",)
        facts.append(f"{field} {have_v}")
    for field in _RANGE_FIELDS:
        rng: Range | None = getattr(match, field)
        if rng is None:
            continue
        value = getattr(f, field)
        if rng.min is not None and rng.max is not None:
            bounds = f"in [{rng.min:g}, {rng.max:g}]"
        else:
            bounds = f">= {rng.min:g}" if rng.min is not None else f"<= {rng.max:g}"
        if value is None or (rng.min is not None and value < rng.min) or (rng.max is not None and value > rng.max):
            return False, (f"{field} {'missing' if value is None else f'{value:g}'} not {bounds}",)
        facts.append(f"{field} {value:g} {bounds}")
    for field in _BOOL_FIELDS:
        want = getattr(match, field)
        if want is None:
            continue
        if bool(getattr(f, field)) != want:
            return False, (f"{field} is {not want}",)
        facts.append(f"{field} {want}")
    if match.any_of is not None:
        branch_facts: list[str] = []
        for branch in match.any_of:
            ok, why = evaluate(branch, f)
            if ok:
                facts.extend(why)
                break
            branch_facts.extend(why)
        else:
            return False, ("any_of: " + "; ".join(branch_facts),)
    for block in match.all_of or ():
        ok, why = evaluate(block, f)
        if not ok:
            return False, why
        facts.extend(why)
    if match.not_ is not None:
        ok, why = evaluate(match.not_, f)
        if ok:
            return False, ("not: " + "; ".join(why),)
        if not facts:
            # Only worth reporting when the absence is the whole reason (e.g. "not an image SOP class").
            facts.append("not: " + "; ".join(why))
    return True, tuple(facts)


def _codes_text(codes: Codes) -> str:
    def short(values: list[str]) -> str:
        return "[" + ", ".join(values[:3]) + (", ..." if len(values) > 3 else "") + "]"

    parts = [f"{k} {short(v)}" for k, v in (("any", codes.any), ("all", codes.all), ("none", codes.none)) if v]
    return "{" + "; ".join(parts) + "}"


@dataclass(frozen=True)
class _Profile:
    """Per-series result of stages 1-3 before study context (internal)."""

    features: SeriesFeatures
    exclusions: tuple[tuple[Exclusion, tuple[str, ...]], ...]  # blocking, in rules order
    family: str | None
    preset: Preset | None
    preset_facts: tuple[str, ...]
    contrast: str
    contrast_evidence: str


def _profile(f: SeriesFeatures, rules: RuleSet) -> _Profile:
    matched: list[tuple[Exclusion, tuple[str, ...]]] = []
    for exc in rules.exclusions:
        ok, facts = evaluate(exc.match, f)
        if ok:
            matched.append((exc, facts))
    for fam_name, fam in rules.families.items():
        best: tuple[Preset, tuple[str, ...]] | None = None
        for preset in fam.presets:
            ok, facts = evaluate(preset.match, f)
            if not ok:
                continue
            if any(not e.overridable or e.name not in preset.allow_exclusions for e, _ in matched):
                continue
            if best is None or preset.weight > best[0].weight:
                best = (preset, facts)
        if best is not None:
            state, evidence = explicit_contrast(f, rules)
            return _Profile(f, (), fam_name, best[0], best[1], state, evidence)
    return _Profile(f, tuple(matched), None, None, (), "", "")


def explicit_contrast(f: SeriesFeatures, rules: RuleSet) -> tuple[str, str]:
    """Contrast state from the series' own headers: agent/usage first, then keywords (negatives first)."""
    policy = rules.contrast
    if policy.use_agent:
        if f.contrast_administered is True:
            return POST, "Contrast/Bolus Usage Sequence: agent administered"
        if f.contrast_agent:
            return POST, f"ContrastBolusAgent '{f.contrast_agent}'"
        if f.contrast_administered is False:
            return PRE, "Contrast/Bolus Usage Sequence: agent not administered"
    for field in policy.keyword_fields:
        text = getattr(f, field)
        if not text:
            continue
        for state, patterns in ((PRE, policy.negative), (POST, policy.positive)):
            for p in patterns:
                if _regex(p).search(text):
                    return state, f"{field} '{text}' ~ /{p}/"
    return UNKNOWN, "no contrast evidence"


def _exam_level_protocols(series: Sequence[SeriesFeatures]) -> frozenset[str]:
    """ProtocolNames shared by series with different descriptions name the exam, not the series.

    GE writes the exam protocol ("BRAIN MET W/WO") into every series' ProtocolName; using it for
    names or contrast keywords would give every series the same answer.
    """
    descs: dict[str, set[str]] = defaultdict(set)
    for f in series:
        if f.protocol_name:
            descs[f.protocol_name].add(f.series_description)
    return frozenset(p for p, d in descs.items() if len(d) > 1)


def _view(f: SeriesFeatures, exam_protocols: frozenset[str]) -> SeriesFeatures:
    return dataclasses.replace(f, protocol_name="") if f.protocol_name in exam_protocols else f


def _label(f: SeriesFeatures) -> str:
    num = f"#{f.series_number} " if f.series_number is not None else ""
    return f"{num}'{f.series_description}' ({f.series_instance_uid})"


def _resolve_timing(profiles: list[_Profile], rules: RuleSet) -> dict[str, tuple[str, str]]:
    """Contrast state for every profiled series after study context (acquisition order, family default)."""
    out: dict[str, tuple[str, str]] = {
        p.features.series_instance_uid: (p.contrast, p.contrast_evidence) for p in profiles if p.family
    }
    groups: dict[str, list[_Profile]] = defaultdict(list)
    for p in profiles:
        if p.family:
            groups[p.family].append(p)
    for fam_name, members in groups.items():
        family = rules.families[fam_name]
        # In time order, so that [-1] of "earlier" lists and [0] of "later" lists name the nearest series.
        timed = sorted(
            (p for p in members if p.features.acquisition_datetime), key=lambda p: p.features.acquisition_datetime or ""
        )
        explicit_pre = [p for p in timed if p.contrast == PRE]
        explicit_post = [p for p in timed if p.contrast == POST]
        if rules.contrast.use_timing:
            for u in timed:
                if u.contrast != UNKNOWN:
                    continue
                t = u.features.acquisition_datetime or ""
                after_post = [q for q in explicit_post if (q.features.acquisition_datetime or "") < t]
                before_pre = [q for q in explicit_pre if (q.features.acquisition_datetime or "") > t]
                after_pre = [q for q in explicit_pre if (q.features.acquisition_datetime or "") < t]
                before_post = [q for q in explicit_post if (q.features.acquisition_datetime or "") > t]
                uid = u.features.series_instance_uid
                # Acquired after a post-contrast series: the agent is still there, whatever the labels say.
                if after_post:
                    out[uid] = (
                        POST,
                        f"acquired after post-contrast {fam_name} series {_label(after_post[-1].features)}",
                    )
                elif before_pre:
                    out[uid] = (PRE, f"acquired before pre-contrast {fam_name} series {_label(before_pre[0].features)}")
                elif after_pre and not before_post:
                    out[uid] = (POST, f"acquired after pre-contrast {fam_name} series {_label(after_pre[-1].features)}")
                elif before_post and not after_pre:
                    out[uid] = (
                        PRE,
                        f"acquired before post-contrast {fam_name} series {_label(before_post[0].features)}",
                    )
                elif after_pre and before_post:
                    out[uid] = (UNKNOWN, "acquired between a pre- and a post-contrast series: timing is ambiguous")
        if family.default_contrast != PRE:
            continue
        unknown = [p for p in members if out[p.features.series_instance_uid][0] == UNKNOWN]
        if not unknown:
            continue
        has_pre = any(out[p.features.series_instance_uid][0] == PRE for p in members)
        unknown_timed = sorted(
            (p for p in unknown if p.features.acquisition_datetime), key=lambda p: p.features.acquisition_datetime or ""
        )
        if rules.contrast.use_timing and not has_pre and len(unknown_timed) > 1:
            # A same-family pair without any evidence (e.g. two CUBE T1): earlier = pre, later = post.
            first = unknown_timed[0]
            t0 = first.features.acquisition_datetime or ""
            out[first.features.series_instance_uid] = (
                PRE,
                f"earliest {fam_name} series without contrast evidence: defaults to pre",
            )
            for p in unknown_timed[1:]:
                if (p.features.acquisition_datetime or "") > t0:
                    out[p.features.series_instance_uid] = (
                        POST,
                        f"acquired after {_label(first.features)}, the {fam_name} series that defaults to pre",
                    )
        for p in unknown:
            uid = p.features.series_instance_uid
            if out[uid][0] == UNKNOWN:
                out[uid] = (PRE, f"{out[uid][1]}; {fam_name} defaults to pre")
    return out


def _decide(p: _Profile, contrast: tuple[str, str], rules: RuleSet) -> SeriesDecision:
    f = p.features
    base: dict[str, Any] = {
        "series_instance_uid": f.series_instance_uid,
        "study_instance_uid": f.study_instance_uid,
        "series_number": f.series_number,
        "series_description": f.series_description,
        "score": None,
        "score_detail": "",
    }
    if p.family is None:
        if p.exclusions:
            first, facts = p.exclusions[0]
            also = [e.name for e, _ in p.exclusions[1:]]
            reason = f"excluded: {first.reason} [{'; '.join(facts)}]"
            if also:
                reason += f"; also: {', '.join(also)}"
            return SeriesDecision(
                **base,
                role=None,
                candidate_role=None,
                family=None,
                preset=None,
                matcher=f"exclusion:{first.name}",
                excluded_by=tuple(e.name for e, _ in p.exclusions),
                contrast="",
                contrast_evidence="",
                reason=reason,
            )
        families = ", ".join(fam.label for fam in rules.families.values())
        return SeriesDecision(
            **base,
            role=None,
            candidate_role=None,
            family=None,
            preset=None,
            matcher="no rule",
            excluded_by=(),
            contrast="",
            contrast_evidence="",
            reason=f"no rule matched: not recognised as any of {families}",
        )
    assert p.preset is not None
    family = rules.families[p.family]
    state, evidence = contrast
    role = next(
        (name for name, r in rules.roles.items() if r.family == p.family and r.contrast in ("any", state)), None
    )
    matcher = f"{p.family}/{p.preset.name}"
    if role is None:
        if state == UNKNOWN:
            reason = f"{family.label} without contrast evidence"
        else:
            reason = (
                f"{family.label}, {state}-contrast ({evidence}): no role takes a {state}-contrast {p.family} series"
            )
    else:
        reason = (
            f"{family.label} via preset {p.preset.name} [{'; '.join(p.preset_facts)}]; contrast {state} ({evidence})"
        )
    score, detail = score_series(f, p.preset, rules)
    return SeriesDecision(
        **{**base, "score": score, "score_detail": detail},
        role=role,
        candidate_role=role,
        family=p.family,
        preset=p.preset.name,
        matcher=matcher,
        excluded_by=(),
        contrast=state,
        contrast_evidence=evidence,
        reason=reason,
    )


def score_series(f: SeriesFeatures, preset: Preset, rules: RuleSet) -> tuple[float, str]:
    """Selection score of a candidate and its breakdown (the post-contrast recency bonus is added later)."""
    s = rules.scoring
    parts: list[tuple[str, float]] = []
    if preset.weight:
        parts.append((f"preset {preset.name}", preset.weight))
    if f.mr_acquisition_type == "3D":
        parts.append(("3D", s.three_d))
    if f.image_type[:1] == ("ORIGINAL",):
        parts.append(("original", s.original))
    if f.n_slices:
        parts.append((f"{f.n_slices} slices", min(f.n_slices, s.max_slices_counted) * s.per_slice))
    if f.slice_thickness:
        parts.append(
            (
                f"{f.slice_thickness:g} mm slices",
                max(0.0, s.reference_thickness_mm - f.slice_thickness) * s.per_mm_thinner,
            )
        )
    total = round(sum(v for _, v in parts), 3)
    return total, f"{total:g} = " + (", ".join(f"{name} {v:+g}" for name, v in parts) if parts else "nothing")


def classify_series(features: SeriesFeatures, rules: RuleSet, study: Sequence[SeriesFeatures] = ()) -> SeriesDecision:
    """Classify one series. Pass the study's other series as ``study`` to use acquisition-order context.

    Without ``study`` the contrast state comes from the series' own headers and its family default.
    The returned role is the role it qualifies for; :func:`assign_roles` then picks one series per role.
    """
    others = [s for s in study if s.series_instance_uid != features.series_instance_uid]
    group = [features, *(s for s in others if s.study_instance_uid == features.study_instance_uid)]
    exam = _exam_level_protocols(group) if len(group) > 1 else frozenset()
    profiles = [_profile(_view(s, exam), rules) for s in group]
    timing = _resolve_timing(profiles, rules)
    p = profiles[0]
    return _decide(p, timing.get(features.series_instance_uid, ("", "")), rules)


def assign_roles(series: Sequence[SeriesFeatures], rules: RuleSet) -> StudyAssignment:
    """Assign roles within one study: one series per role, and why every other series got none."""
    studies = {f.study_instance_uid for f in series}
    if len(studies) > 1:
        raise ValueError(f"assign_roles takes the series of one study, got {len(studies)} studies; use assign_studies")
    study_uid = next(iter(studies), "")
    exam = _exam_level_protocols(series)
    profiles = [_profile(_view(f, exam), rules) for f in series]
    timing = _resolve_timing(profiles, rules)
    decisions = [_decide(p, timing.get(p.features.series_instance_uid, ("", "")), rules) for p in profiles]
    by_uid = {f.series_instance_uid: f for f in series}

    by_role: dict[str, list[SeriesDecision]] = defaultdict(list)
    for d in decisions:
        if d.role is not None:
            by_role[d.role].append(d)

    final: dict[str, SeriesDecision] = {d.series_instance_uid: d for d in decisions}
    chosen: dict[str, RoleChoice] = {}
    for role, cands in by_role.items():
        post = rules.roles[role].contrast == POST
        scored: list[tuple[float, str, SeriesDecision]] = []
        latest = max((by_uid[c.series_instance_uid].acquisition_datetime or "" for c in cands), default="")
        for c in cands:
            total, detail = c.score or 0.0, c.score_detail
            t = by_uid[c.series_instance_uid].acquisition_datetime or ""
            if post and len(cands) > 1 and latest and t == latest and rules.scoring.latest_post:
                total = round(total + rules.scoring.latest_post, 3)
                detail = (
                    f"{total:g} = "
                    + detail.split(" = ", 1)[-1]
                    + f", latest post-contrast {rules.scoring.latest_post:+g}"
                )
            scored.append((total, detail, c))

        def rank(item: tuple[float, str, SeriesDecision]) -> tuple[float, str, int, str]:
            f = by_uid[item[2].series_instance_uid]
            return (item[0], f.acquisition_datetime or "", -(f.series_number or 0), f.series_instance_uid)

        scored.sort(key=rank, reverse=True)
        win_score, win_detail, winner = scored[0]
        n = len(scored)
        why = "only candidate" if n == 1 else f"best of {n} candidates"
        chosen[role] = RoleChoice(
            role=role,
            series_instance_uid=winner.series_instance_uid,
            series_description=winner.series_description,
            score=win_score,
            score_detail=win_detail,
            reason=f"{why}: score {win_detail}",
        )
        final[winner.series_instance_uid] = dataclasses.replace(winner, score=win_score, score_detail=win_detail)
        for total, detail, loser in scored[1:]:
            final[loser.series_instance_uid] = dataclasses.replace(
                loser,
                role=None,
                score=total,
                score_detail=detail,
                reason=(
                    f"lost to series {_label(by_uid[winner.series_instance_uid])} for role {role}: "
                    f"score {total:g} < {win_score:g} ({detail} vs {win_detail}); {loser.reason}"
                    if total < win_score
                    else f"lost to series {_label(by_uid[winner.series_instance_uid])} for role {role}: "
                    f"equal score {total:g}, tie broken by later acquisition / lower series number; {loser.reason}"
                ),
            )
    ordered = tuple(final[f.series_instance_uid] for f in series)
    missing = tuple(r for r in rules.roles if r not in chosen)
    return StudyAssignment(study_uid, chosen, ordered, missing)


def assign_studies(series: Iterable[SeriesFeatures], rules: RuleSet) -> list[StudyAssignment]:
    """Group series by StudyInstanceUID and run :func:`assign_roles` on each study."""
    by_study: dict[str, list[SeriesFeatures]] = defaultdict(list)
    for f in series:
        by_study[f.study_instance_uid].append(f)
    return [assign_roles(members, rules) for _, members in sorted(by_study.items())]
