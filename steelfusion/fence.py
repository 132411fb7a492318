"""Fencing a partner Core on the shared SAN LUNs with SCSI-3 persistent reservations
(issue 16, building block; the Core engine does not call it yet).

Two Cores of an HA pair reach the same array LUNs and the same Journal LUN. Before one
takes over a failed partner's LUNs it must make sure the partner, perhaps only cut off
from the Witness and still connected to the array, cannot write any more. The array
enforces that, not the Cores: each Core registers a reservation key on every shared LUN,
the leader holds a reservation that lets only registrants write, and fencing removes the
partner's registration, so every write it sends afterwards ends in RESERVATION CONFLICT.

**Keys** (:func:`reservation_key`): 8 bytes, ``b"SF"`` then the first 6 bytes of
BLAKE2b(core name, person ``steelfusion-pr``). Stable across restarts and hosts (no
state file needed: the partner computes the victim's key from its name), never zero (zero
means "unregister" in PERSISTENT RESERVE OUT), and readable as ours in ``sg_persist`` or
``tgtadm`` output (0x5346...).

**Type: WRITE EXCLUSIVE - REGISTRANTS ONLY** (5, SPC-4 Table 169; access by type in SPC-4
Table 65 / SBC-3 Table 13, as :mod:`edge.scsi.pr` implements them). The pair is
active-active: both Cores write their own LUNs and the shared Journal LUN, so the type must
let every registrant write (not WRITE EXCLUSIVE / EXCLUSIVE ACCESS, where only the holder
may). Registrants-only rather than all-registrants because it has one holder, the leader:
when the leader is the one that failed, the survivor's PREEMPT naming the holder's key
removes its registration and moves the reservation to the survivor in one command (SPC-4
§5.13.11.4), and with all-registrants a preempt naming a key only removes registrations
(SPC-4 §5.13.11.4.4). WRITE rather than EXCLUSIVE ACCESS because only writes can corrupt:
a fenced Core (and a third initiator, e.g. an operator's ``qemu-img info`` or a backup)
may still read, which helps it report what happened and costs nothing in safety.

**Fencing** is PREEMPT AND ABORT naming the victim's key: it also aborts the victim's
commands already in the array's task set (SPC-4 §5.13.11.5), so a write the victim sent
just before the fence cannot land after it. An array that does not have it (tgt answers
ILLEGAL REQUEST, INVALID FIELD IN CDB: ``PR_OUT_PREEMPT_AND_ABORT`` is commented out of
``persistent_reserve_out_actions`` in tgt's usr/spc.c) gets PREEMPT, and the report says
``aborted=False``: writes the victim had queued before the fence may still complete. Then
READ KEYS and READ RESERVATION check that the victim's key is gone and that it holds no
reservation; otherwise :class:`FenceError`.

**Re-registering after a fence is an explicit step.** A Core that sees RESERVATION
CONFLICT remembers it is fenced (the device's :meth:`trouble` says so, the Core raises the
alarm) and :meth:`Fence.join` refuses to register it again unless called with
``rejoin=True``: registering silently would undo the fence. The rejoin belongs to the
operator or to the HA layer once the Witness says the partner may come back. Likewise a
fenced Core cannot fence back: PREEMPT needs a registration (SPC-4 §5.13.11.4).

**On tgt** (the lab's array; measured in tests/test_fence.py) two more things differ from
SPC-4: a registration belongs to the iSCSI session (tgt matches its TSIH and creation
time), not to the I_T nexus, so after a new login, even with the same ISID, the Core is no
longer registered while its old key is still listed (an orphan, removed by the next
PREEMPT naming that key); and APTPL is refused (ILLEGAL REQUEST), so a restarted tgtd has
no registrations and no reservation. The HA layer has to register again after either,
which the device does not do by itself (see above).

Everything that decides is sans-IO: :class:`PrState` (what READ KEYS and READ RESERVATION
said), :func:`plan_join`, :func:`plan_fence`, :func:`check_fenced` and :func:`describe`.
:class:`Fence` runs the plans over devices that speak :class:`PrDevice`
(:class:`steelfusion.sandev.IscsiDevice`).
"""

