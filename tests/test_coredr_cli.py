"""``coredr`` as an operator meets it: wrong ports, wrong input, refusals, progress, waits.

Issue 13 (operator experience). Every case runs the real CLI (click's
CliRunner, or a subprocess where a terminal or a separate process matters)
against real nodes on loopback, and checks that the operator gets ONE clear
line, the right exit status, and for ``--json`` a stable code.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from journal import required_size
from steelfusion import control
from steelfusion.coredr import main
from steelfusion.initiator import qemu_write
from steelfusion.lab import Lab, free_ports
from tests.conftest import tool
from tests.nodes import MiB, make_cores, status, wait_for

pytestmark = [pytest.mark.lab, pytest.mark.timeout(180)]
LUN = 8 * MiB


def coredr(*args: str) -> Result:
    """In-process ``coredr ARGS`` with no $COREDR_CORE, stdout and stderr apart."""
    return CliRunner().invoke(main, list(args), env={"COREDR_CORE": None})


def one_line_error(r: Result) -> str:
    """The operator's error: exactly one line on stderr, no traceback."""
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert "Traceback" not in r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One lab for the tests that change nothing in it."""
    lab_ = Lab(tmp_path_factory.mktemp("coredr") / "lab")
    data = lab_.up(luns=1, lun_size=LUN, edges=1)
    yield data
    lab_.down()


@pytest.fixture
def own_lab(tmp_path: Path) -> Iterator[tuple[Lab, dict[str, Any]]]:
    lab_ = Lab(tmp_path / "lab")
    yield lab_, lab_.up(luns=1, lun_size=LUN, edges=1, witness_lease=4.0)
    lab_.down()


# -- item 7: help needs no Core --------------------------------------------------------------
@pytest.mark.parametrize("cmd", [["status"], ["alarms"], ["suspend"], ["resume"], ["failover"],
                                 ["terminate"], ["journal"], ["journal", "status"], ["verify"],
                                 ["events"], []])
def test_help_works_without_a_core(cmd: list[str]) -> None:
    r = coredr(*cmd, "--help")
    assert r.exit_code == 0, r.output
    assert "Usage:" in r.stdout and "Missing option" not in r.output


def test_a_command_without_core_says_how_to_give_it() -> None:
    r = coredr("status")
    assert r.exit_code == 2
    assert "--core" in one_line_error(r) and "COREDR_CORE" in r.stderr


# -- bad --core values ---------------------------------------------------------------------
@pytest.mark.parametrize(("core", "words"), [
    ("foo", "needs a port"),
    ("127.0.0.1:70000", "port out of range"),
    ("127.0.0.1:0", "port 0"),
    ("127.0.0.1:http", "not a number"),
    ("nosuchhost.invalid:7101", "cannot resolve host 'nosuchhost.invalid'"),
])
def test_bad_core_address_is_one_line(core: str, words: str) -> None:
    r = coredr("--core", core, "status")
    assert r.exit_code != 0
    line = one_line_error(r)
    assert words in line and "Traceback" not in r.output


def test_closed_port_says_nothing_listens() -> None:
    (port,) = free_ports(1)
    r = coredr("--core", f"127.0.0.1:{port}", "status", "--json")
    assert r.exit_code == 1
    line = one_line_error(r)
    assert f"nothing listens on 127.0.0.1:{port}" in line and "lab status" in line
    assert json.loads(r.stdout) == {"error": "unreachable", "reason": line.split(": ", 1)[1]}


# -- item 4: the wrong kind of port --------------------------------------------------------
@pytest.mark.parametrize(("which", "words"), [
    ("core-listen", "a Core's node port"),
    ("witness-listen", "a Witness port"),
    ("witness-control", "a Witness control port"),
    ("edge-control", "an Edge control port (edge-1)"),
    ("edge-portal", "an iSCSI portal"),
])
@pytest.mark.parametrize("cmd", ["status", "suspend"])
def test_wrong_kind_of_port_is_named(lab: dict[str, Any], which: str, words: str,
                                     cmd: str) -> None:
    addr = {"core-listen": lab["cores"][0]["listen"], "witness-listen": lab["witness"]["address"],
            "witness-control": lab["witness"]["control"],
            "edge-control": lab["edges"][0]["control"],
            "edge-portal": lab["edges"][0]["portal"]}[which]
    r = coredr("--core", addr, cmd)
    assert r.exit_code == 1, r.output
    line = one_line_error(r)
    assert f"{addr} is not a Core control port" in line and words in line, line


@pytest.mark.parametrize(("talk", "words"), [
    (b"SSH-2.0-OpenSSH_9.6\r\n", "answered something other than the control protocol"),
    (bytes(range(256)), "answered something other than the control protocol"),
    (b'["not", "an", "object"]\n', "answered something other than the control protocol"),
    (None, "no answer from"),
])
def test_a_stranger_on_the_port_is_named(talk: bytes | None, words: str) -> None:
    """Not one of ours at all: a banner, binary, other JSON, or silence (3 s)."""
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            if talk is None:
                stop.wait(10)
            else:
                conn.sendall(talk)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        where = f"127.0.0.1:{srv.getsockname()[1]}"
        r = coredr("--core", where, "status")
        assert r.exit_code == 1
        line = one_line_error(r)
        assert f"{where} is not a Core control port" in line or words in line
        assert words in line, line
    finally:
        stop.set()
        srv.close()
        t.join(5)


# -- item 9: one vocabulary, codes for scripts ---------------------------------------------
def test_refusals_and_no_ops_speak_one_language(lab: dict[str, Any]) -> None:
    a, b = lab["cores"][0]["control"], lab["cores"][1]["control"]
    r = coredr("--core", a, "resume")
    assert r.exit_code == 0 and r.stdout.strip() == "replication already running"
    r = coredr("--core", a, "resume", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["already"] is True
    for core, cmd, code in [(b, ["suspend"], "wrong-role"), (b, ["resume"], "wrong-role"),
                            (b, ["verify"], "wrong-role"), (a, ["failover"], "wrong-role"),
                            (b, ["failover"], "peer-reachable")]:
        r = coredr("--core", core, *cmd)
        assert r.exit_code == 1, (cmd, r.output)
        line = one_line_error(r)
        assert line.startswith("refused: "), line
        assert "seed" not in line
        r = coredr("--core", core, *cmd, "--json")
        assert r.exit_code == 1
        out = json.loads(r.stdout)
        assert out["refused"] == code and out["reason"] == line.removeprefix("refused: "), out


def test_suspend_twice_then_terminate_twice(own_lab: tuple[Lab, dict[str, Any]]) -> None:
    _, data = own_lab
    a = data["cores"][0]["control"]
    assert coredr("--core", a, "suspend").stdout.strip() == "replication suspended"
    r = coredr("--core", a, "suspend")
    assert r.exit_code == 0 and r.stdout.strip() == "replication already suspended"
    assert coredr("--core", a, "terminate", "--yes").stdout.strip() == "replication terminated"
    r = coredr("--core", a, "terminate", "--yes")
    assert r.exit_code == 0 and r.stdout.strip() == "replication already terminated"
    for cmd in ("resume", "suspend"):
        r = coredr("--core", a, cmd, "--json")
        assert r.exit_code == 1 and json.loads(r.stdout)["refused"] == "terminated", r.output
        assert "terminated" in one_line_error(coredr("--core", a, cmd))


def test_codes_without_journal_or_witness(tmp_path: Path) -> None:
    """Alone (the peer is down), with no Journal LUN, then with a journal and no Witness."""
    for d in ("nojournal", "nowitness"):
        (tmp_path / d).mkdir()
    a, _ = make_cores(tmp_path / "nojournal", {1: LUN})
    a2, b2 = make_cores(tmp_path / "nowitness", {1: LUN}, journal_size=required_size(1))
    procs = [a, a2, b2]

    def addr(p: Any) -> str:
        return f"127.0.0.1:{p.cfg.control[1]}"

    try:
        a.start()
        a2.start()  # its secondary stays down: paused
        for core, cmd, code, words in [
                (a, ["journal", "status"], "no-journal", "no Journal LUN configured"),
                (a, ["suspend"], "no-journal", "no Journal LUN configured"),
                (a2, ["resume"], "paused", "resumes by itself"),
                (a2, ["suspend"], "no-witness", "no Witness configured"),
                (a2, ["verify"], "peer-unreachable", "secondary is not connected")]:
            r = coredr("--core", addr(core), *cmd, "--json")
            assert r.exit_code == 1 and json.loads(r.stdout)["refused"] == code, (cmd, r.output)
            assert words in one_line_error(coredr("--core", addr(core), *cmd)), cmd
        a2.kill()
        b2.start()  # its primary is down, and no Witness can confirm that
        r = coredr("--core", addr(b2), "failover", "--json")
        assert r.exit_code == 1 and json.loads(r.stdout)["refused"] == "no-witness", r.output
        assert "--force" in one_line_error(coredr("--core", addr(b2), "failover"))
    finally:
        for p in procs:
            p.kill()


# -- item 10: progress only on a terminal, ending at the real figures ----------------------
def test_verify_prints_no_progress_label_when_not_a_terminal(lab: dict[str, Any]) -> None:
    r = coredr("--core", lab["cores"][0]["control"], "verify")
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == ["LUN 1: 8 regions, 0 mismatched", "IDENTICAL"]


def _run_in_terminal(args: list[str], timeout: float = 60) -> tuple[int, str]:
    """Run ``coredr ARGS`` with a pseudo-terminal as stdout; (exit status, output)."""
    leader, follower = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "steelfusion.coredr", *args], stdout=follower,
                         stderr=follower, stdin=subprocess.DEVNULL, close_fds=True,
                         env={**os.environ, "COLUMNS": "120"})
    os.close(follower)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # the terminal closed: the process is done
                    break
                if not chunk:
                    break
                out += chunk
            elif p.poll() is not None:
                break
        rc = p.wait(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
        os.close(leader)
    return rc, out.decode(errors="replace")


def test_resume_progress_ends_at_the_total_and_secondary_shows_its_seqs(
        own_lab: tuple[Lab, dict[str, Any]], tmp_path: Path) -> None:
    tool("qemu-img")
    lab_, data = own_lab
    a, b = data["cores"][0]["control"], data["cores"][1]["control"]
    assert coredr("--core", a, "suspend").exit_code == 0
    img = tmp_path / "data.raw"
    img.write_bytes(os.urandom(LUN))
    qemu_write(img, data["edges"][0]["targets"][0]["url"])
    lab_.wait_committed(timeout=60)
    rc, out = _run_in_terminal(["--core", a, "resume"])
    assert rc == 0, out
    renders = [s.strip() for s in re.split(r"[\r\n]", out) if "resync" in s]
    assert renders, out
    final = renders[-1]
    assert "100%" in final and "8.0 MiB/8.0 MiB" in final, out
    assert out.rstrip().endswith("replication running"), out
    # the secondary holds the data: its seqs say so (they stayed 0 after a resync)
    applied = status(a)["luns"]["1"]["applied_seq"]
    assert applied > 0
    wait_for(lambda: status(b)["luns"]["1"]["applied_seq"] == applied, 10,
             "the secondary's applied seq")
    lun = json.loads(coredr("--core", b, "status", "--json").stdout)["luns"]["1"]
    assert lun["durable_seq"] == applied and lun["acked_seq"] == applied, lun
    # and the next copy continues its stream (it was refused as a gap, then repaired)
    small = tmp_path / "small.raw"
    small.write_bytes(os.urandom(MiB))
    qemu_write(small, data["edges"][0]["targets"][0]["url"])
    lab_.wait_committed(timeout=60)
    events = [json.loads(ln)["event"] for ln in coredr("--core", b, "events").stdout.splitlines()]
    assert "sequence_gap" not in events, events


def _fields(line: str) -> list[int]:
    """Where each field of a line starts; fields are separated by two spaces or more."""
    return [0 if m.start() == 0 else m.start() for m in re.finditer(r"(?:^|(?<=  ))\S", line)]


def test_status_columns_line_up_whatever_the_state(own_lab: tuple[Lab, dict[str, Any]]) -> None:
    """No value's column depends on the length of another value (``secondary``,
    ``disconnected``): each header line is one label and one value, the table is
    sized to its contents."""
    lab_, data = own_lab
    a, b = data["cores"][0]["control"], data["cores"][1]["control"]
    outs = [coredr("--core", a, "status").stdout]
    lab_.kill("core-a")
    wait_for(lambda: status(b)["replication"] == "disconnected", 15, "disconnected")
    outs.append(coredr("--core", b, "status").stdout)
    value_cols = set()
    for o in outs:
        lines = o.splitlines()
        head = next(i for i, ln in enumerate(lines) if ln.startswith("LUN"))
        for ln in lines[:head]:
            f = _fields(ln)
            assert len(f) == 2, (ln, o)  # label, value: nothing after a value of any length
            value_cols.add(f[1])
        cols = _fields(lines[head])
        for row in lines[head + 1:]:
            if row.startswith("Alarms"):
                break
            assert _fields(row) == cols, (row, o)
    assert len(value_cols) == 1, outs


# -- item 11: failover right after the primary died ----------------------------------------
def test_failover_says_how_long_the_lease_holds_and_waits(
        own_lab: tuple[Lab, dict[str, Any]]) -> None:
    lab_, data = own_lab
    b = data["cores"][1]["control"]
    lab_.kill("core-a")

    def lease_refusal() -> dict[str, Any] | None:
        r = coredr("--core", b, "failover", "--json")
        out = json.loads(r.stdout)
        assert r.exit_code == 1, out  # the lease is 4 s: still live
        return out if out["refused"] == "witness-lease-live" else None

    out = wait_for(lease_refusal, 10, "the Witness's refusal")
    assert 0 < out["retry_in"] <= 4.0
    assert re.search(r"holds core-a's lease for \d+\.\d s more", out["reason"]), out
    p = subprocess.run([sys.executable, "-m", "steelfusion.coredr", "--core", b, "failover",
                        "--wait", "30"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert re.search(r"waiting: .*core-a's lease", p.stdout), p.stdout
    assert "now primary at epoch 2" in p.stdout.splitlines()[-1]


def test_failover_wait_gives_up_with_the_refusal(lab: dict[str, Any]) -> None:
    r = coredr("--core", lab["cores"][1]["control"], "failover", "--wait", "0.5")
    assert r.exit_code == 1
    assert "still reachable" in one_line_error(r) and "waiting:" in r.stdout


# -- the Core goes away under a running command --------------------------------------------
def test_events_follow_ends_with_one_line_when_the_core_dies(
        own_lab: tuple[Lab, dict[str, Any]]) -> None:
    lab_, data = own_lab
    a = data["cores"][0]["control"]
    p = subprocess.Popen([sys.executable, "-m", "steelfusion.coredr", "--core", a, "events",
                          "--follow"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        first = p.stdout.readline()  # it is following
        assert json.loads(first)["node"] == "core-a"
        lab_.kill("core-a", signal.SIGKILL)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"lost the Core at {a}" in lines[0], err


def test_witness_refusal_carries_the_lease_time_left() -> None:
    """Sans-IO: the Witness says how long the primary's lease holds, and the wire keeps it."""
    from witness.logic import PEER_REACHABLE, WitnessLogic
    from witness.protocol import WireReply, parse_reply

    w = WitnessLogic(3.0, 0.0)
    w.register("core-a", "p", "primary", 1, 4.0)
    w.register("core-b", "p", "secondary", 1, 4.0)
    d = w.request_failover("core-b", "p", 1, 5.0, peer="core-a")
    assert (d.granted, d.reason, d.retry_in) == (False, PEER_REACHABLE, 2.0)
    assert "holds core-a's lease for 2.0 s more" in d.detail
    body = WireReply(1, d.granted, d.reason, d.epoch, d.detail, retry_in=d.retry_in).body()
    assert parse_reply(body).retry_in == 2.0
    assert parse_reply({**body, "retry_in": "soon"}).retry_in is None


def test_every_refusal_code_is_in_the_readme() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert [c for c in control.CODES if f"`{c}`" not in readme] == []
