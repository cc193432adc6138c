"""Projections: folds of the event log into read tables, and the worker that runs them."""

from __future__ import annotations

from projections.base import Projection, ProjectionError
from projections.conversations import ConversationsProjection

PROJECTIONS: dict[str, Projection] = {p.name: p for p in (ConversationsProjection(),)}


def select(names: list[str] | None) -> list[Projection]:
    """The named projections (all of them for none), or KeyError naming an unknown one."""
    if not names:
        return list(PROJECTIONS.values())
    unknown = [n for n in names if n not in PROJECTIONS]
    if unknown:
        raise KeyError(f"unknown projection(s): {', '.join(unknown)}; known: {', '.join(PROJECTIONS)}")
    return [PROJECTIONS[n] for n in names]


__all__ = ["PROJECTIONS", "Projection", "ProjectionError", "select"]
