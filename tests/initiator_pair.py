"""The sans-IO initiator wired in memory to the project's own target (an in-memory LU),
bytes moved in any chunking: the pair the initiator tests drive."""

from __future__ import annotations

import random
from collections.abc import Callable, Coroutine
from typing import Any

from edge.auth import Access, ChapAuthenticator
from edge.iscsi_session import (
    ScsiCommandReady,
    SessionConfig,
    TargetConnection,
    TargetInfo,
)
from edge.scsi import LogicalUnit
from edge.scsi.lu import ItNexus
from steelfusion.iscsi import commands as cdbs
from steelfusion.iscsi import initiator
from steelfusion.iscsi.chap import ChapCredentials
from steelfusion.iscsi.initiator import InitiatorConfig, InitiatorConnection
from steelfusion.iscsi.pdu import INITIATOR_OPCODES, PduDecoder
from steelfusion.iscsi.text import (
    InitiatorLimits,
    TargetLimits,
)
from tests.test_scsi import MemBackend

IQN = "iqn.2026-01.io.steelfusion:initiator-test"
INITIATOR = "iqn.2026-01.io.steelfusion:core"
BS = 512
SECRET = b"initiator-secret-1"
TSECRET = b"target-secret-22"

Chunker = Callable[[bytes], list[bytes]]


def whole(b: bytes) -> list[bytes]:
    return [b] if b else []


def bytewise(b: bytes) -> list[bytes]:
    return [b[i:i + 1] for i in range(len(b))]


def random_cuts(seed: int) -> Chunker:
    rng = random.Random(seed)

    def cut(b: bytes) -> list[bytes]:
        out, i = [], 0
        while i < len(b):
            n = rng.choice((1, 3, 47, 48, 49, 500, 4096, 70000))
            out.append(b[i:i + n])
            i += n
        return out
    return cut


def finish(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never waits (an in-memory LU) to its end."""
    try:
        coro.send(None)
    except StopIteration as e:
        return e.value
    coro.close()
    raise AssertionError("the in-memory LU waited")


class Pair:
    """The initiator and a TargetConnection over an in-memory LU, bytes
    moved by :meth:`pump` in the pieces ``chunks`` cuts them into."""

    def __init__(self, *, limits: InitiatorLimits | None = None,
                 target_limits: TargetLimits | None = None, window: int = 128,
                 chunks: Chunker = whole, chap: ChapCredentials | None = None,
                 mutual: ChapCredentials | None = None, access: Access | None = None,
                 blocks: int = 4096, nop_interval_s: float | None = None,
                 login: bool = True) -> None:
        self.backend = MemBackend(blocks, BS)
        self.lu = LogicalUnit(self.backend)
        auth = ChapAuthenticator({IQN: access}) if access is not None else None
        config = SessionConfig(targets={IQN: TargetInfo(IQN, frozenset({0}))},
                               limits=target_limits or TargetLimits(), cmd_window=window,
                               authenticator=auth)
        self.tgt = TargetConnection(config, portal="127.0.0.1:3260", tsih=5)
        self.ini = InitiatorConnection(InitiatorConfig(
            INITIATOR, IQN, chap=chap, mutual=mutual, limits=limits or InitiatorLimits(),
            nop_interval_s=nop_interval_s), now=0.0)
        self.nexus = ItNexus(INITIATOR, self.ini.config.isid, IQN, 1, 1)
        self.lu.attach(self.nexus)
        self.chunks = chunks
        self.events: list[initiator.Event] = []
        self.hold = False
        self.held: list[ScsiCommandReady] = []
        self.wire_out = 0
        if login:
            self.pump()

    def pump(self) -> list[initiator.Event]:
        """Move bytes both ways until both sides are quiet."""
        new: list[initiator.Event] = []
        while True:
            out = b"".join(bytes(b) for b in self.ini.data_to_send())
            back = b"".join(bytes(b) for b in self.tgt.data_to_send())
            if not out and not back:
                break
            self.wire_out += len(out)
            for piece in self.chunks(out):
                self._target(self.tgt.receive_data(piece))
            for piece in self.chunks(back):
                new += self.ini.receive_data(piece)
        self.events += new
        return new

    def _target(self, events: list[Any]) -> None:
        for ev in events:
            if isinstance(ev, ScsiCommandReady):
                if self.hold:
                    self.held.append(ev)
                else:
                    self.answer(ev)

    def answer(self, ev: ScsiCommandReady) -> None:
        res = finish(self.lu.execute(ev.cdb, ev.data, (0,), self.nexus))
        self._target(self.tgt.complete(ev.task_tag, res.status, res.data, res.sense,
                                       res.transfer_length))

    def release(self) -> list[initiator.Event]:
        """Answer the commands held back, then pump."""
        held, self.held = self.held, []
        for ev in held:
            self.answer(ev)
        return self.pump()

    def run(self, cdb: bytes, *, data: bytes = b"",
            read_length: int = 0) -> initiator.CommandComplete:
        tag = self.ini.submit(cdb, data=data, read_length=read_length)
        done = [e for e in self.pump() if isinstance(e, initiator.CommandComplete) and e.tag == tag]
        assert len(done) == 1, self.events[-5:]
        return done[0]

    def write(self, lba: int, data: bytes) -> initiator.CommandComplete:
        return self.run(cdbs.write16(lba, len(data) // BS), data=data)

    def read(self, lba: int, blocks: int) -> initiator.CommandComplete:
        return self.run(cdbs.read16(lba, blocks), read_length=blocks * BS)


def logged_in(p: Pair) -> initiator.LoginComplete:
    (done,) = [e for e in p.events if isinstance(e, initiator.LoginComplete)]
    assert p.ini.state is initiator.State.FULL_FEATURE
    return done


def pattern(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def initiator_pdus(ini: InitiatorConnection) -> list[Any]:
    """The PDUs the initiator has queued to send, decoded."""
    return PduDecoder(accept=INITIATOR_OPCODES).feed(b"".join(bytes(b) for b in
                                                               ini.data_to_send()))
