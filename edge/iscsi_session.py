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

Where things are: this module is the state machine (numbering, PDU in and
out, SCSI commands, R2Ts under the write budget, Data-In and responses, NOP,
Logout).  It hands parts to sans-IO helpers with narrow interfaces: the
login phase to :mod:`edge.iscsi_login`, each command's write-data rules to
:mod:`edge.iscsi_tasks`, task management to :mod:`edge.iscsi_tmf`, Text
exchanges to :mod:`edge.iscsi_text`; the byte plumbing (decoder, output
queue, digests) and serial-number arithmetic it shares with the Core's
initiator are :mod:`steelfusion.iscsi.connection`.  The configuration the
adapter passes in is :mod:`edge.iscsi_config`, the events it gets back
:mod:`edge.iscsi_events`; their public names are importable from here.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Collection
from dataclasses import replace

from edge.iscsi_config import (
    Authenticator,
    AuthExchange,
    FastLane,
    SessionConfig,
    TargetInfo,
)
from edge.iscsi_events import (
    CloseConnection,
    Event,
    LoginComplete,
    LoginFailed,
    LogoutComplete,
    ResetRequested,
    ScsiCommandReady,
    TasksAborted,
)
from edge.iscsi_login import LoginPhase, LoginReply, LoginStatus
from edge.iscsi_tasks import R2TState, Sense, Step, Task, TaskState
from edge.iscsi_text import TextExchange
from edge.iscsi_tmf import TaskManagement, TmfFunction, TmfResponse
from edge.scsi.cdb import decode_lun
from edge.scsi.sense import CHECK_CONDITION, GOOD, SenseKey, fixed_sense
from steelfusion.iscsi.connection import PduConnection, sn_gt, sn_lt
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
    Pairs,
    SessionParams,
    send_targets,
)

__all__ = [
    "IMMEDIATE_SLACK", "AuthExchange", "Authenticator", "CloseConnection", "Event", "FastLane",
    "LoginComplete", "LoginFailed", "LoginStatus", "LogoutComplete", "ResetRequested",
    "ScsiCommandReady", "SessionConfig", "State", "TargetConnection", "TargetInfo",
    "TasksAborted", "TmfFunction", "TmfResponse", "sn_gt", "sn_lt",
]

_M = 0xFFFFFFFF

# Sense for a task the adapter cancelled (RFC 7143 §11.4.7.2).
_SENSE_ABORTED_COMMAND = fixed_sense(SenseKey.ABORTED_COMMAND, 0x00, 0x00)


class State(enum.Enum):
    LOGIN = "login"
    FULL_FEATURE = "full_feature"
    CLOSED = "closed"


IMMEDIATE_SLACK = 16
"""Immediate commands allowed beyond the CmdSN window before we Reject
them (reason 0x06, RFC 7143 §11.17.1)."""

_DISCARD_MAX = 1024


