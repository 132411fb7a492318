"""iSCSI initiator connection, sans-IO (RFC 7143): the Core's way to a SAN LUN.

:class:`InitiatorConnection` is the initiator's half of one TCP connection
(and, with MaxConnections=1, of its session), built on the same codec and
plumbing as the Edge's target (:mod:`steelfusion.iscsi.pdu`,
:mod:`~steelfusion.iscsi.text`, :mod:`~steelfusion.iscsi.chap`,
:mod:`~steelfusion.iscsi.connection`).  Bytes in through :meth:`receive_data` (or
:meth:`get_buffer`/:meth:`buffer_updated`), bytes out through
:meth:`data_to_send`, events out (:mod:`~steelfusion.iscsi.initiator_events`,
importable from here), time in as an argument
(:meth:`get_timer`/:meth:`handle_timer`).  It never touches a socket or a
clock; :mod:`steelfusion.iscsi.client` is the asyncio adapter.

What it implements (RFC 7143 section numbers):

* Login (§6.3, §11.12-13): security stage with CHAP, one-way or mutual
  (§12.1.3), skipped without credentials; operational negotiation
  (:class:`~steelfusion.iscsi.text.InitiatorNegotiator`); a refused or
  redirected login is a :class:`LoginFailed` event with the status.
* Commands (§4.2.2, §11.3): ITT allocation, CmdSN numbering inside the
  window the target opens (ExpCmdSN..MaxCmdSN); a command submitted while
  the window is closed waits in a queue and goes out when it opens.
* Writes (§4.2.5, §11.7, §11.8): immediate data, unsolicited Data-Out up to
  FirstBurstLength when InitialR2T=No, then Data-Out for each R2T, cut to the
  target's MaxRecvDataSegmentLength.
* Reads (§11.7): Data-In gathered in order into one buffer (or the caller's),
  status on the last Data-In (S bit) or in a SCSI Response, residuals.
* SCSI Response with sense data decoded to key/ASC/ASCQ (§11.4.7).
* NOP (§11.18-19): a target ping (TTT != 0xffffffff) is answered; our own
  ping goes out when the connection has been quiet for ``nop_interval_s``,
  and silence for ``nop_timeout_s`` after it is :class:`ConnectionDead`.
* Logout (§11.14-15), Reject (§11.17), Async Message (§11.9).

ErrorRecoveryLevel is 0: anything the target sends that breaks the protocol
raises :class:`TargetProtocolError` and the connection is done (§7.1.3); the
caller's misuse raises :class:`LocalProtocolError` (h11's split).
"""

from __future__ import annotations

import enum
import secrets
from collections import deque
from dataclasses import dataclass, field

from steelfusion.iscsi.chap import ChapClient, ChapCredentials, ChapError
from steelfusion.iscsi.commands import Sense, lun_field, parse_sense
from steelfusion.iscsi.connection import PduConnection, sn_gt
from steelfusion.iscsi.initiator_events import (
    AsyncEvent,
    CommandComplete,
    CommandRejected,
    ConnectionDead,
    Event,
    LoginComplete,
    LoginFailed,
    LogoutComplete,
    LogoutRequested,
    Rejected,
    TargetWillDrop,
)
from steelfusion.iscsi.pdu import (
    R2T,
    RESERVED_TAG,
    TARGET_OPCODES,
    AsyncMessage,
    Buffer,
    DataIn,
    IscsiProtocolError,
    LoginRequest,
    LoginResponse,
    LogoutRequest,
    LogoutResponse,
    NopIn,
    NopOut,
    Opcode,
    Reject,
    ScsiCommand,
    ScsiResponse,
    data_out_header,
    frame,
    parse_sense_segment,
)
from steelfusion.iscsi.text import (
    InitiatorLimits,
    InitiatorNegotiator,
    NegotiationError,
    Pairs,
    SessionParams,
    decode_text,
    encode_text,
)

_M = 0xFFFFFFFF
LOGIN_ROUNDS_MAX = 16
"""Login Responses we accept before calling a login that never ends failed."""


