"""structlog setup: JSON lines to a file per node, readable key=value on a TTY.

Every role calls :func:`setup` once at start. Events are short snake_case
names (``edge_write_acked``) with key/value context, never formatted prose,
so drills and tests can grep the JSON-lines file.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, NoReturn, TextIO

import structlog

_file: TextIO | None = None


class _Tee:
    """Write JSON lines to the node's log file and a readable line to stderr."""

    def __init__(self, json_out: TextIO | None, tty_out: TextIO | None, level: int) -> None:
        self.json_render = structlog.processors.JSONRenderer()
        self.tty_render = structlog.dev.ConsoleRenderer(colors=bool(tty_out and tty_out.isatty()))
        self.json_out = json_out
        self.tty_out = tty_out
        self.level = level

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> NoReturn:
        if self.json_out is not None:
            line = self.json_render(logger, method, dict(event))
            if isinstance(line, bytes):  # a bytes-returning serializer (e.g. orjson.dumps)
                line = line.decode("utf-8")
            self.json_out.write(line + "\n")
            self.json_out.flush()
        lvl = logging.getLevelName(event.get("level", "info").upper())
        if self.tty_out is not None and isinstance(lvl, int) and lvl >= self.level:
            self.tty_out.write(self.tty_render(logger, method, dict(event)) + "\n")
            self.tty_out.flush()
        raise structlog.DropEvent


def setup(node: str, log_file: str | Path | None = None, level: str = "info",
          tty: bool = True) -> None:
    """Configure structlog for this process.

    ``log_file`` gets every event as one JSON object a line; stderr gets
    events at ``level`` and above in key=value form (colour on a TTY).
    """
    global _file
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        _file = open(log_file, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
    tee = _Tee(_file, sys.stderr if tty else None, logging.getLevelName(level.upper()))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            tee,
        ],
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(node=node)


def get(name: str | None = None) -> Any:
    """A bound logger; ``name`` becomes the ``component`` key."""
    # Lazy proxies: modules create their logger at import, before setup() runs.
    return structlog.get_logger(component=name) if name else structlog.get_logger()
