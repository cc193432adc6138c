"""Projections: folds of the event log into read tables, and the worker that runs them."""

from __future__ import annotations

from collections.abc import Callable

from projections.base import Projection, ProjectionError
from projections.conversations import ConversationsProjection
from service.settings import Settings

# Each projection by name, made from the settings it reads (e.g. the search configuration).
PROJECTIONS: dict[str, Callable[[Settings], Projection]] = {
    ConversationsProjection.name: ConversationsProjection.from_settings,
}


def select(settings: Settings, names: list[str] | None = None) -> list[Projection]:
    """The named projections (all of them for none), or KeyError naming an unknown one."""
    unknown = [n for n in names or () if n not in PROJECTIONS]
    if unknown:
        raise KeyError(f"unknown projection(s): {', '.join(unknown)}; known: {', '.join(PROJECTIONS)}")
    return [PROJECTIONS[n](settings) for n in names or PROJECTIONS]


__all__ = ["PROJECTIONS", "Projection", "ProjectionError", "select"]