from __future__ import annotations

import errno
import hashlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from steelfusion import log
from steelfusion.iscsi.commands import PrOut, PrType

RESERVATION_TYPE = PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY
KEY_PREFIX = b"SF"
_log = log.get("fence")

TYPE_WORDS: dict[int, str] = {
    PrType.WRITE_EXCLUSIVE: "WRITE EXCLUSIVE",
    PrType.EXCLUSIVE_ACCESS: "EXCLUSIVE ACCESS",
    PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY: "WRITE EXCLUSIVE - REGISTRANTS ONLY",
    PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: "EXCLUSIVE ACCESS - REGISTRANTS ONLY",
    PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS: "WRITE EXCLUSIVE - ALL REGISTRANTS",
    PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS: "EXCLUSIVE ACCESS - ALL REGISTRANTS",
}


class Fenced(OSError):
    """This Core's command was refused with RESERVATION CONFLICT: another Core holds the
    reservation and this one is not (or no longer) registered. errno EBADE is what Linux's
    block layer gives for a reservation conflict (BLK_STS_NEXUS)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EBADE, message)


class PrUnsupported(OSError):
    """The array refused a PERSISTENT RESERVE service action as unsupported (ILLEGAL
    REQUEST, INVALID FIELD IN CDB or INVALID COMMAND OPERATION CODE)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EOPNOTSUPP, message)


class FenceError(Exception):
    """Fencing cannot be done or did not take; the message says why and what to do."""


def reservation_key(core_name: str) -> int:
    """The Core's 8-byte reservation key (see the module docstring)."""
    if not core_name:
        raise ValueError("a Core's reservation key needs its name")
    digest = hashlib.blake2b(core_name.encode(), digest_size=6,
                             person=b"steelfusion-pr").digest()
    return int.from_bytes(KEY_PREFIX + digest, "big")


# --------------------------------------------------------------------------- state and words


@dataclass(frozen=True, slots=True)
class PrState:
    """One LUN's persistent reservations, as READ KEYS and READ RESERVATION reported them.
    ``holder`` is 0 for an all-registrants reservation (SPC-4 §6.15.3); ``type`` None when
    nothing is reserved."""

    generation: int
    keys: tuple[int, ...]
    holder: int | None = None
    type: int | None = None

    @classmethod
    def of(cls, keys: tuple[int, Sequence[int]],
           reservation: tuple[int, int | None, int | None]) -> PrState:
        """From the parsed answers (:func:`steelfusion.iscsi.commands.parse_read_keys`,
        :func:`~steelfusion.iscsi.commands.parse_read_reservation`)."""
        return cls(reservation[0], tuple(keys[1]), reservation[1], reservation[2])

    def registered(self, key: int) -> bool:
        return key in self.keys

    @property
    def reserved(self) -> bool:
        return self.type is not None


def key_words(key: int, names: dict[int, str]) -> str:
    name = names.get(key)
    return f"{name} (0x{key:016x})" if name else f"unknown key 0x{key:016x}"


def describe(state: PrState, names: dict[int, str]) -> str:
    """One line an operator reads: who is registered, who holds what."""
    if state.keys:
        seen: dict[int, int] = {}
        for k in state.keys:
            seen[k] = seen.get(k, 0) + 1
        regs = ", ".join(key_words(k, names) + (f" x{n}" if n > 1 else "")
                         for k, n in seen.items())
    else:
        regs = "nobody"
    if state.type is None:
        res = "not reserved"
    else:
        kind = TYPE_WORDS.get(state.type, f"type {state.type}")
        who = "every registrant" if not state.holder else key_words(state.holder, names)
        res = f"reserved by {who} as {kind}"
    return f"generation {state.generation}; registered: {regs}; {res}"


