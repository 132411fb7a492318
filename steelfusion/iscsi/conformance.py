"""Run libiscsi's conformance suite (``iscsi-test-cu``) and tally the outcome.

CUnit counts a skipped test as passed (libiscsi skips with
``CU_PASS("[SKIPPED] ...")``), so the summary line overstates what a target
does.  :func:`parse_output` reads the basic-mode transcript instead and
sorts every test into *clean* (passed, printed no ``[SKIPPED]``), *skipped*
(passed but printed ``[SKIPPED]``) and *failed*.  Text printed after a
test's result on the same line belongs to the next suite's set-up, not to
the test.

Command line::

    python -m steelfusion.iscsi.conformance iscsi://127.0.0.1:3260/iqn.x:t/0 [URL2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

_SUITE = re.compile(r"^Suite: (?P<name>.+?)\s*$")
_TEST = re.compile(r"^  Test: (?P<name>.+?) \.\.\.(?P<rest>.*)$")
_RESULT = re.compile(r"^(?P<res>passed|FAILED)(?P<after>.*)$")


@dataclass(frozen=True, slots=True)
class Outcome:
    """One test: ``Suite.Test``, ``"clean" | "skipped" | "failed"`` and what it printed."""

    name: str
    result: str
    messages: tuple[str, ...] = ()


@dataclass(slots=True)
class Tally:
    """All outcomes of one run, with the counts the issue asks for."""

    outcomes: list[Outcome] = field(default_factory=list)
    returncode: int | None = None
    elapsed_s: float = 0.0

    def names(self, result: str) -> list[str]:
        return [o.name for o in self.outcomes if o.result == result]

    @property
    def clean(self) -> int:
        return sum(o.result == "clean" for o in self.outcomes)

    @property
    def skipped(self) -> int:
        return sum(o.result == "skipped" for o in self.outcomes)

    @property
    def failed(self) -> int:
        return sum(o.result == "failed" for o in self.outcomes)

    @property
    def total(self) -> int:
        return len(self.outcomes)

    def summary(self) -> str:
        return (f"{self.total} tests: {self.clean} clean, {self.skipped} skipped, "
                f"{self.failed} failed")

    def to_dict(self) -> dict[str, object]:
        return {"total": self.total, "clean": self.clean, "skipped": self.skipped,
                "failed": self.failed, "skipped_tests": self.names("skipped"),
                "failed_tests": self.names("failed"), "returncode": self.returncode,
                "elapsed_s": round(self.elapsed_s, 1)}


def parse_output(text: str) -> Tally:
    """Sort each test of an ``iscsi-test-cu`` transcript (CUnit basic mode)."""
    tally = Tally()
    suite = ""
    current: str | None = None
    msgs: list[str] = []

    def close(res: str) -> None:
        nonlocal current, msgs
        assert current is not None
        skipped = any("[SKIPPED]" in m for m in msgs)
        result = "failed" if res == "FAILED" else "skipped" if skipped else "clean"
        tally.outcomes.append(Outcome(current, result, tuple(m.strip() for m in msgs if
                                                             m.strip())))
        current, msgs = None, []

    for line in text.splitlines():
        m = _SUITE.match(line)
        if m and current is None:
            suite = m["name"]
            continue
        m = _TEST.match(line)
        if m and current is None:
            current = f"{suite}.{m['name']}"
            line = m["rest"]
        if current is None:
            continue
        r = _RESULT.match(line)
        if r:
            close(r["res"])
            continue
        msgs.append(line)
    return tally


def find_tool() -> str | None:
    return shutil.which("iscsi-test-cu")


def run(urls: Sequence[str], *, tests: str = "ALL", dataloss: bool = True,
        extra_args: Sequence[str] = (), env: Mapping[str, str] | None = None,
        timeout: float = 900.0, cwd: str | None = None) -> tuple[Tally, str]:
    """Run ``iscsi-test-cu -t TESTS [--dataloss] URL [URL2]``; returns the tally and
    the transcript.  A second URL enables the MultipathIO suite."""
    import time

    exe = find_tool()
    if exe is None:
        raise FileNotFoundError("iscsi-test-cu not found (Debian package libiscsi-bin)")
    argv = [exe, "-t", tests, *(["--dataloss"] if dataloss else []), *extra_args, *urls]
    t0 = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, errors="replace",
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd,
                          stdin=subprocess.DEVNULL)
    text = proc.stdout + proc.stderr
    tally = parse_output(proc.stdout)
    tally.returncode = proc.returncode
    tally.elapsed_s = time.monotonic() - t0
    return tally, text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m steelfusion.iscsi.conformance",
                                 description="Run iscsi-test-cu and count clean passes, "
                                             "skips and failures.")
    ap.add_argument("urls", nargs="+", help="iscsi://host:port/iqn/lun (a second enables "
                                            "MultipathIO)")
    ap.add_argument("-t", "--tests", default="ALL")
    ap.add_argument("--no-dataloss", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true", help="list skipped tests too")
    ap.add_argument("--transcript", help="write the raw output here")
    a = ap.parse_args(argv)
    tally, text = run(a.urls, tests=a.tests, dataloss=not a.no_dataloss)
    if a.transcript:
        with open(a.transcript, "w") as f:
            f.write(text)
    if a.json:
        print(json.dumps(tally.to_dict(), indent=2))
    else:
        print(tally.summary(), f"({tally.elapsed_s:.1f} s)")
        for o in tally.outcomes:
            if o.result == "failed" or (a.verbose and o.result == "skipped"):
                why = next((m for m in o.messages if "[SKIPPED]" in m or "FAIL" in m),
                           o.messages[0] if o.messages else "")
                print(f"  {o.result:8} {o.name}: {why[:150]}")
    return 1 if tally.failed else 0


if __name__ == "__main__":
    sys.exit(main())