class TargetConnection(PduConnection[Event]):
    """Target side of one iSCSI connection (and its single-connection session).

    ``portal`` is the "host:port" we advertise in SendTargets for this
    connection, ``tsih`` the session handle to give the session if it logs
    in (unique per target portal group, nonzero).  ``fast(lun, cdb, data)``
    is the adapter's fast lane: it returns ``(status, data_in, sense,
    transfer_length)`` for a command it finished at once, or None to take
    the normal path (a :class:`ScsiCommandReady` event).

    Bytes come in through :meth:`receive_data` (or :meth:`get_buffer` and
    :meth:`buffer_updated`), the plumbing it shares with the initiator
    (:class:`~steelfusion.iscsi.connection.PduConnection`); they raise
    :class:`IscsiProtocolError` when the connection must be dropped, a Reject
    may have been queued first: flush :meth:`data_to_send`.
    """

    def __init__(self, config: SessionConfig, *, portal: str, tsih: int, now: float = 0.0,
                 fast: FastLane | None = None) -> None:
        if not 0 < tsih <= 0xFFFF:
            raise ValueError("tsih must be 1..65535")
        limits = config.limits
        super().__init__(limits.max_recv_data_segment_length, INITIATOR_OPCODES)
        self.config = config
        self.portal = portal
        self.tsih = tsih
        self.state = State.LOGIN
        self.params = SessionParams()
        # numbering
        self._statsn = 0
        self._exp_cmdsn = 0
        self._max_cmdsn = 0
        self._ahead: set[int] = set()
        self._window = config.cmd_window
        self._exp_statsn = 0
        self._next_ttt = 1
        # login
        self._login = LoginPhase(config.targets, config.authenticator, config.portal_group_tag,
                                 limits)
        self._login_deadline = now + config.login_timeout_s
        # full feature
        self._tasks: dict[int, Task] = {}
        self._r2t_wait: deque[Task] = deque()
        self._write_bytes = 0
        self._discard: dict[int, None] = {}
        self._tmf = TaskManagement(self._tasks, defer_resets=config.defer_resets,
                                   drop=self._drop, respond=self._tmf_response,
                                   emit=self._emit, close=self._close)
        self._logout: LogoutRequest | None = None
        self._text = TextExchange(self._new_ttt)
        self.fast = fast
        self._handlers = {
            ScsiCommand: self._on_scsi_command, DataOut: self._on_data_out,
            NopOut: self._on_nop_out, TextRequest: self._on_text,
            TaskMgmtRequest: self._on_tmf, LogoutRequest: self._on_logout,
            SnackRequest: self._on_snack, LoginRequest: self._on_login_in_ffp,
        }

    # ----------------------------------------------------------------- public API

    @property
    def initiator_name(self) -> str | None:
        return self._login.initiator_name

    @property
    def initiator_alias(self) -> str | None:
        return self._login.initiator_alias

    @property
    def target(self) -> TargetInfo | None:
        """The target node logged in to (None before login and for discovery)."""
        return self._login.target

    @property
    def session_type(self) -> str:
        return self._login.session_type

    @property
    def isid(self) -> int:
        return self._login.isid

    @property
    def cid(self) -> int:
        return self._login.cid

    @property
    def outstanding(self) -> int:
        """Tasks received and not yet answered."""
        return len(self._tasks)

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

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

    def complete(self, task_tag: int, status: int, data: Buffer = b"", sense: Buffer = b"",
                 transfer_length: int | None = None) -> list[Event]:
        """Answer a :class:`ScsiCommandReady`.  ``data`` is Data-In, ``sense``
        fixed-format sense for CHECK CONDITION, ``transfer_length`` the
        bytes the command wanted to move when that is not ``len(data)`` (so
        write residuals are right).  Returns events (e.g. a deferred logout)."""
        task = self._tasks.get(task_tag)
        if task is None or task.state is not TaskState.RUNNING:
            return []
        events = self._events = []
        self._finish(task)
        if task.aborted:
            self._tmf.task_ended(task.itt)
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

    def _emit(self, event: Event) -> None:
        self._events.append(event)

    def _close(self, reason: str) -> None:
        self.state = State.CLOSED
        self._events.append(CloseConnection(reason))

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
        login = self._login
        if not login.started:
            self._exp_cmdsn = pdu.cmdsn
            self._max_cmdsn = (pdu.cmdsn + self._window - 1) & _M
            self._statsn = pdu.exp_statsn
        reply = login.step(pdu)
        self._send_login_response(pdu, reply)
        if reply.status:
            self._events.append(LoginFailed(reply.status, reply.reason, login.initiator_name,
                                            login.target.name if login.target else None))
            self._close(f"login failed: {reply.reason}")
        elif reply.transit and pdu.nsg == 3:
            self._enter_full_feature()

    def _send_login_response(self, pdu: LoginRequest, reply: LoginReply) -> None:
        transit, status = reply.transit, reply.status
        final = transit and pdu.nsg == 3 and status == 0
        self._send(LoginResponse(
            itt=pdu.itt, isid=pdu.isid, tsih=self.tsih if final else 0,
            statsn=self._take_statsn(), exp_cmdsn=self._exp_cmdsn, max_cmdsn=self._maxsn(),
            status_class=status >> 8, status_detail=status & 0xFF, transit=transit,
            csg=pdu.csg & 3, nsg=pdu.nsg & 3 if transit else 0, version_max=0,
            version_active=0, data=reply.data))

    def _enter_full_feature(self) -> None:
        login = self._login
        self.params = p = login.params
        self.state = State.FULL_FEATURE
        self._start_digests(p)
        self._decoder.max_data_segment_length = p.target_max_recv_data_segment_length + 4096
        self._events.append(LoginComplete(
            initiator_name=login.initiator_name or "", initiator_alias=login.initiator_alias,
            target_name=login.target.name if login.target else None,
            session_type=login.session_type, isid=login.isid, tsih=self.tsih, cid=login.cid,
            params=p))

    def _on_login_in_ffp(self, pdu: LoginRequest) -> None:
        raise IscsiProtocolError("Login Request in Full Feature Phase",
                                 RejectReason.PROTOCOL_ERROR, pdu.header()[:48])

    # ----------------------------------------------------------------- SCSI commands

    def _on_scsi_command(self, pdu: ScsiCommand) -> None:
        if self._login.discovery:
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
        task = Task(pdu, decode_lun(pdu.lun))
        self._tasks[itt] = task
        self._advance(task, task.start(pdu, self.params, self.config.max_command_bytes))

    def _advance(self, task: Task, step: Step | Sense) -> None:
        """Do what the write-data rules (:mod:`edge.iscsi_tasks`) said."""
        if step is Step.DISPATCH:
            self._dispatch(task)
        elif step is Step.WANT_R2T:
            self._want_r2t(task)
        elif step is Step.MORE_R2TS:
            self._issue_r2ts(task)
        elif isinstance(step, tuple):
            self._fail(task, step)

    def _dispatch(self, task: Task) -> None:
        task.state = TaskState.RUNNING
        self._events.append(ScsiCommandReady(
            task_tag=task.itt, lun=task.lun, cdb=task.cdb, data=task.take_data(),
            expected_length=task.edtl, read=task.read, write=task.write,
            immediate=task.immediate, cmdsn=task.cmdsn))

    def _finish(self, task: Task) -> None:
        """Forget a task and release its write budget."""
        self._tasks.pop(task.itt, None)
        task.chunks = []
        task.r2ts.clear()
        if task.admitted:
            task.admitted = False
            self._write_bytes -= task.edtl
            if self._r2t_wait:
                self._pump_r2t()

    def _fail(self, task: Task, sense: Sense) -> None:
        """End a task with CHECK CONDITION before it reached SCSI; Data-Out
        still in flight for it is dropped quietly."""
        self._drop(task)
        self._send(ScsiResponse(itt=task.itt, status=CHECK_CONDITION,
                                statsn=self._take_statsn(), exp_cmdsn=self._exp_cmdsn,
                                max_cmdsn=self._maxsn(), exp_datasn=task.r2tsn,
                                data=sense_segment(fixed_sense(*sense))))

    def _drop(self, task: Task) -> None:
        """Forget a task that never reached SCSI; its late Data-Out is discarded."""
        self._finish(task)
        self._discard[task.itt] = None
        if len(self._discard) > _DISCARD_MAX:
            del self._discard[next(iter(self._discard))]

    # ----------------------------------------------------------------- write data

    def _want_r2t(self, task: Task) -> None:
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
            if self._tasks.get(task.itt) is not task or task.state is not TaskState.COLLECTING:
                wait.popleft()
                continue
            if self._write_bytes and self._write_bytes + task.edtl > budget:
                return
            wait.popleft()
            task.queued = False
            task.admitted = True
            self._write_bytes += task.edtl
            self._issue_r2ts(task)

    def _issue_r2ts(self, task: Task) -> None:
        p = self.params
        while len(task.r2ts) < p.max_outstanding_r2t and task.next_offset < task.edtl:
            length = min(p.max_burst_length, task.edtl - task.next_offset)
            ttt = self._new_ttt()
            task.r2ts[ttt] = R2TState(task.next_offset, length)
            self._send(R2T(itt=task.itt, ttt=ttt, lun=task.lun_raw, statsn=self._statsn,
                           exp_cmdsn=self._exp_cmdsn, max_cmdsn=self._maxsn(),
                           r2tsn=task.r2tsn, buffer_offset=task.next_offset,
                           desired_length=length))
            task.r2tsn += 1
            task.next_offset += length

    def _on_data_out(self, pdu: DataOut) -> None:
        self._exp_statsn = pdu.exp_statsn
        task = self._tasks.get(pdu.itt)
        if task is None or task.state is not TaskState.COLLECTING:
            if pdu.itt not in self._discard:
                self._reject(pdu, RejectReason.INVALID_PDU_FIELD)
            return
        self._advance(task, task.data_out(pdu))

    # ----------------------------------------------------------------- responses

    def _respond(self, task: Task, status: int, data: Buffer, sense: Buffer,
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
        reply = self._text.receive(pdu)
        if isinstance(reply, RejectReason):
            self._reject(pdu, reply)
            return
        if isinstance(reply, list):  # a whole request
            answer = self._answer_text(reply)
            reply = self._text.answer(answer, self.params.max_recv_data_segment_length)
        self._send(TextResponse(itt=pdu.itt, ttt=reply.ttt, lun=pdu.lun,
                                statsn=self._take_statsn(), exp_cmdsn=self._exp_cmdsn,
                                max_cmdsn=self._maxsn(), final=reply.final, cont=reply.cont,
                                data=reply.data))

    def _answer_text(self, pairs: Pairs) -> Pairs:
        """Answer the keys of a Text Request (a MaxRecvDataSegmentLength
        declaration takes effect at once, for this very answer)."""
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
        return answer

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
        for task in [t for t in self._tasks.values() if t.state is TaskState.COLLECTING]:
            self._drop(task)
        self._maybe_finish_logout()

    def _maybe_finish_logout(self) -> None:
        pdu = self._logout
        if pdu is None or self._tasks or self._tmf.busy or self.state is State.CLOSED:
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
        if self._login.discovery:
            if self._accept_cmdsn(pdu.cmdsn, pdu.immediate):
                self._reject(pdu, RejectReason.PROTOCOL_ERROR)
            return
        if not self._accept_cmdsn(pdu.cmdsn, pdu.immediate):
            return
        if pdu.function == TmfFunction.ABORT_TASK and pdu.ref_task_tag not in self._tasks:
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
        self._tmf.request(pdu, self.target.luns if self.target else frozenset())

    def complete_tmf(self, task_tag: int,
                     response: int = TmfResponse.FUNCTION_COMPLETE) -> list[Event]:
        """Answer a :class:`ResetRequested` (RFC 7143 §11.6)."""
        pending = self._tmf.take_reset(task_tag)
        if pending is None or self.state is State.CLOSED:
            return []
        events = self._events = []
        self._tmf.finish(pending, response)
        self._maybe_finish_logout()
        return events

    def abort_tasks(self, luns: Collection[int] | None = None) -> list[Event]:
        """Abort this session's tasks on ``luns`` (all when None) because
        another session reset them or preempted this nexus (SAM-5 §7.6,
        SPC-4 §5.13.11.4).  Aborted tasks end without a response (TAS=0):
        the initiator learns of it through the unit attention."""
        events = self._events = []
        running = self._tmf.abort(
            [t for t in self._tasks.values() if luns is None or t.lun in luns])
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
