"""The one error a checkpoint name map raises: every missing, mis-shaped and unused tensor."""

from __future__ import annotations

from collections.abc import Sequence


def raise_if_mismatched(
    header: str, missing: Sequence[str], misshaped: Sequence[str], unused: Sequence[str]
) -> None:
    """ValueError ``"{header}: missing a, b; mis-shaped c; unused d"`` if any list is non-empty."""
    parts = [
        f"{what} {', '.join(names)}"
        for what, names in (
            ("missing", sorted(missing)),
            ("mis-shaped", misshaped),
            ("unused", unused),
        )
        if names
    ]
    if parts:
        raise ValueError(f"{header}: " + "; ".join(parts))
