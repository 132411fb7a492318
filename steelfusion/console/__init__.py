"""The web console (issue 15): the Core's Replication page and the Edge's page.

Served by the node itself (:mod:`steelfusion.console.server`, aiohttp on the
node's loop), pages rendered on the server (:mod:`steelfusion.console.pages`)
and kept live by one small plain-JS file over server-sent events; no build
step, nothing from a CDN. Actions go through the node's control handlers
(:func:`steelfusion.control.dispatch`), so a refusal reads exactly as
``coredr`` prints it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from steelfusion import control


@dataclass
class NodeView:
    """What the console needs of a node: who it is, its status, events and commands."""

    kind: str  # "core" or "edge"
    name: str
    status: Callable[[], dict[str, Any]]
    events: Callable[[int], list[dict[str, Any]]] = lambda since: []
    handlers: dict[str, control.Handler] = field(default_factory=dict)
    actions: tuple[str, ...] = ()  # the operator commands offered as buttons


__all__ = ["NodeView"]