class TaskAttr(enum.IntEnum):
    """Task attributes of a SCSI Command (RFC 7143 §11.3.1, SAM-5 §8.6)."""

    UNTAGGED = 0
    SIMPLE = 1
    ORDERED = 2
    HEAD_OF_QUEUE = 3
    ACA = 4


class TargetProtocolError(Exception):
    """The target broke the iSCSI protocol (or sent garbage): at
    ErrorRecoveryLevel 0 the connection must be dropped (RFC 7143 §7.1.3)."""


class LocalProtocolError(Exception):
    """We misused the connection (a command before login, after logout, ...)."""


def random_isid() -> int:
    """A random-type ISID (RFC 7143 §11.12.5: T=10b, B and C random, D=0).
    Keep one per initiator across reconnects: persistent reservations are
    registered to the I_T nexus, whose initiator port name holds it."""
    return (0x80 << 40) | (secrets.randbits(24) << 16)


@dataclass(frozen=True, slots=True)
class InitiatorConfig:
    """What one initiator session asks for.  ``mutual`` is the target's
    own name and secret: with it the target must prove itself too."""

    initiator_name: str
    target_name: str
    isid: int = field(default_factory=random_isid)
    cid: int = 0
    initiator_alias: str | None = None
    chap: ChapCredentials | None = None
    mutual: ChapCredentials | None = None
    chap_algorithms: tuple[int, ...] = (5,)
    limits: InitiatorLimits = field(default_factory=InitiatorLimits)
    login_timeout_s: float = 15.0
    nop_interval_s: float | None = 5.0
    nop_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if self.mutual is not None and self.chap is None:
            raise ValueError("mutual CHAP needs the initiator's own CHAP credentials")


class State(enum.Enum):
    LOGIN = "login"
    FULL_FEATURE = "full_feature"
    LOGGING_OUT = "logging_out"
    CLOSED = "closed"


class _Task:
    """One submitted SCSI command until its status arrives."""

    __slots__ = ("attr", "buf", "cdb", "cmdsn", "data", "datasn", "itt", "lun", "read_length",
                 "received")

    def __init__(self, itt: int, lun: int, cdb: bytes, data: memoryview, read_length: int,
                 into: memoryview | None, attr: int) -> None:
        self.itt = itt
        self.lun = lun
        self.cdb = cdb
        self.data = data
        self.read_length = read_length
        self.buf: memoryview | bytearray | None = into if into is not None or not read_length \
            else bytearray(read_length)
        self.attr = attr
        self.cmdsn: int | None = None  # set when it goes out
        self.datasn = 0
        self.received = 0


# Steps of the security stage (RFC 7143 §12.1.3).
_AUTH_METHOD, _CHAP_A, _CHAP_R, _AUTH_DONE = range(4)


