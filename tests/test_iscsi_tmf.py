"""The sans-IO target's task management, driven by an in-memory initiator: ABORT TASK,
ABORT TASK SET, LUN and warm reset, deferred answers while the adapter cancels, tasks of
other sessions (RFC 7143 §11.5-11.6, §4.2.3; SAM-5 §7)."""

from __future__ import annotations

from edge import iscsi_events as events
from edge.scsi.cdb import encode_lun
from steelfusion.iscsi import pdu
from tests.iscsi_helpers import READ10, WRITE10
from tests.iscsi_helpers import logged_in_target as logged_in

# --------------------------------------------------------------------------- task management


def test_abort_running_task_defers_response_and_drops_its_status() -> None:
    ini = logged_in()
    itt, _ = ini.command(WRITE10, edtl=512, write=True, data=bytes(512))
    ev = ini.send(pdu.TaskMgmtRequest(itt=500, function=1, lun=0, ref_task_tag=itt,
                                      cmdsn=ini.cmdsn, ref_cmdsn=ini.cmdsn - 1))
    assert [type(e) for e in ev] == [events.TasksAborted]
    assert ini.recv() == []
    ini.conn.complete(itt, 0, transfer_length=512)
    (r,) = ini.recv()
    assert isinstance(r, pdu.TaskMgmtResponse) and r.response == 0 and r.itt == 500


def test_abort_of_a_running_task_answers_once_the_adapter_cancelled_it() -> None:
    """The adapter cancels an aborted command instead of waiting for it
    (TasksAborted, then task_cancelled): the TMF answer goes out then, the
    task never gets a status, a late complete() is ignored, and StatSN,
    ExpCmdSN and MaxCmdSN go on as if the task had ended normally."""
    ini = logged_in()
    itt, ev = ini.command(READ10, edtl=4096, read=True)
    assert [type(e) for e in ev] == [events.ScsiCommandReady]
    first, _ = ini.command(READ10, edtl=4096, read=True)
    ini.conn.complete(first, 0, bytes(4096))
    (din,) = ini.recv()
    assert isinstance(din, pdu.DataIn) and din.status_present
    ev = ini.send(pdu.TaskMgmtRequest(itt=500, function=1, lun=0, ref_task_tag=itt,
                                      cmdsn=ini.cmdsn, ref_cmdsn=ini.cmdsn - 2))
    (aborted,) = ev
    assert isinstance(aborted, events.TasksAborted) and aborted.task_tags == (itt,)
    assert ini.recv() == [] and ini.conn.outstanding == 1
    assert ini.conn.task_cancelled(itt) == []
    (r,) = ini.recv()
    assert isinstance(r, pdu.TaskMgmtResponse) and r.itt == 500 and r.response == 0
    assert r.statsn == din.statsn + 1
    assert r.exp_cmdsn == ini.cmdsn and r.max_cmdsn == ini.cmdsn + 127
    assert ini.conn.outstanding == 0
    assert ini.conn.complete(itt, 0, bytes(4096)) == [] and ini.recv() == []
    assert ini.conn.task_cancelled(itt) == [] and ini.recv() == []
    nxt, _ = ini.command(READ10, edtl=512, read=True, itt=itt)  # the tag is free again
    ini.conn.complete(nxt, 0, bytes(512))
    (d2,) = ini.recv()
    assert isinstance(d2, pdu.DataIn) and d2.itt == itt and d2.statsn == r.statsn + 1


def test_abort_task_set_waits_for_every_cancelled_task() -> None:
    ini = logged_in()
    tags = [ini.command(READ10, edtl=512, read=True)[0] for _ in range(3)]
    other, _ = ini.command(READ10, edtl=512, read=True, lun=1)
    ev = ini.send(pdu.TaskMgmtRequest(itt=501, function=2, lun=encode_lun(0), cmdsn=ini.cmdsn))
    (aborted,) = ev
    assert isinstance(aborted, events.TasksAborted) and aborted.task_tags == tuple(tags)
    for t in tags[:-1]:
        ini.conn.task_cancelled(t)
    assert ini.recv() == []
    ini.conn.task_cancelled(tags[-1])
    (r,) = ini.recv()
    assert isinstance(r, pdu.TaskMgmtResponse) and r.itt == 501 and r.response == 0
    ini.conn.complete(other, 0, bytes(512))  # another LUN's task was not touched
    (d,) = ini.recv()
    assert isinstance(d, pdu.DataIn) and d.itt == other and d.status == 0


def test_cancelled_tasks_let_a_deferred_lun_reset_go_on() -> None:
    ini = logged_in(defer_resets=True)
    tag, _ = ini.command(READ10, edtl=512, read=True)
    ini.send(pdu.TaskMgmtRequest(itt=611, function=5, lun=encode_lun(0), cmdsn=ini.cmdsn))
    ev = ini.conn.task_cancelled(tag)
    assert [type(e) for e in ev] == [events.ResetRequested]
    assert ini.recv() == []
    ini.conn.complete_tmf(611)
    (r,) = ini.recv()
    assert isinstance(r, pdu.TaskMgmtResponse) and r.itt == 611 and r.response == 0


def test_a_task_cancelled_without_an_abort_gets_aborted_command() -> None:
    ini = logged_in()
    tag, _ = ini.command(READ10, edtl=512, read=True)
    ini.conn.task_cancelled(tag)
    (r,) = ini.recv()
    assert isinstance(r, pdu.ScsiResponse) and r.itt == tag and r.status == 0x02
    sense = pdu.parse_sense_segment(r.data)
    assert sense[2] & 0x0F == 0x0B and ini.conn.outstanding == 0