# --------------------------------------------------------------------------- plans


@dataclass(frozen=True, slots=True)
class Step:
    """One PERSISTENT RESERVE OUT this Core sends with its own key."""

    action: PrOut
    sa_key: int = 0
    pr_type: int = 0

    def __str__(self) -> str:
        extra = f" 0x{self.sa_key:016x}" if self.sa_key else ""
        return f"{self.action.name}{extra}" + (f" type {self.pr_type}" if self.pr_type else "")


def plan_join(state: PrState, key: int, *, leader: bool) -> list[Step]:
    """Register ``key`` (REGISTER AND IGNORE EXISTING KEY, safe to send again); the leader
    also reserves when nobody does. A reservation of another type or holder is left alone:
    the leader takes it over by fencing, not by joining."""
    steps = []
    if not state.registered(key):
        steps.append(Step(PrOut.REGISTER_AND_IGNORE, sa_key=key))
    if leader and not state.reserved:
        steps.append(Step(PrOut.RESERVE, pr_type=RESERVATION_TYPE))
    return steps


def plan_fence(state: PrState, key: int, victim: int, *, abort: bool = True) -> list[Step]:
    """The commands that remove ``victim``'s registrations and leave this Core holding the
    reservation. Nothing when the victim is already gone and we hold it (fencing twice is
    harmless). Raises :class:`FenceError` when this Core is not registered (a fenced Core
    cannot fence back)."""
    if victim == key:
        raise FenceError("a Core cannot fence itself (its key and the victim's are the same)")
    if not victim:
        raise FenceError("key 0 names no registration")
    if not state.registered(key):
        raise FenceError(f"this Core (0x{key:016x}) is not registered on the LUN: it was "
                         "fenced itself or never joined, and PREEMPT needs a registration")
    preempt = PrOut.PREEMPT_AND_ABORT if abort else PrOut.PREEMPT
    steps = []
    if state.registered(victim):
        # Naming the holder's key also moves the reservation to us (SPC-4 §5.13.11.4.3).
        steps.append(Step(preempt, sa_key=victim, pr_type=RESERVATION_TYPE))
    elif state.holder == victim:
        raise FenceError(f"the reservation is held by 0x{victim:016x}, which is not "
                         "registered: the array's state is inconsistent")
    if not state.reserved:
        steps.append(Step(PrOut.RESERVE, pr_type=RESERVATION_TYPE))
    return steps


def check_fenced(state: PrState, key: int, victim: int) -> str | None:
    """Why ``state`` does not show ``victim`` fenced by ``key`` (None when it does): the
    victim must hold no registration and no reservation, and a reservation that keeps
    non-registrants from writing must be in place."""
    if state.registered(victim):
        return f"the victim's key 0x{victim:016x} is still registered"
    if not state.reserved:
        return "nothing is reserved, so an unregistered Core may still write"
    if state.holder == victim:
        return "the victim still holds the reservation"
    if state.type not in (PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY,
                          PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY,
                          PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS,
                          PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS) and state.holder != key:
        return f"the reservation (type {state.type}) is held by another Core"
    return None


# --------------------------------------------------------------------------- I/O


class PrDevice(Protocol):
    """What :class:`Fence` needs of a LUN (:class:`steelfusion.sandev.IscsiDevice`).
    Errors are OSErrors: :class:`Fenced` for RESERVATION CONFLICT, :class:`PrUnsupported`
    for a service action the array lacks."""

    path: str

    def pr_read_keys(self) -> tuple[int, list[int]]: ...

    def pr_read_reservation(self) -> tuple[int, int | None, int | None]: ...

    def pr_register(self, key: int, *, rejoin: bool = False) -> None: ...

    def pr_reserve(self, key: int, pr_type: int) -> None: ...

    def pr_preempt(self, key: int, victim: int, pr_type: int, *, abort: bool) -> None: ...


