"""iSCSI target connection and session state machine, sans-IO (RFC 7143).

:class:`TargetConnection` is one TCP connection's worth of protocol: bytes in
through :meth:`~TargetConnection.receive_data`, bytes out through
:meth:`~TargetConnection.data_to_send`, and events for the adapter
(``edge.target``) to act on.  It never touches a socket, a clock or a disk:
time is an argument, and SCSI commands leave as :class:`ScsiCommandReady`
events and come back through :meth:`~TargetConnection.complete`, in any
order.  With MaxConnections=1 (we negotiate nothing else) a connection and
its session are the same object.

What it implements (RFC 7143 section numbers):

* Login (§6.3, §11.12-13): security stage skipped unless an
  :class:`Authenticator` demands it, operational negotiation
  (``steelfusion.iscsi.text``), transit to Full Feature Phase, status codes.
* Discovery sessions (§4.3, Appendix C): only Text SendTargets, NOP and Logout.
* Command numbering (§4.2.2): CmdSN window with MaxCmdSN = ExpCmdSN +
  free slots - 1 (never decreasing), out-of-window commands silently
  dropped, immediate commands outside the window; StatSN per connection.
* Writes (§4.2.5, §11.7, §11.8): immediate data, one unsolicited burst up to
  FirstBurstLength when InitialR2T=No, R2Ts of at most MaxBurstLength with at
  most MaxOutstandingR2T per task, DataSN/offset checks.
* Reads (§11.7): Data-In cut to the initiator's MaxRecvDataSegmentLength and
  MaxBurstLength sequences, status on the last Data-In (S bit), residual
  overflow/underflow (§11.4.5).
* NOP-Out/In (§11.18-19), Logout (§11.14-15), Task Management (§11.5-6),
  Reject (§11.17), CRC32C digests (§13.1).  ErrorRecoveryLevel is 0, so any
  framing or digest error ends the connection (§7.1.3).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from edge.scsi.cdb import decode_lun
from edge.scsi.sense import CHECK_CONDITION, GOOD, SenseKey, fixed_sense
from steelfusion.iscsi.pdu import (
    INITIATOR_OPCODES,
    R2T,
    RESERVED_TAG,
    Buffer,
    DataOut,
    IscsiProtocolError,
    LoginRequest,
    LoginResponse,
    LogoutRequest,
    LogoutResponse,
    NopIn,
    NopOut,
    Pdu,
    PduDecoder,
    Reject,
    RejectReason,
    ScsiCommand,
    ScsiResponse,
    SnackRequest,
    TaskMgmtRequest,
    TaskMgmtResponse,
    TextRequest,
    TextResponse,
    data_in_header,
    frame,
    scsi_response_header,
    sense_segment,
)
from steelfusion.iscsi.text import (
    REJECT,
    Negotiator,
    Pairs,
    SessionParams,
    TargetLimits,
    decode_text,
    encode_text,
    send_targets,
    split_text,
)

_M = 0xFFFFFFFF

# Sense for transport-level failures (RFC 7143 §11.4.7.2).
_ABORTED_COMMAND = SenseKey.ABORTED_COMMAND
_ILLEGAL_REQUEST = SenseKey.ILLEGAL_REQUEST
_SENSE_ABORTED_COMMAND = fixed_sense(_ABORTED_COMMAND, 0x00, 0x00)


def sn_lt(a: int, b: int) -> bool:
    """Serial-number a < b for 32-bit sequence numbers (RFC 1982, RFC 7143 §4.2.2.1)."""
    return a != b and ((b - a) & _M) < 0x80000000


def sn_gt(a: int, b: int) -> bool:
    return a != b and ((a - b) & _M) < 0x80000000


class TmfFunction(enum.IntEnum):
    """Task management function codes (RFC 7143 §11.5.1)."""

    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LOGICAL_UNIT_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    TASK_REASSIGN = 8


class TmfResponse(enum.IntEnum):
    """Task management response codes (RFC 7143 §11.6.1)."""

    FUNCTION_COMPLETE = 0
    TASK_DOES_NOT_EXIST = 1
    LUN_DOES_NOT_EXIST = 2
    TASK_STILL_ALLEGIANT = 3
    REASSIGNMENT_NOT_SUPPORTED = 4
    NOT_SUPPORTED = 5
    AUTHORIZATION_FAILED = 6
    FUNCTION_REJECTED = 255


class LoginStatus(enum.IntEnum):
    """Login Response status class/detail (RFC 7143 §11.13.5)."""

    SUCCESS = 0x0000
    INITIATOR_ERROR = 0x0200
    AUTH_FAILURE = 0x0201
    AUTHORIZATION_FAILURE = 0x0202
    NOT_FOUND = 0x0203
    UNSUPPORTED_VERSION = 0x0205
    MISSING_PARAMETER = 0x0207
    SESSION_TYPE_UNSUPPORTED = 0x0209
    SESSION_DOES_NOT_EXIST = 0x020A
    INVALID_DURING_LOGIN = 0x020B
    TARGET_ERROR = 0x0300


class State(enum.Enum):
    LOGIN = "login"
    FULL_FEATURE = "full_feature"
    CLOSED = "closed"


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True, slots=True)
class TargetInfo:
    """What the protocol needs to know of one target node."""

    name: str
    luns: frozenset[int]
    alias: str | None = None


class AuthExchange(Protocol):
    """One login's authentication exchange (RFC 7143 §12): ``methods`` lists
    the AuthMethod values accepted, best first; ``step`` consumes one Login
    Request's security keys and returns (keys to answer, outcome): True =
    authenticated, False = refused (``reason`` says why, without secrets),
    None = more round trips needed.  ``edge.auth.ChapExchange`` is one."""

    reason: str

    def methods(self) -> Sequence[str]: ...

    def step(self, method: str, keys: Mapping[str, str]) -> tuple[Pairs, bool | None]: ...


class Authenticator(Protocol):
    """Security-stage hook (RFC 7143 §6.3.2, §12); ``edge.auth`` implements it.

    ``authorize`` is the access list: False ends the login with status
    0x0202 (authorization failure).  ``begin`` returns the exchange this
    initiator must complete for this target (None for a discovery session),
    or None when no authentication is required."""

    def authorize(self, initiator_name: str, target_name: str | None) -> bool: ...

    def begin(self, initiator_name: str, target_name: str | None) -> AuthExchange | None: ...


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """Target-side settings shared by all connections of one portal."""

    targets: Mapping[str, TargetInfo]
    limits: TargetLimits = field(default_factory=TargetLimits)
    portal_group_tag: int = 1
    cmd_window: int = 128
    """Commands the initiator may have queued (MaxCmdSN - ExpCmdSN + 1)."""
    max_write_buffer_bytes: int = 64 * 1024 * 1024
    """Solicited write data we are willing to hold per connection; R2Ts for
    further commands wait until earlier writes finish."""
    max_command_bytes: int = 16 * 1024 * 1024
    """Largest Expected Data Transfer Length accepted for a write."""
    login_timeout_s: float = 15.0
    authenticator: Authenticator | None = None
    defer_resets: bool = False
    """LOGICAL UNIT RESET and TARGET WARM/COLD RESET reach other sessions and
    the LU's shared state, which only the adapter can touch: with this set
    the connection emits :class:`ResetRequested` once its own tasks are done
    and answers when the adapter calls :meth:`TargetConnection.complete_tmf`."""


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class LoginComplete:
    """The connection entered Full Feature Phase."""

    initiator_name: str
    initiator_alias: str | None
    target_name: str | None
    session_type: str
    isid: int
    tsih: int
    cid: int
    params: SessionParams


@dataclass(frozen=True, slots=True)
class LoginFailed:
    """The login was refused with ``status`` (RFC 7143 §11.13.5); ``reason``
    is for the log and holds no secret.  A CloseConnection follows."""

    status: int
    reason: str
    initiator_name: str | None
    target_name: str | None


@dataclass(slots=True)
class ScsiCommandReady:
    """A SCSI command whose Data-Out (if any) has fully arrived.  Answer with
    :meth:`TargetConnection.complete` (exactly once, any order)."""

    task_tag: int
    lun: int
    cdb: bytes
    data: Buffer
    expected_length: int
    read: bool
    write: bool
    immediate: bool
    cmdsn: int


@dataclass(frozen=True, slots=True)
class TasksAborted:
    """Task management aborted these running tasks; their responses will be
    dropped.  The adapter should stop the work and report each with
    :meth:`TargetConnection.task_cancelled` (or let it finish and call
    :meth:`~TargetConnection.complete`): a TMF that aborted a task is
    answered only once the task has ended, so a long command must be
    cancelled for the answer to go out promptly."""

    task_tags: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ResetRequested:
    """A reset TMF (RFC 7143 §11.5.1) whose local tasks are finished: reset
    the LU(s) across every session, then call
    :meth:`TargetConnection.complete_tmf` with ``task_tag``."""

    task_tag: int
    function: int
    lun: int


@dataclass(frozen=True, slots=True)
class LogoutComplete:
    """Logout Response queued; flush output, then close."""

    reason: int


@dataclass(frozen=True, slots=True)
class CloseConnection:
    """The protocol is done with this connection (login failure, timeout,
    reset); flush output, then close."""

    reason: str


FastLane = Callable[[int, bytes, Buffer], tuple[int, Buffer, Buffer, int | None] | None]

Event = (LoginComplete | LoginFailed | ScsiCommandReady | TasksAborted | ResetRequested
         | LogoutComplete | CloseConnection)

# --------------------------------------------------------------------------- tasks


class _TaskState(enum.Enum):
    COLLECTING = 1  # waiting for Data-Out
    RUNNING = 2  # handed to SCSI


class _R2TState:
    __slots__ = ("length", "next_datasn", "offset", "received")

    def __init__(self, offset: int, length: int) -> None:
        self.offset = offset
        self.length = length
        self.received = 0
        self.next_datasn = 0


class _Task:
    __slots__ = (
        "aborted",
        "admitted",
        "cdb",
        "chunks",
        "cmdsn",
        "edtl",
        "immediate",
        "itt",
        "lun",
        "lun_raw",
        "next_offset",
        "queued",
        "r2ts",
        "r2tsn",
        "read",
        "received",
        "state",
        "unsol_datasn",
        "unsol_limit",
        "unsol_open",
        "write",
    )

    def __init__(self, pdu: ScsiCommand, lun: int) -> None:
        self.itt = pdu.itt
        self.lun = lun
        self.lun_raw = pdu.lun
        self.cdb = pdu.cdb
        self.edtl = pdu.expected_length
        self.read = pdu.read
        self.write = pdu.write
        self.immediate = pdu.immediate
        self.cmdsn = pdu.cmdsn
        self.state = _TaskState.COLLECTING
        self.chunks: list[tuple[int, Buffer]] = []
        self.received = 0
        self.unsol_open = False
        self.unsol_limit = 0
        self.unsol_datasn = 0
        self.next_offset = 0
        self.r2tsn = 0
        self.r2ts: dict[int, _R2TState] = {}
        self.aborted = False
        self.admitted = False
        self.queued = False

    def add(self, offset: int, data: Buffer) -> None:
        self.chunks.append((offset, data))
        self.received += len(data)

    def take_data(self) -> Buffer:
        """The Data-Out buffer: the single chunk as received when there is
        one (no copy), else the chunks assembled by offset."""
        chunks = self.chunks
        self.chunks = []
        if not chunks:
            return b""
        if len(chunks) == 1 and chunks[0][0] == 0:
            return chunks[0][1]
        # Offsets were checked on arrival (no gaps, no overlaps), so the
        # chunks in offset order are the buffer: one join, no zero-fill.
        chunks.sort(key=_offset)
        return b"".join([c for _, c in chunks])


def _offset(chunk: tuple[int, Buffer]) -> int:
    return chunk[0]


@dataclass(slots=True)
class _PendingTmf:
    pdu: TaskMgmtRequest
    waiting: set[int]
    close_after: bool = False


_RESETS = frozenset({5, 6, 7})  # LOGICAL UNIT RESET, TARGET WARM RESET, TARGET COLD RESET

IMMEDIATE_SLACK = 16
"""Immediate commands allowed beyond the CmdSN window before we Reject
them (reason 0x06, RFC 7143 §11.17.1)."""

_DISCARD_MAX = 1024


class TargetConnection:
    """Target side of one iSCSI connection (and its single-connection session).

    ``portal`` is the "host:port" we advertise in SendTargets for this
    connection, ``tsih`` the session handle to give the session if it logs
    in (unique per target portal group, nonzero).  ``fast(lun, cdb, data)``
    is the adapter's fast lane: it returns ``(status, data_in, sense,
    transfer_length)`` for a command it finished at once, or None to take
    the normal path (a :class:`ScsiCommandReady` event).
    """

    def __init__(self, config: SessionConfig, *, portal: str, tsih: int, now: float = 0.0,
                 fast: FastLane | None = None) -> None:
        if not 0 < tsih <= 0xFFFF:
            raise ValueError("tsih must be 1..65535")
        self.config = config
        self.portal = portal
        self.tsih = tsih
        self.state = State.LOGIN
        self.params = SessionParams()
        self.initiator_name: str | None = None
        self.initiator_alias: str | None = None
        self.target: TargetInfo | None = None
        self.session_type = "Normal"
        self.isid = 0
        self.cid = 0
        limits = config.limits
        self._decoder = PduDecoder(
            max_data_segment_length=max(limits.max_recv_data_segment_length, 8192) + 4096,
            accept=INITIATOR_OPCODES)
        self._out: list[Buffer] = []
        self._events: list[Event] = []
        self._hd = False
        self._dd = False
        # numbering
        self._statsn = 0
        self._exp_cmdsn = 0
        self._max_cmdsn = 0
        self._ahead: set[int] = set()
        self._window = config.cmd_window
        self._exp_statsn = 0
        self._next_ttt = 1
        # login
        self._login_started = False
        self._login_deadline = now + config.login_timeout_s
        self._login_buf = bytearray()
        self._stage: int | None = None
        self._negotiator = Negotiator(limits)
        self._auth_method: str | None = None
        self._auth: AuthExchange | None = None
        self._authenticated = False
        self._discovery = False
        # full feature
        self._tasks: dict[int, _Task] = {}
        self._r2t_wait: deque[_Task] = deque()
        self._write_bytes = 0
        self._discard: dict[int, None] = {}
        self._tmfs: list[_PendingTmf] = []
        self._resets: dict[int, _PendingTmf] = {}
        self._logout: LogoutRequest | None = None
        self._text_buf = bytearray()
        self._text_more: list[bytes] = []
        self._text_ttt = RESERVED_TAG
        self.fast = fast
        self._handlers = {
            ScsiCommand: self._on_scsi_command, DataOut: self._on_data_out,
            NopOut: self._on_nop_out, TextRequest: self._on_text,
            TaskMgmtRequest: self._on_tmf, LogoutRequest: self._on_logout,
            SnackRequest: self._on_snack, LoginRequest: self._on_login_in_ffp,
        }

    # ----------------------------------------------------------------- public API

    @property
    def outstanding(self) -> int:
        """Tasks received and not yet answered."""
        return len(self._tasks)

    def receive_data(self, data: Buffer) -> list[Event]:
        """Process received bytes; returns events.  Raises
        :class:`IscsiProtocolError` when the connection must be dropped (a
        Reject may have been queued first: flush :meth:`data_to_send`)."""
        if self.state is State.CLOSED:
            return []
        self._decoder.add(data)
        return self._process()

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """For an asyncio ``BufferedProtocol``: where to receive the next bytes
        (large data segments land straight in their PDU's own buffer)."""
        return self._decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> list[Event]:
        """:meth:`receive_data` for bytes received into :meth:`get_buffer`."""
        if self.state is State.CLOSED:
            return []
        self._decoder.buffer_updated(nbytes)
        return self._process()

    def _process(self) -> list[Event]:
        events = self._events = []
        try:
            while self.state is not State.CLOSED:
                pdu = self._decoder.next()
                if pdu is None:
                    break
                if self.state is State.LOGIN:
                    self._on_login_phase(pdu)
                else:
                    self._handlers[type(pdu)](pdu)  # type: ignore[operator]
        except IscsiProtocolError as e:
            if self.state is State.FULL_FEATURE and e.reason is not None and e.header:
                self._send(Reject(reason=e.reason, statsn=self._take_statsn(),
                                  exp_cmdsn=self._exp_cmdsn, max_cmdsn=self._maxsn(),
                                  data=e.header))
            self.state = State.CLOSED
            raise
        return events

    def data_to_send(self) -> list[Buffer]:
        """Buffers queued for the wire since the last call (for writelines)."""
        out = self._out
        self._out = []
        return out

    def complete(self, task_tag: int, status: int, data: Buffer = b"", sense: Buffer = b"",
                 transfer_length: int | None = None) -> list[Event]:
        """Answer a :class:`ScsiCommandReady`.  ``data`` is Data-In, ``sense``
        fixed-format sense for CHECK CONDITION, ``transfer_length`` the
        bytes the command wanted to move when that is not ``len(data)`` (so
        write residuals are right).  Returns events (e.g. a deferred logout)."""
        task = self._tasks.get(task_tag)
        if task is None or task.state is not _TaskState.RUNNING:
            return []
        events = self._events = []
        self._finish(task)
        if task.aborted:
            self._tmf_progress(task.itt)
        elif self.state is State.FULL_FEATURE:
            self._respond(task, status, data, sense, transfer_length)
        self._maybe_finish_logout()
        return events

    def task_cancelled(self, task_tag: int) -> list[Event]:
        """The adapter stopped the command of ``task_tag`` before it had a
        result (it cancelled it after :class:`TasksAborted`).  An aborted task
        ends without any status (SAM-5 §7.2: after ABORT TASK the task sends
        nothing more), and the TMF waiting for it may now be answered.  A task
        that was not aborted ends with CHECK CONDITION, ABORTED COMMAND, so
        the initiator is never left waiting.  Returns events, as
        :meth:`complete` does."""
        return self.complete(task_tag, CHECK_CONDITION, sense=_SENSE_ABORTED_COMMAND)

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` next needs to run (login timeout)."""
        return self._login_deadline if self.state is State.LOGIN else None

    def handle_timer(self, now: float) -> list[Event]:
        events: list[Event] = []
        if self.state is State.LOGIN and now >= self._login_deadline:
            self.state = State.CLOSED
            events.append(CloseConnection("login timeout"))
        return events

    def close(self) -> None:
        """The transport is gone: forget everything."""
        self.state = State.CLOSED
        self._tasks.clear()
        self._r2t_wait.clear()

    # ----------------------------------------------------------------- output helpers

    def _send(self, pdu: Pdu) -> None:
        self._out.extend(pdu.encode_parts(self._hd, self._dd))

    def _take_statsn(self) -> int:
        sn = self._statsn
        self._statsn = (sn + 1) & _M
        return sn

    def _maxsn(self) -> int:
        """MaxCmdSN: ExpCmdSN + free window slots - 1, never moving back
        (initiators ignore a smaller value, RFC 7143 §4.2.2.1)."""
        free = self._window - len(self._tasks)
        cand = (self._exp_cmdsn + free - 1) & _M
        if sn_gt(cand, self._max_cmdsn):
            self._max_cmdsn = cand
        return self._max_cmdsn

    def _reject(self, pdu: Pdu, reason: int) -> None:
        self._send(Reject(reason=reason, statsn=self._take_statsn(), exp_cmdsn=self._exp_cmdsn,
                          max_cmdsn=self._maxsn(), data=pdu.header()[:48]))

    def _accept_cmdsn(self, cmdsn: int, immediate: bool) -> bool:
        """CmdSN window check (RFC 7143 §4.2.2.1): a non-immediate command
        outside [ExpCmdSN, MaxCmdSN] or already seen is silently dropped."""
        if immediate:
            return True
        exp = self._exp_cmdsn
        if cmdsn == exp and cmdsn != (self._max_cmdsn + 1) & _M:
            exp = (exp + 1) & _M
            ahead = self._ahead
            while ahead and exp in ahead:
                ahead.discard(exp)
                exp = (exp + 1) & _M
            self._exp_cmdsn = exp
            return True
        if sn_lt(cmdsn, exp) or sn_gt(cmdsn, self._maxsn()) or cmdsn in self._ahead:
            return False
        self._ahead.add(cmdsn)
        return True

    # ----------------------------------------------------------------- login phase

    def _on_login_phase(self, pdu: Pdu) -> None:
        if not isinstance(pdu, LoginRequest):
            raise IscsiProtocolError(f"{type(pdu).__name__} before login completed", None)
        first = not self._login_started
        if first:
            self._login_started = True
            self.isid = pdu.isid
            self.cid = pdu.cid
            self._exp_cmdsn = pdu.cmdsn
            self._max_cmdsn = (pdu.cmdsn + self._window - 1) & _M
            self._statsn = pdu.exp_statsn
        elif pdu.isid != self.isid or pdu.tsih != 0:
            self._login_fail(pdu, LoginStatus.INITIATOR_ERROR, "ISID/TSIH changed during login")
            return
        if pdu.version_min > 0 or pdu.version_max < pdu.version_min:
            self._login_fail(pdu, LoginStatus.UNSUPPORTED_VERSION, "unsupported version")
            return
        if pdu.tsih != 0:
            # Adding a connection to a session: we negotiate MaxConnections=1.
            self._login_fail(pdu, LoginStatus.SESSION_DOES_NOT_EXIST, "unknown TSIH")
            return
        if len(self._login_buf) + len(pdu.data) > 65536:
            self._login_fail(pdu, LoginStatus.INITIATOR_ERROR, "login text too long")
            return
        self._login_buf += pdu.data
        if pdu.cont:
            # More text follows; answer with an empty response (§11.12.3).
            self._send_login_response(pdu, b"", transit=False)
            return
        try:
            pairs = decode_text(self._login_buf)
        except IscsiProtocolError:
            self._login_fail(pdu, LoginStatus.INITIATOR_ERROR, "malformed login text")
            return
        finally:
            self._login_buf = bytearray()
        keys = dict(pairs)
        response: Pairs = []
        if first and not self._login_first_checks(pdu, keys, response):
            return
        if pdu.csg not in (0, 1) or (self._stage == 1 and pdu.csg == 0):
            self._login_fail(pdu, LoginStatus.INVALID_DURING_LOGIN, f"bad CSG {pdu.csg}")
            return
        self._stage = pdu.csg
        need_auth = self._auth is not None
        if pdu.csg == 1 and need_auth and not self._authenticated:
            self._login_fail(pdu, LoginStatus.AUTH_FAILURE, "authentication required")
            return
        security_keys = {k: v for k, v in pairs if k == "AuthMethod" or k.startswith("CHAP_")}
        if pdu.csg == 0:
            outcome = self._security(security_keys, need_auth, response)
            if outcome is False:
                why = self._auth.reason if self._auth is not None and self._auth.reason \
                    else "authentication failed"
                self._login_fail(pdu, LoginStatus.AUTH_FAILURE, why)
                return
        elif security_keys:
            response.extend((k, REJECT) for k in security_keys)
        op_pairs = [(k, v) for k, v in pairs if k not in security_keys]
        response.extend(self._negotiator.respond(op_pairs))
        transit = pdu.transit
        if transit:
            if (pdu.csg == 0 and pdu.nsg not in (1, 3)) or (pdu.csg == 1 and pdu.nsg != 3):
                self._login_fail(pdu, LoginStatus.INVALID_DURING_LOGIN, f"bad NSG {pdu.nsg}")
                return
            if pdu.csg == 0 and need_auth and not self._authenticated:
                transit = False  # stay in the security stage until the exchange ends
        if pdu.csg == 1 or (transit and pdu.nsg == 3):
            response.extend(self._negotiator.declarations())
        self._send_login_response(pdu, encode_text(response), transit=transit)
        if transit and pdu.nsg == 3:
            self._enter_full_feature()

    def _login_first_checks(self, pdu: LoginRequest, keys: dict[str, str],
                            response: Pairs) -> bool:
        name = keys.get("InitiatorName")
        if not name:
            self._login_fail(pdu, LoginStatus.MISSING_PARAMETER, "InitiatorName missing")
            return False
        self.initiator_name = name
        self.initiator_alias = keys.get("InitiatorAlias")
        stype = keys.get("SessionType", "Normal")
        if stype not in ("Normal", "Discovery"):
            self._login_fail(pdu, LoginStatus.SESSION_TYPE_UNSUPPORTED, f"SessionType {stype}")
            return False
        self.session_type = stype
        self._discovery = stype == "Discovery"
        self._negotiator.discovery = self._discovery
        if not self._discovery:
            tname = keys.get("TargetName")
            if not tname:
                self._login_fail(pdu, LoginStatus.MISSING_PARAMETER, "TargetName missing")
                return False
            target = self.config.targets.get(tname)
            if target is None:
                self._login_fail(pdu, LoginStatus.NOT_FOUND, f"no target {tname}")
                return False
            self.target = target
        auth = self.config.authenticator
        if auth is not None:
            tname = self.target.name if self.target else None
            if not auth.authorize(name, tname):
                self._login_fail(pdu, LoginStatus.AUTHORIZATION_FAILURE,
                                 "initiator not on the access list")
                return False
            self._auth = auth.begin(name, tname)
        if self.target is not None:
            response.append(("TargetPortalGroupTag", str(self.config.portal_group_tag)))
            if self.target.alias:
                response.append(("TargetAlias", self.target.alias))
        return True

    def _security(self, keys: dict[str, str], need_auth: bool, response: Pairs) -> bool | None:
        """Security stage (RFC 7143 §6.3.2): pick AuthMethod, run the exchange."""
        auth = self._auth
        offered = keys.get("AuthMethod")
        if offered is not None:
            methods = offered.split(",")
            if need_auth and auth is not None:
                choice = next((m for m in auth.methods() if m in methods), None)
            else:
                choice = "None" if "None" in methods else None
            if choice is None:
                response.append(("AuthMethod", REJECT))
                return False
            self._auth_method = choice
            response.append(("AuthMethod", choice))
            if choice == "None":
                self._authenticated = True
        elif not need_auth:
            self._authenticated = True
        exchange = {k: v for k, v in keys.items() if k != "AuthMethod"}
        if need_auth and auth is not None and self._auth_method and self._auth_method != "None" \
                and exchange:
            answer, ok = auth.step(self._auth_method, exchange)
            response.extend(answer)
            if ok is False:
                return False
            if ok:
                self._authenticated = True
        return self._authenticated or None

    def _send_login_response(self, pdu: LoginRequest, data: bytes, *, transit: bool,
                             status: int = 0) -> None:
        final = transit and pdu.nsg == 3 and status == 0
        self._send(LoginResponse(
            itt=pdu.itt, isid=pdu.isid, tsih=self.tsih if final else 0,
            statsn=self._take_statsn(), exp_cmdsn=self._exp_cmdsn, max_cmdsn=self._maxsn(),
            status_class=status >> 8, status_detail=status & 0xFF, transit=transit,
            csg=pdu.csg & 3, nsg=pdu.nsg & 3 if transit else 0, version_max=0,
            version_active=0, data=data))

    def _login_fail(self, pdu: LoginRequest, status: int, reason: str) -> None:
        self._send_login_response(pdu, b"", transit=False, status=status)
        self.state = State.CLOSED
        self._events.append(LoginFailed(status, reason, self.initiator_name,
                                        self.target.name if self.target else None))
        self._events.append(CloseConnection(f"login failed: {reason}"))

    def _enter_full_feature(self) -> None:
        self.params = p = self._negotiator.params
        self.state = State.FULL_FEATURE
        # Digests start with the first PDU after the final Login Response.
        self._hd = self._decoder.header_digest = p.header_digest
        self._dd = self._decoder.data_digest = p.data_digest
        self._decoder.max_data_segment_length = p.target_max_recv_data_segment_length + 4096
        self._events.append(LoginComplete(
            initiator_name=self.initiator_name or "", initiator_alias=self.initiator_alias,
            target_name=self.target.name if self.target else None,
            session_type=self.session_type, isid=self.isid, tsih=self.tsih, cid=self.cid,
            params=p))

    def _on_login_in_ffp(self, pdu: LoginRequest) -> None:
        raise IscsiProtocolError("Login Request in Full Feature Phase",
                                 RejectReason.PROTOCOL_ERROR, pdu.header()[:48])

    # ----------------------------------------------------------------- SCSI commands

    def _on_scsi_command(self, pdu: ScsiCommand) -> None:
        if self._discovery:
            if self._accept_cmdsn(pdu.cmdsn, pdu.immediate):
                self._reject(pdu, RejectReason.PROTOCOL_ERROR)
            return
        if not self._accept_cmdsn(pdu.cmdsn, pdu.immediate):
            return
        itt = pdu.itt
        if itt == RESERVED_TAG or itt in self._tasks:
            self._reject(pdu, RejectReason.INVALID_PDU_FIELD)
            return
        if self._logout is not None:
            self._reject(pdu, RejectReason.WAITING_FOR_LOGOUT)
            return
        if pdu.immediate and len(self._tasks) >= self._window + IMMEDIATE_SLACK:
            self._reject(pdu, RejectReason.IMMEDIATE_COMMAND_REJECT)
            return
        self._discard.pop(itt, None)
        fast = self.fast
        if fast is not None:
            # The fast lane: a command complete on arrival (no Data-Out to wait for)
            # that the adapter can finish at once is answered here, without a task,
            # an event or a later complete() (the per-command path of a busy target).
            data = pdu.data
            edtl = pdu.expected_length
            p = self.params
            if pdu.write and edtl:
                ok = (not pdu.read and len(data) == edtl and p.immediate_data
                      and edtl <= p.first_burst_length and edtl <= self.config.max_command_bytes)
            else:
                ok = not data and not (pdu.read and pdu.write)
            if ok:
                res = fast(decode_lun(pdu.lun), pdu.cdb, data)
                if res is not None:
                    self._reply(itt, pdu.lun, edtl, pdu.read, pdu.write, 0, *res)
                    return
        task = _Task(pdu, decode_lun(pdu.lun))
        self._tasks[itt] = task
        p = self.params
        data = pdu.data
        edtl = task.edtl
        write = pdu.write and edtl > 0
        if pdu.read and pdu.write:
            self._fail(task, _ILLEGAL_REQUEST, 0x24, 0x00)  # bidirectional: not supported
            return
        if not write:
            if data:
                self._fail(task, _ABORTED_COMMAND, 0x0C, 0x0C)  # unexpected unsolicited data
                return
            self._dispatch(task)
            return
        if edtl > self.config.max_command_bytes:
            self._fail(task, _ILLEGAL_REQUEST, 0x24, 0x00)
            return
        unsol_limit = min(p.first_burst_length, edtl)
        if data:
            if not p.immediate_data or len(data) > unsol_limit:
                self._fail(task, _ABORTED_COMMAND, 0x0C, 0x0C)
                return
            task.add(0, data)
        if task.received == edtl:
            self._dispatch(task)
            return
        if not p.initial_r2t and not pdu.final and task.received < unsol_limit:
            task.unsol_open = True
            task.unsol_limit = unsol_limit
            return
        self._want_r2t(task)

    def _dispatch(self, task: _Task) -> None:
        task.state = _TaskState.RUNNING
        self._events.append(ScsiCommandReady(
            task_tag=task.itt, lun=task.lun, cdb=task.cdb, data=task.take_data(),
            expected_length=task.edtl, read=task.read, write=task.write,
            immediate=task.immediate, cmdsn=task.cmdsn))

    def _finish(self, task: _Task) -> None:
        """Forget a task and release its write budget."""
        self._tasks.pop(task.itt, None)
        task.chunks = []
        task.r2ts.clear()
        if task.admitted:
            task.admitted = False
            self._write_bytes -= task.edtl
            if self._r2t_wait:
                self._pump_r2t()

    def _fail(self, task: _Task, key: int, asc: int, ascq: int) -> None:
        """End a task with CHECK CONDITION before it reached SCSI; Data-Out
        still in flight for it is dropped quietly."""
        self._finish(task)
        self._remember_discard(task.itt)
        self._send(ScsiResponse(itt=task.itt, status=CHECK_CONDITION,
                                statsn=self._take_statsn(), exp_cmdsn=self._exp_cmdsn,
                                max_cmdsn=self._maxsn(), exp_datasn=task.r2tsn,
                                data=sense_segment(fixed_sense(key, asc, ascq))))

    def _remember_discard(self, itt: int) -> None:
        self._discard[itt] = None
        if len(self._discard) > _DISCARD_MAX:
            del self._discard[next(iter(self._discard))]

    # ----------------------------------------------------------------- write data

    def _want_r2t(self, task: _Task) -> None:
        task.next_offset = task.received
        task.queued = True
        self._r2t_wait.append(task)
        self._pump_r2t()

    def _pump_r2t(self) -> None:
        """Admit waiting writes while the per-connection write budget allows
        (always at least one, so a large write cannot starve)."""
        budget = self.config.max_write_buffer_bytes
        wait = self._r2t_wait
        while wait:
            task = wait[0]
            if self._tasks.get(task.itt) is not task or task.state is not _TaskState.COLLECTING:
                wait.popleft()
                continue
            if self._write_bytes and self._write_bytes + task.edtl > budget:
                return
            wait.popleft()
            task.queued = False
            task.admitted = True
            self._write_bytes += task.edtl
            self._issue_r2ts(task)

    def _issue_r2ts(self, task: _Task) -> None:
        p = self.params
        while len(task.r2ts) < p.max_outstanding_r2t and task.next_offset < task.edtl:
            length = min(p.max_burst_length, task.edtl - task.next_offset)
            ttt = self._next_ttt
            self._next_ttt = (ttt + 1) & _M or 1
            if self._next_ttt == RESERVED_TAG:
                self._next_ttt = 1
            task.r2ts[ttt] = _R2TState(task.next_offset, length)
            self._send(R2T(itt=task.itt, ttt=ttt, lun=task.lun_raw, statsn=self._statsn,
                           exp_cmdsn=self._exp_cmdsn, max_cmdsn=self._maxsn(),
                           r2tsn=task.r2tsn, buffer_offset=task.next_offset,
                           desired_length=length))
            task.r2tsn += 1
            task.next_offset += length

    def _on_data_out(self, pdu: DataOut) -> None:
        self._exp_statsn = pdu.exp_statsn
        task = self._tasks.get(pdu.itt)
        if task is None or task.state is not _TaskState.COLLECTING:
            if pdu.itt not in self._discard:
                self._reject(pdu, RejectReason.INVALID_PDU_FIELD)
            return
        data = pdu.data
        n = len(data)
        if pdu.ttt == RESERVED_TAG:
            if not task.unsol_open:
                self._fail(task, _ABORTED_COMMAND, 0x0C, 0x0C)  # unexpected unsolicited data
                return
            if pdu.datasn != task.unsol_datasn:
                self._fail(task, _ABORTED_COMMAND, 0x4B, 0x00)  # DataSN error
                return
            if pdu.buffer_offset != task.received:
                self._fail(task, _ABORTED_COMMAND, 0x4B, 0x05)  # data offset error
                return
            if task.received + n > task.unsol_limit:
                self._fail(task, _ABORTED_COMMAND, 0x0C, 0x0C)
                return
            task.add(pdu.buffer_offset, data)
            task.unsol_datasn += 1
            if pdu.final or task.received >= task.unsol_limit:
                task.unsol_open = False
                if task.received == task.edtl:
                    self._dispatch(task)
                else:
                    self._want_r2t(task)
            return
        r2t = task.r2ts.get(pdu.ttt)
        if r2t is None:
            self._fail(task, _ABORTED_COMMAND, 0x4B, 0x01)  # invalid target transfer tag
            return
        if pdu.datasn != r2t.next_datasn:
            self._fail(task, _ABORTED_COMMAND, 0x4B, 0x00)
            return
        if pdu.buffer_offset != r2t.offset + r2t.received:
            self._fail(task, _ABORTED_COMMAND, 0x4B, 0x05)
            return
        if r2t.received + n > r2t.length:
            self._fail(task, _ABORTED_COMMAND, 0x4B, 0x02)  # too much write data
            return
        task.add(pdu.buffer_offset, data)
        r2t.received += n
        r2t.next_datasn += 1
        if r2t.received == r2t.length:
            del task.r2ts[pdu.ttt]
            if task.next_offset < task.edtl:
                self._issue_r2ts(task)
            elif not task.r2ts:
                self._dispatch(task)
        elif pdu.final:
            self._fail(task, _ABORTED_COMMAND, 0x4B, 0x00)  # sequence ended short

    # ----------------------------------------------------------------- responses

    def _respond(self, task: _Task, status: int, data: Buffer, sense: Buffer,
                 transfer_length: int | None) -> None:
        self._reply(task.itt, task.lun_raw, task.edtl, task.read, task.write, task.r2tsn,
                    status, data, sense, transfer_length)

    def _reply(self, itt: int, lun_raw: int, edtl: int, read: bool, write: bool, r2tsn: int,
               status: int, data: Buffer, sense: Buffer, transfer_length: int | None) -> None:
        """Data-In and/or SCSI Response for one finished command, with residuals."""
        if not status and not sense and not read and transfer_length == edtl:
            # A write (or no-data command) that moved exactly what the initiator said:
            # GOOD, no residual, no sense — most responses a busy target sends.
            head = scsi_response_header(0x80, 0, 0, 0, itt, 0, self._take_statsn(),
                                        self._exp_cmdsn, self._maxsn(), r2tsn, 0, 0)
            self._out.append(frame(head, b"", True, False)[0] if self._hd else head)
            return
        n = len(data)
        if read:
            spdtl = n
            send = n if n <= edtl else edtl
        else:
            spdtl = transfer_length if transfer_length is not None else (edtl if write else n)
            send = 0
        overflow = spdtl > edtl
        underflow = spdtl < edtl
        residual = spdtl - edtl if overflow else edtl - spdtl
        datasn = 0
        if send:
            datasn = self._send_data_in(itt, lun_raw, data, send, status,
                                        not sense and status == GOOD, overflow, underflow,
                                        residual)
            if not sense and status == GOOD:
                return
        seg = sense_segment(sense)
        head = scsi_response_header(
            0x80 | (0x04 if overflow else 0) | (0x02 if underflow else 0), 0, status, len(seg),
            itt, 0, self._take_statsn(), self._exp_cmdsn, self._maxsn(),
            datasn if read else r2tsn, 0, residual)
        self._out.extend(frame(head, seg, self._hd, self._dd))

    def _send_data_in(self, itt: int, lun: int, data: Buffer, send: int, status: int,
                      with_status: bool, overflow: bool, underflow: bool, residual: int) -> int:
        """Data-In PDUs for ``data[:send]``; returns how many were sent.

        Headers are packed straight from the fields (no :class:`DataIn`
        objects): this runs for every READ."""
        mrdsl = self.params.max_recv_data_segment_length
        mbl = self.params.max_burst_length
        hd, dd = self._hd, self._dd
        out = self._out
        if send <= mrdsl and send <= mbl:
            # One PDU (the common case): F and, with status, S + residual flags.
            if with_status:
                b1 = 0x81 | (0x04 if overflow else 0) | (0x02 if underflow else 0)
                head = data_in_header(b1, status, send, lun, itt, RESERVED_TAG,
                                      self._take_statsn(), self._exp_cmdsn, self._maxsn(), 0, 0,
                                      residual)
            else:
                head = data_in_header(0x80, 0, send, lun, itt, RESERVED_TAG, 0,
                                      self._exp_cmdsn, self._maxsn(), 0, 0, 0)
            out.extend(frame(head, data if send == len(data) else memoryview(data)[:send],
                             hd, dd))
            return 1
        mv = data if isinstance(data, memoryview) else memoryview(data)
        off = 0
        datasn = 0
        while off < send:
            seg = min(mrdsl, send - off, mbl - off % mbl)
            end = off + seg
            if end == send and with_status:
                b1 = 0x81 | (0x04 if overflow else 0) | (0x02 if underflow else 0)
                head = data_in_header(b1, status, seg, lun, itt, RESERVED_TAG,
                                      self._take_statsn(), self._exp_cmdsn, self._maxsn(),
                                      datasn, off, residual)
            else:
                head = data_in_header(0x80 if end == send or end % mbl == 0 else 0, 0, seg, lun,
                                      itt, RESERVED_TAG, 0, self._exp_cmdsn, self._maxsn(),
                                      datasn, off, 0)
            out.extend(frame(head, mv[off:end], hd, dd))
            off = end
            datasn += 1
        return datasn

    # ----------------------------------------------------------------- other requests

    def _on_nop_out(self, pdu: NopOut) -> None:
        self._exp_statsn = pdu.exp_statsn
        if not self._accept_cmdsn(pdu.cmdsn, pdu.immediate):
            return
        if pdu.ttt != RESERVED_TAG or pdu.itt == RESERVED_TAG:
            return  # answer to our ping, or a ping that wants no answer (§11.18)
        data = pdu.data
        limit = self.params.max_recv_data_segment_length
        self._send(NopIn(itt=pdu.itt, lun=pdu.lun, statsn=self._take_statsn(),
                         exp_cmdsn=self._exp_cmdsn, max_cmdsn=self._maxsn(),
                         data=data if len(data) <= limit else data[:limit]))

    def _on_snack(self, pdu: SnackRequest) -> None:
        self._reject(pdu, RejectReason.PROTOCOL_ERROR)  # SNACK needs ERL > 0

    def _on_text(self, pdu: TextRequest) -> None:
        self._exp_statsn = pdu.exp_statsn
        if not self._accept_cmdsn(pdu.cmdsn, pdu.immediate):
            return
        if pdu.ttt != RESERVED_TAG:
            if pdu.ttt != self._text_ttt:
                self._reject(pdu, RejectReason.INVALID_PDU_FIELD)
                return
            if self._text_more:  # initiator asks for the rest of a long answer
                self._send_text_piece(pdu)
                return
        elif self._text_more:
            self._text_more = []  # a new request resets an unfinished answer
        if len(self._text_buf) + len(pdu.data) > 65536:
            self._text_buf = bytearray()
            self._reject(pdu, RejectReason.PROTOCOL_ERROR)
            return
        self._text_buf += pdu.data
        if pdu.cont:
            self._text_ttt = self._new_ttt()
            self._send(TextResponse(itt=pdu.itt, ttt=self._text_ttt, lun=pdu.lun,
                                    statsn=self._take_statsn(), exp_cmdsn=self._exp_cmdsn,
                                    max_cmdsn=self._maxsn(), final=False))
            return
        raw = bytes(self._text_buf)
        self._text_buf = bytearray()
        try:
            pairs = decode_text(raw)
        except IscsiProtocolError:
            self._reject(pdu, RejectReason.INVALID_PDU_FIELD)
            return
        answer: Pairs = []
        for key, value in pairs:
            if key == "SendTargets":
                answer.extend(send_targets(value, self._target_list(),
                                           self.target.name if self.target else None))
            elif key == "MaxRecvDataSegmentLength":
                n = int(value) if value.isdigit() else 0
                if 512 <= n < 2**24:
                    self.params = _replace_mrdsl(self.params, n)
                else:
                    answer.append((key, REJECT))
            else:
                answer.append((key, "NotUnderstood"))
        self._text_more = split_text(encode_text(answer),
                                     self.params.max_recv_data_segment_length)
        self._send_text_piece(pdu)

    def _send_text_piece(self, pdu: TextRequest) -> None:
        piece = self._text_more.pop(0)
        more = bool(self._text_more)
        self._text_ttt = self._new_ttt() if more else RESERVED_TAG
        self._send(TextResponse(itt=pdu.itt, ttt=self._text_ttt, lun=pdu.lun,
                                statsn=self._take_statsn(), exp_cmdsn=self._exp_cmdsn,
                                max_cmdsn=self._maxsn(), final=not more, cont=more, data=piece))

    def _new_ttt(self) -> int:
        ttt = self._next_ttt
        self._next_ttt = ((ttt + 1) & _M) or 1
        if self._next_ttt == RESERVED_TAG:
            self._next_ttt = 1
        return ttt

    def _target_list(self) -> list[tuple[str, list[str]]]:
        """SendTargets lists only what this initiator may log in to."""
        addr = f"{self.portal},{self.config.portal_group_tag}"
        names = sorted(self.config.targets)
        auth = self.config.authenticator
        if auth is not None:
            names = [n for n in names if auth.authorize(self.initiator_name or "", n)]
        return [(name, [addr]) for name in names]

    def _on_logout(self, pdu: LogoutRequest) -> None:
        self._exp_statsn = pdu.exp_statsn
        if not self._accept_cmdsn(pdu.cmdsn, pdu.immediate):
            return
        if pdu.reason == 2:
            self._logout_response(pdu, 2)  # connection recovery not supported (ERL 0)
            return
        if pdu.reason == 1 and pdu.cid != self.cid:
            self._logout_response(pdu, 1)  # CID not found
            return
        if pdu.reason > 2:
            self._reject(pdu, RejectReason.INVALID_PDU_FIELD)
            return
        self._logout = pdu
        # Tasks still waiting for Data-Out can never finish now; running ones
        # are answered before the Logout Response (§11.14.1).
        for task in [t for t in self._tasks.values() if t.state is _TaskState.COLLECTING]:
            self._finish(task)
            self._remember_discard(task.itt)
        self._maybe_finish_logout()

    def _maybe_finish_logout(self) -> None:
        pdu = self._logout
        if pdu is None or self._tasks or self._tmfs or self._resets \
                or self.state is State.CLOSED:
            return
        self._logout_response(pdu, 0)
        self.state = State.CLOSED
        self._events.append(LogoutComplete(pdu.reason))

    def _logout_response(self, pdu: LogoutRequest, response: int) -> None:
        self._send(LogoutResponse(itt=pdu.itt, response=response, statsn=self._take_statsn(),
                                  exp_cmdsn=self._exp_cmdsn, max_cmdsn=self._maxsn()))

    # ----------------------------------------------------------------- task management

    def _on_tmf(self, pdu: TaskMgmtRequest) -> None:
        self._exp_statsn = pdu.exp_statsn
        if self._discovery:
            if self._accept_cmdsn(pdu.cmdsn, pdu.immediate):
                self._reject(pdu, RejectReason.PROTOCOL_ERROR)
            return
        if not self._accept_cmdsn(pdu.cmdsn, pdu.immediate):
            return
        fn = pdu.function
        lun = decode_lun(pdu.lun)
        luns = self.target.luns if self.target else frozenset()
        if fn == TmfFunction.ABORT_TASK:
            task = self._tasks.get(pdu.ref_task_tag)
            if task is None:
                ref = pdu.ref_cmdsn
                # A command we have not seen yet but that is in the window:
                # count it as received so it is never run (§11.5.1).
                if not sn_lt(ref, self._exp_cmdsn) and sn_lt(ref, pdu.cmdsn) \
                        and not sn_gt(ref, self._maxsn()) and ref not in self._ahead:
                    self._accept_cmdsn(ref, False)
                    self._tmf_response(pdu, TmfResponse.FUNCTION_COMPLETE)
                else:
                    self._tmf_response(pdu, TmfResponse.TASK_DOES_NOT_EXIST)
                return
            self._abort([task], pdu)
        elif fn in (TmfFunction.ABORT_TASK_SET, TmfFunction.CLEAR_TASK_SET,
                    TmfFunction.LOGICAL_UNIT_RESET):
            if lun not in luns:
                self._tmf_response(pdu, TmfResponse.LUN_DOES_NOT_EXIST)
                return
            self._abort([t for t in self._tasks.values() if t.lun == lun], pdu)
        elif fn == TmfFunction.CLEAR_ACA:
            self._tmf_response(pdu, TmfResponse.FUNCTION_COMPLETE)
        elif fn in (TmfFunction.TARGET_WARM_RESET, TmfFunction.TARGET_COLD_RESET):
            self._abort(list(self._tasks.values()), pdu,
                        close_after=True)
        elif fn == TmfFunction.TASK_REASSIGN:
            self._tmf_response(pdu, TmfResponse.REASSIGNMENT_NOT_SUPPORTED)
        else:
            self._tmf_response(pdu, TmfResponse.NOT_SUPPORTED)

    def _abort(self, tasks: list[_Task], pdu: TaskMgmtRequest, close_after: bool = False) -> None:
        """Abort tasks: those still collecting data go at once; running ones
        are marked (their status will be dropped) and the TMF response waits
        until each has ended, through :meth:`complete` or, once the adapter
        has cancelled it (:class:`TasksAborted`), :meth:`task_cancelled`, so
        no write lands after the initiator was told it was aborted (SAM-5
        §7.2)."""
        running: set[int] = set()
        for task in tasks:
            if task.state is _TaskState.RUNNING:
                if not task.aborted:
                    task.aborted = True
                running.add(task.itt)
            else:
                self._finish(task)
                self._remember_discard(task.itt)
        pending = _PendingTmf(pdu, running, close_after)
        if running:
            self._tmfs.append(pending)
            self._events.append(TasksAborted(tuple(sorted(running))))
        else:
            self._tmf_done(pending)

    def _tmf_progress(self, itt: int) -> None:
        for pending in list(self._tmfs):
            pending.waiting.discard(itt)
            if not pending.waiting:
                self._tmfs.remove(pending)
                self._tmf_done(pending)

    def _tmf_done(self, pending: _PendingTmf) -> None:
        fn = pending.pdu.function
        if self.config.defer_resets and fn in _RESETS:
            self._resets[pending.pdu.itt] = pending
            self._events.append(ResetRequested(pending.pdu.itt, fn, decode_lun(pending.pdu.lun)))
            return
        self._finish_tmf(pending, TmfResponse.FUNCTION_COMPLETE)

    def _finish_tmf(self, pending: _PendingTmf, response: int) -> None:
        self._tmf_response(pending.pdu, response)
        if pending.close_after:
            self.state = State.CLOSED
            self._events.append(CloseConnection(
                "target cold reset" if pending.pdu.function == TmfFunction.TARGET_COLD_RESET
                else "target warm reset"))

    def complete_tmf(self, task_tag: int,
                     response: int = TmfResponse.FUNCTION_COMPLETE) -> list[Event]:
        """Answer a :class:`ResetRequested` (RFC 7143 §11.6)."""
        pending = self._resets.pop(task_tag, None)
        if pending is None or self.state is State.CLOSED:
            return []
        events = self._events = []
        self._finish_tmf(pending, response)
        self._maybe_finish_logout()
        return events

    def abort_tasks(self, luns: Collection[int] | None = None) -> list[Event]:
        """Abort this session's tasks on ``luns`` (all when None) because
        another session reset them or preempted this nexus (SAM-5 §7.6,
        SPC-4 §5.13.11.4).  Aborted tasks end without a response (TAS=0):
        the initiator learns of it through the unit attention."""
        events = self._events = []
        running = []
        for task in list(self._tasks.values()):
            if luns is not None and task.lun not in luns:
                continue
            if task.state is _TaskState.RUNNING:
                task.aborted = True
                running.append(task.itt)
            else:
                self._finish(task)
                self._remember_discard(task.itt)
        if running:
            events.append(TasksAborted(tuple(sorted(running))))
        return events

    def is_aborted(self, task_tag: int) -> bool:
        """True when the task is gone or aborted: do not start it."""
        task = self._tasks.get(task_tag)
        return task is None or task.aborted

    def _tmf_response(self, pdu: TaskMgmtRequest, response: int) -> None:
        if self.state is State.CLOSED:
            return
        self._send(TaskMgmtResponse(itt=pdu.itt, response=response, statsn=self._take_statsn(),
                                    exp_cmdsn=self._exp_cmdsn, max_cmdsn=self._maxsn()))


def _replace_mrdsl(p: SessionParams, n: int) -> SessionParams:
    return replace(p, max_recv_data_segment_length=n)