class InitiatorConnection(PduConnection[Event]):
    """Initiator side of one iSCSI connection and its single-connection session.

    The first Login Request is queued on construction: flush
    :meth:`data_to_send` once the TCP connection is up.  ``now`` starts the
    login timeout; ``cmdsn`` is the session's first CmdSN.  :meth:`receive_data`
    and :meth:`buffer_updated` (the plumbing it shares with the Edge's target,
    :class:`~steelfusion.iscsi.connection.PduConnection`) raise
    :class:`TargetProtocolError` when the connection must be dropped.
    """

    def __init__(self, config: InitiatorConfig, *, now: float = 0.0, cmdsn: int = 1) -> None:
        super().__init__(config.limits.max_recv_data_segment_length, TARGET_OPCODES)
        self.config = config
        self.state = State.LOGIN
        self.params = SessionParams()
        self.tsih = 0
        self._cmdsn = self._exp_cmdsn = self._max_cmdsn = cmdsn & _M
        self._exp_statsn = 0
        self._next_itt = 1
        self._tasks: dict[int, _Task] = {}
        self._queue: deque[_Task] = deque()
        # login
        self._negotiator = InitiatorNegotiator(config.limits)
        self._chap = ChapClient(config.chap, config.mutual, algorithms=config.chap_algorithms) \
            if config.chap is not None else None
        self._login_itt = self._new_itt()
        self._stage = 0
        self._auth = _AUTH_METHOD
        self._login_text = bytearray()
        self._login_rounds = 0
        self._login_deadline = now + config.login_timeout_s
        self._logout_itt: int | None = None
        # keepalive
        self._heard = False
        self._ping_itt: int | None = None
        self._ping_deadline = 0.0
        interval = config.nop_interval_s
        self._next_ping = now + interval if interval else None
        self._handlers = {
            ScsiResponse: self._on_response, DataIn: self._on_data_in, R2T: self._on_r2t,
            NopIn: self._on_nop_in, Reject: self._on_reject, AsyncMessage: self._on_async,
            LogoutResponse: self._on_logout_response,
        }
        self._start_login()

    # ----------------------------------------------------------------- public API

    @property
    def outstanding(self) -> int:
        """Commands submitted and not answered (queued ones included)."""
        return len(self._tasks)

    @property
    def queued(self) -> int:
        """Commands waiting for the CmdSN window to open."""
        return len(self._queue)

    @property
    def window(self) -> int:
        """Commands the target will take now (MaxCmdSN - CmdSN + 1)."""
        return (self._max_cmdsn - self._cmdsn + 1) & _M if not sn_gt(
            self._cmdsn, self._max_cmdsn) else 0

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    def submit(self, cdb: bytes, *, lun: int = 0, data: Buffer = b"", read_length: int = 0,
               into: memoryview | None = None, attr: int = TaskAttr.SIMPLE) -> int:
        """Queue a SCSI command; returns its tag (the ITT), which its
        :class:`CommandComplete` or :class:`CommandRejected` carries.
        ``data`` is written (kept by reference until the command ends),
        ``read_length`` bytes are expected back, into ``into`` if given."""
        if self.state is not State.FULL_FEATURE:
            raise LocalProtocolError(f"submit in state {self.state.value}")
        if data and read_length:
            raise LocalProtocolError("bidirectional commands are not supported")
        if into is not None and len(into) != read_length:
            raise LocalProtocolError("the read buffer must be read_length bytes")
        mv = memoryview(data)
        if mv.itemsize != 1 or mv.ndim != 1:
            mv = mv.cast("B")
        task = _Task(self._new_itt(), lun_field(lun), bytes(cdb), mv, read_length, into, attr)
        self._tasks[task.itt] = task
        self._queue.append(task)
        self._pump()
        return task.itt

    def cancel(self, tag: int) -> bool:
        """Forget a command that has not gone out yet (True); one already
        sent cannot be called back (False)."""
        task = self._tasks.get(tag)
        if task is None or task.cmdsn is not None:
            return False
        del self._tasks[tag]
        self._queue.remove(task)
        return True

    def logout(self, reason: int = 0) -> None:
        """Close the session (reason 0, RFC 7143 §11.14.1); commands not yet
        sent stay unsent.  :class:`LogoutComplete` follows."""
        if self.state is not State.FULL_FEATURE:
            raise LocalProtocolError(f"logout in state {self.state.value}")
        self._logout_itt = itt = self._new_itt()
        self.state = State.LOGGING_OUT
        self._send(LogoutRequest(itt=itt, reason=reason, cid=self.config.cid, immediate=True,
                                 cmdsn=self._cmdsn, exp_statsn=self._exp_statsn))

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` next needs to run."""
        if self.state is State.LOGIN:
            return self._login_deadline
        if self.state is State.CLOSED:
            return None
        return self._ping_deadline if self._ping_itt is not None else self._next_ping

    def handle_timer(self, now: float) -> list[Event]:
        events = self._events = []
        if self.state is State.LOGIN:
            if now >= self._login_deadline:
                self._login_failed(None, "login timed out")
        elif self.state is not State.CLOSED and self._next_ping is not None:
            interval = self.config.nop_interval_s or 0.0
            if self._ping_itt is not None:
                if now >= self._ping_deadline:
                    if self._heard:  # busy, not dead: the answer is queued behind data
                        self._heard = False
                        self._ping_deadline = now + self.config.nop_timeout_s
                    else:
                        self.state = State.CLOSED
                        events.append(ConnectionDead(
                            f"no answer to NOP-Out within {self.config.nop_timeout_s:g}s"))
            elif now >= self._next_ping:
                self._next_ping = now + interval
                if self._heard:
                    self._heard = False
                else:
                    self._ping_itt = itt = self._new_itt()
                    self._ping_deadline = now + self.config.nop_timeout_s
                    self._send(NopOut(itt=itt, immediate=True, cmdsn=self._cmdsn,
                                      exp_statsn=self._exp_statsn))
        return events

    def close(self) -> None:
        """The transport is gone: forget everything."""
        self.state = State.CLOSED
        self._tasks.clear()
        self._queue.clear()

    # ----------------------------------------------------------------- plumbing

    def _process(self) -> list[Event]:
        events = self._events = []
        try:
            while self.state is not State.CLOSED:
                pdu = self._decoder.next()
                if pdu is None:
                    break
                self._heard = True
                if self.state is State.LOGIN:
                    if type(pdu) is not LoginResponse:
                        raise TargetProtocolError(f"{type(pdu).__name__} during login")
                    self._on_login_response(pdu)
                    continue
                handler = self._handlers.get(type(pdu))
                if handler is None:
                    raise TargetProtocolError(f"unexpected {type(pdu).__name__}")
                handler(pdu)  # type: ignore[operator]
        except IscsiProtocolError as e:
            self.state = State.CLOSED
            raise TargetProtocolError(str(e)) from e
        except TargetProtocolError:
            self.state = State.CLOSED
            raise
        return events

    def _new_itt(self) -> int:
        itt = self._next_itt
        while itt in self._tasks or itt == RESERVED_TAG or itt == 0:
            itt = (itt + 1) & _M
        self._next_itt = (itt + 1) & _M
        return itt

    def _status(self, statsn: int) -> None:
        """A PDU that carried status StatSN: acknowledge it (ExpStatSN)."""
        if not sn_gt(self._exp_statsn, statsn):
            self._exp_statsn = (statsn + 1) & _M

    def _window(self, exp_cmdsn: int, max_cmdsn: int) -> None:
        """ExpCmdSN/MaxCmdSN from any target PDU: both move only forward, and
        MaxCmdSN < ExpCmdSN - 1 makes both void (RFC 7143 §4.2.2.1)."""
        if sn_gt((exp_cmdsn - 1) & _M, max_cmdsn):
            return
        if sn_gt(exp_cmdsn, self._exp_cmdsn):
            self._exp_cmdsn = exp_cmdsn
        if sn_gt(max_cmdsn, self._max_cmdsn):
            self._max_cmdsn = max_cmdsn
            if self._queue:
                self._pump()

    # ----------------------------------------------------------------- login

    def _login_request(self, pairs: Pairs, nsg: int, transit: bool) -> None:
        self._send(LoginRequest(
            itt=self._login_itt, isid=self.config.isid, tsih=0, cid=self.config.cid,
            cmdsn=self._cmdsn, exp_statsn=self._exp_statsn, transit=transit, csg=self._stage,
            nsg=nsg, data=encode_text(pairs)))

    def _start_login(self) -> None:
        cfg = self.config
        names = [("InitiatorName", cfg.initiator_name)]
        if cfg.initiator_alias:
            names.append(("InitiatorAlias", cfg.initiator_alias))
        names += [("TargetName", cfg.target_name), ("SessionType", "Normal")]
        if self._chap is None:
            self._stage = 1
            self._login_request(names + self._negotiator.offers(), 3, True)
        else:
            methods = "CHAP" if cfg.mutual is not None else "CHAP,None"
            self._login_request([*names, ("AuthMethod", methods)], 1, False)

    def _login_failed(self, status: int | None, reason: str,
                      target_address: str | None = None) -> None:
        self.state = State.CLOSED
        self._events.append(LoginFailed(status, reason, target_address))

    def _on_login_response(self, pdu: LoginResponse) -> None:
        if pdu.itt != self._login_itt:
            raise TargetProtocolError("Login Response for another login (ITT)")
        self._status(pdu.statsn)
        status = pdu.status_class << 8 | pdu.status_detail
        if status:  # (tgt sends ISID 0 in a refusal: not checked there)
            try:
                keys = dict(decode_text(pdu.data))
            except IscsiProtocolError:
                keys = {}
            self._login_failed(status, _LOGIN_STATUS.get(status, "login refused"),
                               keys.get("TargetAddress"))
            return
        if pdu.isid != self.config.isid:
            raise TargetProtocolError("Login Response for another session (ISID)")
        if pdu.version_active != 0 or pdu.csg != self._stage:
            raise TargetProtocolError(f"Login Response version {pdu.version_active}, "
                                      f"stage {pdu.csg} (ours {self._stage})")
        self._login_rounds += 1
        if self._login_rounds > LOGIN_ROUNDS_MAX:
            self._login_failed(None, f"login not done after {LOGIN_ROUNDS_MAX} rounds")
            return
        self._login_text += pdu.data
        if pdu.cont:  # more text follows: ask for it (RFC 7143 §11.13.3)
            self._login_request([], 3 if self._stage else 1, False)
            return
        pairs = decode_text(self._login_text)
        self._login_text = bytearray()
        security = {k: v for k, v in pairs if k == "AuthMethod" or k.startswith("CHAP_")}
        try:
            answers = self._negotiator.take([(k, v) for k, v in pairs if k not in security])
        except NegotiationError as e:
            self._login_failed(None, f"negotiation: {e}")
            return
        if self._stage == 0:
            self._security(security, pdu)
        elif pdu.transit:
            if pdu.nsg != 3:
                raise TargetProtocolError(f"Login Response transits to stage {pdu.nsg}")
            self._full_feature(pdu)
        else:
            self._login_request(answers, 3, True)

    def _security(self, keys: dict[str, str], pdu: LoginResponse) -> None:
        """One step of the security stage (RFC 7143 §6.3.2, §12.1.3)."""
        chap = self._chap
        assert chap is not None
        try:
            if self._auth == _AUTH_METHOD:
                method = keys.get("AuthMethod")
                if method == "CHAP":
                    self._auth = _CHAP_A
                    self._login_request(chap.offer(), 1, False)
                    return
                if method != "None" or self.config.mutual is not None:
                    self._login_failed(None, f"target chose AuthMethod={method}")
                    return
                self._auth = _AUTH_DONE
            elif self._auth == _CHAP_A:
                self._auth = _CHAP_R
                self._login_request(chap.answer(keys), 1, True)
                return
            elif self._auth == _CHAP_R:
                chap.verify(keys)
                self._auth = _AUTH_DONE
        except ChapError as e:
            self._login_failed(None, f"CHAP: {e}")
            return
        if not pdu.transit:
            self._login_request([], 1, True)
        elif pdu.nsg != 1:
            raise TargetProtocolError(f"security stage transits to stage {pdu.nsg}")
        else:
            self._stage = 1
            self._login_request(self._negotiator.offers(), 3, True)

    def _full_feature(self, pdu: LoginResponse) -> None:
        if pdu.tsih == 0:
            raise TargetProtocolError("final Login Response without a TSIH")
        self.params = p = self._negotiator.params
        self.tsih = pdu.tsih
        self.state = State.FULL_FEATURE
        self._start_digests(p)
        self._decoder.max_data_segment_length = p.max_recv_data_segment_length
        if not sn_gt((pdu.exp_cmdsn - 1) & _M, pdu.max_cmdsn):
            self._exp_cmdsn, self._max_cmdsn = pdu.exp_cmdsn, pdu.max_cmdsn
        declared = self._negotiator.declared
        tpgt = declared.get("TargetPortalGroupTag", "")
        self._events.append(LoginComplete(p, pdu.tsih, declared.get("TargetAlias"),
                                          int(tpgt) if tpgt.isascii() and tpgt.isdigit() else None))

    # ----------------------------------------------------------------- commands out

    def _pump(self) -> None:
        """Send queued commands while the CmdSN window is open."""
        queue = self._queue
        while queue and self.state is State.FULL_FEATURE \
                and not sn_gt(self._cmdsn, self._max_cmdsn):
            self._start(queue.popleft())

    def _start(self, task: _Task) -> None:
        """The SCSI Command PDU, with immediate data, then the unsolicited
        Data-Out (RFC 7143 §4.2.5)."""
        p = self.params
        task.cmdsn = cmdsn = self._cmdsn
        self._cmdsn = (cmdsn + 1) & _M
        n = len(task.data)
        imm = min(n, p.first_burst_length, p.target_max_recv_data_segment_length) \
            if p.immediate_data else 0
        unsolicited = imm if p.initial_r2t else min(n, p.first_burst_length)
        self._send(ScsiCommand(
            itt=task.itt, lun=task.lun, cmdsn=cmdsn, exp_statsn=self._exp_statsn,
            final=unsolicited == imm, read=bool(task.read_length), write=bool(n),
            attr=task.attr, expected_length=n or task.read_length, cdb=task.cdb,
            data=task.data[:imm] if imm < n else task.data))
        if unsolicited > imm:
            self._data_out(task, imm, unsolicited, RESERVED_TAG)

    def _data_out(self, task: _Task, start: int, end: int, ttt: int) -> None:
        """One Data-Out sequence for ``data[start:end]``, cut to the target's
        MaxRecvDataSegmentLength, DataSN from 0, F on the last (§11.7)."""
        seg = self.params.target_max_recv_data_segment_length
        mv = task.data
        out = self._out
        hd, dd = self._hd, self._dd
        itt, lun, expsn = task.itt, task.lun, self._exp_statsn
        datasn = 0
        while start < end:
            stop = min(start + seg, end)
            head = data_out_header(stop == end, stop - start, lun, itt, ttt, expsn, datasn, start)
            if hd or dd or (stop - start) & 3:
                out.extend(frame(head, mv[start:stop], hd, dd))
            else:
                out += (head, mv[start:stop])
            start = stop
            datasn += 1

    # ----------------------------------------------------------------- target PDUs

    def _task(self, itt: int, what: str) -> _Task:
        task = self._tasks.get(itt)
        if task is None or task.cmdsn is None:
            raise TargetProtocolError(f"{what} for unknown ITT 0x{itt:08x}")
        return task

    def _on_r2t(self, pdu: R2T) -> None:
        self._window(pdu.exp_cmdsn, pdu.max_cmdsn)
        task = self._task(pdu.itt, "R2T")
        end = pdu.buffer_offset + pdu.desired_length
        if not pdu.desired_length or end > len(task.data):
            raise TargetProtocolError(f"R2T for bytes {pdu.buffer_offset}..{end} of a "
                                      f"{len(task.data)}-byte write")
        self._data_out(task, pdu.buffer_offset, end, pdu.ttt)

    def _on_data_in(self, pdu: DataIn) -> None:
        self._window(pdu.exp_cmdsn, pdu.max_cmdsn)
        task = self._task(pdu.itt, "Data-In")
        data = pdu.data
        n = len(data)
        off = pdu.buffer_offset
        buf = task.buf
        if buf is None or pdu.datasn != task.datasn or off != task.received \
                or off + n > task.read_length:
            raise TargetProtocolError(
                f"Data-In DataSN {pdu.datasn} offset {off} length {n} does not follow "
                f"DataSN {task.datasn} offset {task.received} of {task.read_length} bytes")
        task.datasn += 1
        if n:
            buf[off:off + n] = data
            task.received = off + n
        if pdu.status_present:
            if not pdu.final:
                raise TargetProtocolError("Data-In with status but without the F bit")
            self._status(pdu.statsn)
            self._complete(task, pdu.status, None, 0, pdu.residual_count, pdu.overflow,
                           pdu.underflow)

    def _on_response(self, pdu: ScsiResponse) -> None:
        self._window(pdu.exp_cmdsn, pdu.max_cmdsn)
        self._status(pdu.statsn)
        task = self._task(pdu.itt, "SCSI Response")
        sense = parse_sense(parse_sense_segment(pdu.data)) if pdu.data else None
        self._complete(task, pdu.status, sense, pdu.response, pdu.residual_count, pdu.overflow,
                       pdu.underflow)

    def _complete(self, task: _Task, status: int, sense: Sense | None, response: int,
                  residual: int, overflow: bool, underflow: bool) -> None:
        del self._tasks[task.itt]
        buf = task.buf
        data: Buffer = b""
        if buf is not None:
            if task.received == len(buf):
                data = buf
            elif isinstance(buf, bytearray):
                del buf[task.received:]
                data = buf
            else:
                data = buf[:task.received]
        task.data = memoryview(b"")  # drop the caller's write buffer now
        self._events.append(CommandComplete(task.itt, status, data, sense, response, residual,
                                            overflow, underflow))

    def _on_nop_in(self, pdu: NopIn) -> None:
        self._window(pdu.exp_cmdsn, pdu.max_cmdsn)
        if pdu.itt != RESERVED_TAG:
            if pdu.itt != self._ping_itt:
                raise TargetProtocolError(f"NOP-In for unknown ITT 0x{pdu.itt:08x}")
            self._status(pdu.statsn)
            self._ping_itt = None
            self._heard = False  # the ping's own answer: quiet again, so ping on schedule
        elif pdu.ttt != RESERVED_TAG:
            # A target ping: answer with its TTT and its data (RFC 7143 §11.18).
            self._send(NopOut(itt=RESERVED_TAG, ttt=pdu.ttt, lun=pdu.lun, immediate=True,
                              cmdsn=self._cmdsn, exp_statsn=self._exp_statsn,
                              data=bytes(pdu.data)))

    def _on_reject(self, pdu: Reject) -> None:
        self._window(pdu.exp_cmdsn, pdu.max_cmdsn)
        self._status(pdu.statsn)
        head = bytes(pdu.data[:48])
        if len(head) < 48:
            self._events.append(Rejected(pdu.reason, None))
            return
        opcode = head[0] & 0x3F
        itt = int.from_bytes(head[16:20], "big")
        task = self._tasks.get(itt)
        if opcode == Opcode.SCSI_COMMAND and task is not None and task.cmdsn is not None:
            del self._tasks[itt]
            self._events.append(CommandRejected(itt, pdu.reason))
            return
        if opcode == Opcode.NOP_OUT and itt == self._ping_itt:
            self._ping_itt = None  # an answer all the same: the target is alive
        elif opcode == Opcode.LOGOUT_REQUEST and itt == self._logout_itt:
            raise TargetProtocolError("Logout Request rejected")
        self._events.append(Rejected(pdu.reason, opcode))

    def _on_async(self, pdu: AsyncMessage) -> None:
        self._window(pdu.exp_cmdsn, pdu.max_cmdsn)
        self._status(pdu.statsn)
        ev = pdu.event
        if ev == 1:
            self._events.append(LogoutRequested(pdu.parameter3))
        elif ev in (2, 3):
            self._events.append(TargetWillDrop(ev == 3, pdu.parameter2, pdu.parameter3))
        else:
            sense = parse_sense(parse_sense_segment(pdu.data)) if pdu.data else None
            self._events.append(AsyncEvent(ev, sense, (pdu.parameter1, pdu.parameter2,
                                                       pdu.parameter3)))

    def _on_logout_response(self, pdu: LogoutResponse) -> None:
        if self._logout_itt is None or pdu.itt != self._logout_itt:
            raise TargetProtocolError("Logout Response without a Logout Request")
        self._status(pdu.statsn)
        self.state = State.CLOSED
        self._events.append(LogoutComplete(pdu.response, pdu.time2wait, pdu.time2retain))


_LOGIN_STATUS = {
    0x0101: "target moved temporarily", 0x0102: "target moved permanently",
    0x0200: "initiator error", 0x0201: "authentication failed",
    0x0202: "authorization failed (not on the target's access list)",
    0x0203: "target not found", 0x0204: "target removed",
    0x0205: "unsupported iSCSI version", 0x0206: "too many connections",
    0x0207: "missing parameter", 0x0208: "cannot include in session",
    0x0209: "session type not supported", 0x020A: "session does not exist",
    0x020B: "invalid request during login", 0x0300: "target error",
    0x0301: "service unavailable", 0x0302: "out of resources",
}
"""Login status class/detail (RFC 7143 §11.13.5)."""
