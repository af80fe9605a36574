"""The role assignment of DICOM training cases (``training.data.dicom``) by the node's series rules.

``training`` never imports ``dicom_node``: the CLI builds a :class:`RulesRoleAssigner` and hands it to
:func:`training.data.dicom.dicom_sources` (or :func:`training.data.sources.find_sources`) together with its
:attr:`~RulesRoleAssigner.key`, so that a training case gets exactly the series ``dicom-node segment`` would
choose for it, and changing the rules rebuilds the cached cases.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from dicom_node.cli.segment import StudyFolderError, study_role_files
from dicom_node.rules import RuleSet, load_rules
from training.data.case import CaseError

__all__ = ["RulesRoleAssigner"]


@dataclass(frozen=True)
class RulesRoleAssigner:
    """Case folder -> role -> the files of the series the rules choose (one study per case folder)."""

    rules: RuleSet

    @classmethod
    def from_file(cls, path: str | Path | None = None) -> RulesRoleAssigner:
        """The assigner of the rules file ``path`` (default: the shipped rules); raises ``RulesError``."""
        return cls(load_rules(path))

    @cached_property
    def key(self) -> str:
        """A short hash of the rules' content (not of their file path): the cache key part of the assignment."""
        text = self.rules.model_dump_json(exclude={"source"})
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def __call__(self, case_folder: Path) -> dict[str, list[Path]]:
        try:
            _, files = study_role_files(case_folder, self.rules, str(case_folder))
        except StudyFolderError as exc:
            raise CaseError(f"case {case_folder.name}: {exc}") from None
        return files
