"""The drill's workload and its witnesses: qemu-io writers and status samplers (issue 10).

Writers: one thread per LUN, each driving one interactive ``qemu-io`` (libiscsi) in the
branch namespace: random 1..16-block writes of self-describing blocks
(:func:`steelfusion.drillpayload.payloads`), at most :data:`WRITE_RATE` a second so the data
volume stays bounded; each write's start, answer (ok / failed) and latency go into the
history. A write with no answer within :data:`STALL_LIMIT` is indeterminate: that qemu-io
is killed and a new one started.

Samplers: every :data:`SAMPLE_EVERY` seconds each Core's status (from inside its namespace:
control ports are namespace-local, so a partition never blinds the runner): role, epoch,
replication state, and whether it acknowledged Edge writes since the previous sample (its
``acked_seq`` grew, same process, same stream): the checker's split-brain and RTO evidence.
The Edges are sampled too (connected or not), for the timeline. An HA lab's Cores
(``drill --ha``) are sampled by :class:`HaSampler`: each Core's own LUNs, and its partner's
while it serves them after a takeover.

Both threads see the runner only through :class:`Run`.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import select
import shutil
import subprocess
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from steelfusion import control, log
from steelfusion.drillcheck import History
from steelfusion.drillpayload import BLOCK, payloads
from steelfusion.lab import call_node

_log = log.get("drill")

WRITE_RATE = 100.0
"""Writes a second per writer at most (qemu-io does ~1300 at QD1 here): bounds the data."""
MAX_WRITE_BLOCKS = 16
STALL_LIMIT = 120.0
"""Seconds without an answer before a write is indeterminate (well above any healed fault)."""
OPEN_TIMEOUT = 30.0
SAMPLE_EVERY = 0.25
STATUS_TIMEOUT = 1.0
PROMPT = b"qemu-io> "
_WROTE = re.compile(rb"wrote (\d+)/(\d+) bytes at offset (\d+)")


class Run(Protocol):
    """What the writers and samplers use of the drill that runs them."""

    seed: int
    branch_ns: str
    rec: Recorder
    abort: threading.Event
    stop_writes: threading.Event
    stop_sampling: threading.Event

    def next_id(self) -> int: ...

    def say(self, text: str, quiet: bool = False) -> None: ...


# --- recording -----------------------------------------------------------------------------


class Recorder:
    """The history, shared by the writer, sampler and fault threads (one lock)."""

    def __init__(self) -> None:
        self.h = History()
        self.lock = threading.Lock()

    def __getattr__(self, name: str) -> Callable[..., Any]:
        fn = getattr(self.h, name)

        def locked(*a: Any, **k: Any) -> Any:
            with self.lock:
                return fn(*a, **k)

        return locked


# --- workload ------------------------------------------------------------------------------


class _Stall(Exception):
    pass


class _Gone(Exception):
    pass


class QemuIo:
    """One interactive ``qemu-io -f raw URL`` in a namespace (``""``: this one, as on the
    loopback HA lab); commands end at its prompt."""

    live: set[QemuIo] = set()
    """Every qemu-io not yet reaped (the runner's cleanup kills what is left)."""
    _live_lock = threading.Lock()

    def __init__(self, url: str, netns_name: str) -> None:
        from steelfusion import netns

        self.proc = subprocess.Popen(
            [shutil.which("qemu-io") or "qemu-io", "-f", "raw", url], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            preexec_fn=netns.preexec(netns_name) if netns_name else None)
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.fd = self.proc.stdout.fileno()
        self.stdin = self.proc.stdin
        self.buf = b""
        with QemuIo._live_lock:
            QemuIo.live.add(self)

    @classmethod
    def kill_all(cls) -> None:
        with cls._live_lock:
            left = list(cls.live)
        for q in left:
            q.kill()

    def until_prompt(self, timeout: float) -> bytes:
        """Output up to the next prompt; :class:`_Stall` after ``timeout`` s, :class:`_Gone`
        if qemu-io exits."""
        deadline = time.monotonic() + timeout
        while PROMPT not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Stall()
            r, _, _ = select.select([self.fd], [], [], min(left, 1.0))
            if r:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    raise _Gone(self.buf.decode(errors="replace").strip()[-300:])
                self.buf += chunk
        out, _, self.buf = self.buf.partition(PROMPT)
        return out

    def send(self, line: str) -> None:
        self.stdin.write(line.encode() + b"\n")
        self.stdin.flush()

    def close(self, grace: float = 5.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.send("quit")
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reap()

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.kill()
        self._reap()

    def _reap(self) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        with QemuIo._live_lock:
            QemuIo.live.discard(self)
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                if f is not None:
                    f.close()


class Writer(threading.Thread):
    """Writes one LUN through one qemu-io, one write at a time, into the history."""

    def __init__(self, drill: Run, lun: int, url: str, size: int) -> None:
        super().__init__(name=f"writer-lun{lun}", daemon=True)
        self.d = drill
        self.lun = lun
        self.url = url
        self.blocks = size // BLOCK
        self.rng = random.Random(f"{drill.seed}/writer/{lun}")
        self.file = Path(f"/dev/shm/sf-drill-{os.getpid()}-{lun}.blk")
        self.q: QemuIo | None = None
        self.stats: Counter[str] = Counter()
        self.error: str | None = None

    def run(self) -> None:
        try:
            self._loop()
        except Exception as e:  # a runner bug: stop the drill, say where
            self.error = f"writer of LUN {self.lun}: {type(e).__name__}: {e}"
            _log.error("writer_failed", lun=self.lun, error=self.error,
                       traceback=traceback.format_exc())
            self.d.abort.set()
        finally:
            if self.q is not None:
                self.q.close()
                self.q = None
            self.file.unlink(missing_ok=True)

    def _open(self) -> QemuIo | None:
        while not self.d.stop_writes.is_set() and not self.d.abort.is_set():
            q = QemuIo(self.url, self.d.branch_ns)
            try:
                q.until_prompt(OPEN_TIMEOUT)
                self.stats["opens"] += 1
                return q
            except (_Stall, _Gone) as e:
                self.stats["open_failures"] += 1
                _log.info("qemu_io_open_failed", lun=self.lun, why=str(e) or "timeout")
                q.kill()
                self.d.stop_writes.wait(1.0)
        return None

    def _loop(self) -> None:
        fd = os.open(self.file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.close(fd)
        period = 1.0 / WRITE_RATE
        next_at = time.monotonic()
        while not self.d.stop_writes.is_set() and not self.d.abort.is_set():
            if self.q is None:
                self.q = self._open()
                if self.q is None:
                    return
            now = time.monotonic()
            if next_at > now:
                time.sleep(next_at - now)
            next_at = max(next_at + period, time.monotonic() - 1.0)
            self._write_one(self.q)

    def _write_one(self, q: QemuIo) -> None:
        n = self.rng.randint(1, min(MAX_WRITE_BLOCKS, self.blocks))
        first = self.rng.randrange(0, self.blocks - n + 1)
        wid = self.d.next_id()
        data = payloads(self.d.seed, wid, self.lun, first, n)
        self.file.write_bytes(data)
        off, length = first * BLOCK, n * BLOCK
        t0 = time.time()
        try:
            q.send(f"write -s {self.file} {off} {length}")
        except OSError:  # qemu-io is gone: nothing was sent
            self.q = None
            q.kill()
            return
        rec = self.d.rec
        rec.write_started(wid, self.lun, first, n, t0)
        try:
            out = q.until_prompt(STALL_LIMIT)
        except (_Stall, _Gone) as e:
            rec.write_ended(wid, time.time(), "indeterminate")
            self.stats["indeterminate"] += 1
            why = "no answer" if isinstance(e, _Stall) else f"qemu-io exited: {e}"
            _log.warning("write_indeterminate", lun=self.lun, write=wid, why=why)
            self.d.say(f"LUN {self.lun}: write {wid} indeterminate ({why}); new qemu-io",
                       quiet=True)
            self.q = None
            q.kill()
            return
        t1 = time.time()
        m = _WROTE.search(out)
        if m and int(m.group(1)) == int(m.group(2)) == length and int(m.group(3)) == off:
            rec.write_ended(wid, t1, "ok")
            rec.write_latency(t1, t1 - t0, self.lun)
            self.stats["ok"] += 1
            return
        rec.write_ended(wid, t1, "failed")
        self.stats["failed"] += 1
        text = out.decode(errors="replace").strip()
        _log.info("write_failed", lun=self.lun, write=wid, output=text[-300:])
        if b"failed" not in out and b"error" not in out.lower():
            raise RuntimeError(f"unexpected qemu-io answer to a write: {text[-300:]!r}")


# --- sampling ------------------------------------------------------------------------------


class Sampler(threading.Thread):
    """Samples one node's status into the history every :data:`SAMPLE_EVERY` seconds."""

    def __init__(self, drill: Run, node: dict[str, Any], kind: str) -> None:
        super().__init__(name=f"sampler-{node['name']}", daemon=True)
        self.d = drill
        self.node = node
        self.kind = kind
        self.prev: tuple[float, Any, dict[str, tuple[int, int]]] | None = None
        self.count = 0

    def run(self) -> None:
        try:
            while not self.d.stop_sampling.wait(SAMPLE_EVERY):
                self.sample()
        except Exception as e:
            _log.error("sampler_failed", node=self.node["name"], error=repr(e),
                       traceback=traceback.format_exc())
            self.d.abort.set()

    def sample(self) -> None:
        name = self.node["name"]
        st, why, t0, t1 = _ask(self.node)
        self.count += 1
        rec = self.d.rec
        if st is None:
            rec.node_state(t1, name, None, None, why, False)
            return
        if self.kind == "edge":
            core = st.get("core") or {}
            # "running" (green on the timeline): connected to a primary Core
            rec.node_state(t1, name, "edge", None,
                           "running" if core.get("connected") else "disconnected", False)
            return
        acking, since, self.prev = _acking(self.prev, st, t0)
        rec.node_state(t1, name, st.get("role"), st.get("epoch"), st.get("replication"),
                       acking, since=since)


Prev = tuple[float, Any, dict[str, tuple[int, int]]]


def _ask(node: dict[str, Any]) -> tuple[dict[str, Any] | None, str, float, float]:
    """(status or None, why not: down / no-answer, asked at, answered at)."""
    t0 = time.time()
    try:
        st: dict[str, Any] | None = call_node(node, "status", timeout=STATUS_TIMEOUT)
        if st is not None and not st.get("ok"):
            st = None
        why = "no-answer"
    except (OSError, ValueError, control.ControlError) as e:
        st = None
        why = "down" if isinstance(e, ConnectionRefusedError) else "no-answer"
    return st, why, t0, time.time()


def _acking(prev: Prev | None, st: dict[str, Any], t0: float) -> tuple[bool, float, Prev]:
    """Did this Core acknowledge Edge writes since ``prev`` (a primary whose ``acked_seq``
    grew on a LUN stream, same process)? Returns (acking, since, the new prev)."""
    acked = {lun: (int(v.get("stream") or 0), int(v.get("acked_seq") or 0))
             for lun, v in (st.get("luns") or {}).items()}
    acking = False
    since = t0
    if prev is not None:
        p_t0, p_pid, p_acked = prev
        since = p_t0
        acking = st.get("role") == "primary" and p_pid == st.get("pid") and any(
            lun in p_acked and p_acked[lun][0] == s and a > p_acked[lun][1]
            for lun, (s, a) in acked.items())
    return acking, since, (t0, st.get("pid"), acked)


class HaSampler(Sampler):
    """One Core of an HA lab: its own LUNs (node ``core-a1``, group its replication pair) and,
    while it serves its partner's after a takeover, those too (node ``core-a2@core-a1``, the
    partner's group), asked at its takeover control address. Acknowledging is judged only
    between two consecutive answers of the same Core: after a silence (killed, stopped), a
    standby or a handback, the next answer starts afresh, so an interval never spans the time
    the partner served these LUNs."""

    def __init__(self, drill: Run, node: dict[str, Any], partner_group: str | None) -> None:
        super().__init__(drill, node, "core")
        self.group: str | None = node.get("pair")
        self.partner_group = partner_group
        self.hosted_prev: Prev | None = None

    def sample(self) -> None:
        name = self.node["name"]
        rec = self.d.rec
        st, why, t0, t1 = _ask(self.node)
        self.count += 1
        if st is None:
            rec.node_state(t1, name, None, None, why, False, group=self.group)
            self.prev = self.hosted_prev = None
            return
        acking, since, self.prev = _acking(self.prev, st, t0)
        rec.node_state(t1, name, st.get("role"), st.get("epoch"), st.get("replication"),
                       acking, since=since, group=self.group)
        hosted = (st.get("ha") or {}).get("hosted")
        hs = None
        if isinstance(hosted, dict) and self.node.get("takeover_control"):
            hs, _, h0, h1 = _ask({"control": self.node["takeover_control"]})
        if hs is None or not isinstance(hosted, dict):
            self.hosted_prev = None
            return
        acking, since, self.hosted_prev = _acking(self.hosted_prev, hs, h0)
        rec.node_state(h1, f"{hosted.get('name') or hs.get('name')}@{name}", hs.get("role"),
                       hs.get("epoch"), hs.get("replication"), acking, since=since,
                       group=self.partner_group)
