"""The four input roles of the method, their fixed channel order and the reference preference: one place."""

from __future__ import annotations

from collections.abc import Iterable

ROLES: tuple[str, ...] = ("t1_bravo_post", "t1_cube_pre", "t1_cube_post", "flair")
"""The model's input roles in channel order (method spec); recorded in every checkpoint."""

REFERENCE_PREFERENCE: tuple[str, ...] = ("t1_bravo_post", "t1_cube_post", "t1_cube_pre", "flair")
"""Reference choice order: post-contrast T1 (BRAVO, then CUBE/SPACE post), then CUBE pre, then FLAIR."""


def choose_reference(roles: Iterable[str]) -> str:
    """The reference role among ``roles``: the first of ``REFERENCE_PREFERENCE`` present.

    Raises ``ValueError`` for an empty set or for an unknown role name."""
    present = set(roles)
    unknown = present - set(ROLES)
    if unknown:
        raise ValueError(f"unknown role(s) {sorted(unknown)}; expected a subset of {ROLES}")
    for role in REFERENCE_PREFERENCE:
        if role in present:
            return role
    raise ValueError("no input series: cannot choose a reference")