@dataclass(frozen=True, slots=True)
class FenceReport:
    """What :meth:`Fence.fence` did on one LUN."""

    path: str
    steps: tuple[str, ...]
    aborted: bool
    """PREEMPT AND ABORT took (the victim's queued commands were aborted too)."""
    state: str
    seconds: float


class Fence:
    """This Core's reservations on its shared LUNs: join, fence a partner, status.

    ``names`` maps Core names to show in :meth:`status` (this Core's is added)."""

    def __init__(self, core_name: str, devices: Iterable[PrDevice],
                 names: Iterable[str] = (), clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.name = core_name
        self.key = reservation_key(core_name)
        self.devices = list(devices)
        self.names = {reservation_key(n): n for n in (*names, core_name)}
        self._clock = clock
        self._log = _log.bind(core=core_name, key=f"0x{self.key:016x}")

    def read(self, dev: PrDevice) -> PrState:
        return PrState.of(dev.pr_read_keys(), dev.pr_read_reservation())

    def join(self, *, leader: bool, rejoin: bool = False) -> None:
        """Register on every LUN; the leader reserves. On a device that saw this Core
        fenced, only with ``rejoin=True`` (the explicit operator/HA step)."""
        for dev in self.devices:
            for step in plan_join(self.read(dev), self.key, leader=leader):
                self._do(dev, step, rejoin=rejoin)
            self._log.info("fence_joined", lun=dev.path, leader=leader, rejoin=rejoin)

    def fence(self, victim: int | str) -> list[FenceReport]:
        """Fence ``victim`` (its key, or its Core name) on every LUN, then check it took.
        Raises :class:`FenceError` (or :class:`Fenced` when this Core was fenced itself)."""
        vkey = reservation_key(victim) if isinstance(victim, str) else victim
        reports = []
        for dev in self.devices:
            t0 = self._clock()
            done: list[str] = []
            aborted = False
            for step in plan_fence(self.read(dev), self.key, vkey):
                if step.action is PrOut.PREEMPT_AND_ABORT:
                    try:
                        self._do(dev, step)
                        aborted = True
                    except PrUnsupported:
                        self._log.warning("fence_preempt_and_abort_unsupported", lun=dev.path,
                                          consequence="commands the victim queued before "
                                          "the fence may still complete")
                        step = Step(PrOut.PREEMPT, step.sa_key, step.pr_type)
                        self._do(dev, step)
                else:
                    self._do(dev, step)
                done.append(str(step))
            state = self.read(dev)
            why = check_fenced(state, self.key, vkey)
            if why is not None:
                raise FenceError(f"fencing {key_words(vkey, self.names)} on {dev.path} did "
                                 f"not take: {why} ({describe(state, self.names)})")
            report = FenceReport(dev.path, tuple(done), aborted, describe(state, self.names),
                                 self._clock() - t0)
            self._log.warning("fence_done", lun=dev.path, victim=key_words(vkey, self.names),
                              steps=list(done), aborted=aborted)
            reports.append(report)
        return reports

    def status(self) -> list[str]:
        """One line per LUN: ``path: generation N; registered: ...; reserved by ...``."""
        return [f"{dev.path}: {describe(self.read(dev), self.names)}" for dev in self.devices]

    def _do(self, dev: PrDevice, step: Step, *, rejoin: bool = False) -> None:
        a = step.action
        if a in (PrOut.REGISTER_AND_IGNORE, PrOut.REGISTER):
            dev.pr_register(step.sa_key, rejoin=rejoin)
        elif a is PrOut.RESERVE:
            dev.pr_reserve(self.key, step.pr_type)
        elif a in (PrOut.PREEMPT, PrOut.PREEMPT_AND_ABORT):
            dev.pr_preempt(self.key, step.sa_key, step.pr_type,
                           abort=a is PrOut.PREEMPT_AND_ABORT)
        else:
            raise FenceError(f"no plan sends {a.name}")