def test_abort_unknown_task_and_collecting_task() -> None:
    ini = logged_in()
    ini.send(pdu.TaskMgmtRequest(itt=500, function=1, ref_task_tag=0x999, cmdsn=ini.cmdsn,
                                 ref_cmdsn=0))
    (r,) = ini.recv()
    assert isinstance(r, pdu.TaskMgmtResponse) and r.response == 1
    itt, _ = ini.command(WRITE10, edtl=1 << 20, write=True, data=bytes(4096), final=False)
    ini.send(pdu.TaskMgmtRequest(itt=501, function=1, ref_task_tag=itt, cmdsn=ini.cmdsn))
    (r,) = ini.recv()
    assert isinstance(r, pdu.TaskMgmtResponse) and r.response == 0
    assert ini.conn.outstanding == 0
    ini.send(pdu.DataOut(itt=itt, datasn=0, buffer_offset=4096, data=bytes(4096)))
    assert ini.recv() == []  # dropped quietly


def test_lun_reset_and_other_functions() -> None:
    ini = logged_in()
    tags = [ini.command(READ10, edtl=512, read=True)[0] for _ in range(3)]
    ini.send(pdu.TaskMgmtRequest(itt=600, function=5, lun=encode_lun(0), cmdsn=ini.cmdsn))
    assert ini.recv() == []
    for t in tags[:-1]:
        ini.conn.complete(t, 0, bytes(512))
    assert ini.recv() == []
    ini.conn.complete(tags[-1], 0, bytes(512))
    (r,) = ini.recv()
    assert isinstance(r, pdu.TaskMgmtResponse) and r.response == 0
    for fn, lun, expect in [(5, 9, 2), (3, 0, 0), (8, 0, 4), (14, 0, 5)]:
        ini.send(pdu.TaskMgmtRequest(itt=601, function=fn, lun=encode_lun(lun), cmdsn=ini.cmdsn))
        (r,) = ini.recv()
        assert isinstance(r, pdu.TaskMgmtResponse) and r.response == expect, fn
    ev = ini.send(pdu.TaskMgmtRequest(itt=602, function=7, cmdsn=ini.cmdsn))  # cold reset
    (r,) = ini.recv()
    assert isinstance(r, pdu.TaskMgmtResponse) and r.response == 0
    assert any(isinstance(e, events.CloseConnection) for e in ev)


def test_warm_reset_aborts_the_tasks_and_keeps_the_session() -> None:
    """TARGET WARM RESET cancels every task and is answered; only COLD RESET
    closes the connections (RFC 7143 §11.5.1). Linux's SCSI error handler
    sends WARM and goes on using the session (issue 11: closing it cost a
    session recovery and a re-login in a real guest)."""
    ini = logged_in()
    ini.command(WRITE10, edtl=4096, write=True, data=bytes(512))  # waits for its data
    ini.recv()  # its R2T
    ev = ini.send(pdu.TaskMgmtRequest(itt=603, function=6, cmdsn=ini.cmdsn))
    (r,) = ini.recv()
    assert isinstance(r, pdu.TaskMgmtResponse) and r.response == 0 and r.itt == 603
    assert not any(isinstance(e, events.CloseConnection) for e in ev), ev
    assert ini.conn.outstanding == 0 and not ini.conn.closed
    _, ev = ini.command(READ10, edtl=512, read=True)  # the session goes on
    assert [type(e) for e in ev] == [events.ScsiCommandReady]


def test_deferred_reset_waits_for_the_adapter() -> None:
    ini = logged_in(defer_resets=True)
    tag, _ = ini.command(READ10, edtl=512, read=True)
    ev = ini.send(pdu.TaskMgmtRequest(itt=610, function=5, lun=encode_lun(0), cmdsn=ini.cmdsn))
    assert [type(e) for e in ev] == [events.TasksAborted]
    ev = ini.conn.complete(tag, 0, bytes(512))
    (reset,) = ev
    assert isinstance(reset, events.ResetRequested) and reset.lun == 0
    assert ini.recv() == []  # no status for the aborted READ, no TMF answer yet
    assert ini.conn.complete_tmf(999) == []
    assert ini.conn.complete_tmf(610) == []
    (r,) = ini.recv()
    assert isinstance(r, pdu.TaskMgmtResponse) and r.itt == 610 and r.response == 0


def test_abort_tasks_from_another_session() -> None:
    ini = logged_in()
    running, _ = ini.command(READ10, edtl=512, read=True)
    collecting, _ = ini.command(WRITE10, edtl=1 << 20, write=True, data=bytes(4096),
                                final=False)
    other, _ = ini.command(READ10, edtl=512, read=True, lun=1)
    ev = ini.conn.abort_tasks({0})
    (aborted,) = ev
    assert isinstance(aborted, events.TasksAborted) and aborted.task_tags == (running,)
    assert ini.conn.is_aborted(running) and ini.conn.is_aborted(collecting)
    assert not ini.conn.is_aborted(other)
    ini.recv()
    ini.conn.complete(running, 0, bytes(512))
    assert ini.recv() == []  # TAS=0: aborted by someone else, no status
    ini.conn.complete(other, 0, bytes(512))
    assert ini.recv()
