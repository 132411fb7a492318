"""Shared fixtures: temp lab folders, free ports, and tool discovery."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `make install` (it installs libiscsi-bin, "
                    "qemu-utils, e2fsprogs and tgt)")
    return path


Runner = Callable[[Coroutine[Any, Any, None]], None]


@pytest.fixture(params=["asyncio", "uvloop"])
def aio_run(request: pytest.FixtureRequest) -> Runner:
    """Runs a test's coroutine to its end, once on asyncio's own loop and once on uvloop (what
    the node processes run on)."""
    if request.param == "uvloop":
        pytest.importorskip("uvloop")
        import uvloop

        return uvloop.run
    return asyncio.run


@pytest.fixture
def steelfusion_cmd() -> list[str]:
    return [sys.executable, "-m", "steelfusion.cli"]


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    os.environ.setdefault("STEELFUSION_TEST", "1")


@pytest.fixture(autouse=True)
def _processes_only_in_lab_tests(request: pytest.FixtureRequest,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A test that starts a process must be marked ``lab``: ``make test-fast`` runs the
    others and must stay fast and self-contained (issue 14: test hygiene)."""
    if request.node.get_closest_marker("lab") is not None:
        return
    import subprocess

    def refuse(self: Any, args: Any, *a: Any, **k: Any) -> None:
        raise AssertionError(f"{request.node.nodeid} starts a process ({str(args)[:80]}) but "
                             "is not marked lab: add pytest.mark.lab")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)


def pytest_configure(config: pytest.Config) -> None:
    """In-process nodes log nowhere by default (tests that check events capture them)."""
    from steelfusion import log

    log.setup("pytest", None, tty=False)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """No node process outlives the test run, whatever happened to the test that started it."""
    import signal

    from tests.nodes import SPAWNED

    for pid in SPAWNED:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
