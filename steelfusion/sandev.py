"""A SAN LUN as a Core's block device: the iSCSI client on a thread of its own (issue 12).

The LUN store and the journal use a blocking :class:`~steelfusion.blockdev.Device`.
``pwrite`` is called on the Core's event loop, and ``sync`` is called from a group
commit's worker thread. The initiator (:mod:`steelfusion.iscsi.client`) is asyncio, so it
runs its own event loop on a daemon thread, and every call crosses over with
``run_coroutine_threadsafe``:

* ``pwrite`` only queues the WRITE. The client keeps writes to overlapping ranges in the
  order they were issued. A write's error is raised at the next ``pwrite`` or ``sync``.
  The caller's buffer is copied, because the Core reuses its receive buffers.
* ``sync`` waits for every write queued before it, then SYNCHRONIZE CACHE.
* ``pread`` waits for its answer, at most ``READ_TIMEOUT`` seconds, and fails at once
  while the session is down: a caller on the Core's event loop must not stall with it.
* ``size`` answers from the last READ CAPACITY and asks again in the background every
  ``SIZE_REFRESH_S``: the journal checks its size twice a second. A LUN that shrank or
  vanished is an error at the next call.

A lost session is not an error: the client logs in again and re-issues every command
that had no answer, for as long as it takes (an array's outage stalls the Core's
acknowledgements, it does not fail them). :meth:`IscsiDevice.trouble` says why meanwhile,
and the Core raises an alarm with it.

Errors from the array become OSErrors, so the journal and the LUN store report them as they
would a disk's. A thin pool out of space (sense DATA PROTECT, SPACE ALLOCATION FAILED WRITE
PROTECT, SBC-3 4.7.3.6) is ENOSPC. RESERVATION CONFLICT is :class:`~steelfusion.fence.Fenced`
(EBADE, "fenced: another Core holds the reservation on ..."): the client treats it as a final
answer, never as a lost session to retry, and from then on :meth:`IscsiDevice.trouble` says
so, so the Core's alarm names it. Anything else, including a session that stays lost past
the client's give-up time, is EIO.

Persistent reservations for fencing a partner Core (:mod:`steelfusion.fence`): ``pr_*``
methods, blocking like the rest. The device never registers by itself; once fenced it
registers again only when :meth:`IscsiDevice.pr_register` is called with ``rejoin=True``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import math
import threading
import time
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from steelfusion import log
from steelfusion.fence import Fenced, PrUnsupported
from steelfusion.fileio import write_zeros
from steelfusion.iscsi.client import CheckCondition, IscsiClient, IscsiError, ReservationConflict

T = TypeVar("T")
INITIATOR_NAME = "iqn.2026-11.io.steelfusion:core"
CALL_TIMEOUT = 600.0  # seconds a sync or close waits for the writes before it (EIO after)
READ_TIMEOUT = 10.0
PR_TIMEOUT = 30.0  # seconds a PERSISTENT RESERVE waits (after the writes queued before it)
SIZE_REFRESH_S = 5.0
_log = log.get("sandev")

_ha_key: int | None = None
"""The reservation key this process registers every SAN session it opens with (Core HA,
issue 16: :mod:`core.hahost` sets it once the HA pair has joined the shared LUNs)."""


_via: tuple[str, int] | None = None
"""Where this process's SAN sessions connect instead of the URL's portal (``[core] san_via``:
the lab's per-Core path to its array, steelfusion/sanpath.py)."""


def route_through(addr: tuple[str, int] | None) -> None:
    """From now on every :meth:`IscsiDevice.open` connects to ``addr`` (None: the portal)."""
    global _via
    _via = addr


def _routed(url: str) -> str:
    if _via is None:
        return url
    rest = url[len("iscsi://"):]
    cred, at, hostpart = rest.rpartition("@") if "@" in rest.split("/", 1)[0] else ("", "", rest)
    tail = hostpart.split("/", 1)[1] if "/" in hostpart else ""
    host = f"[{_via[0]}]" if ":" in _via[0] else _via[0]
    return f"iscsi://{cred}{at}{host}:{_via[1]}/{tail}"


def register_new_sessions(key: int | None) -> None:
    """From now on each :meth:`IscsiDevice.open` registers its session with ``key`` — unless
    the key is no longer listed on the LUN (a partner preempted it: this Core is fenced and
    must not undo that by registering a new session; the device then says so)."""
    global _ha_key
    _ha_key = key


SENSE_KEYS = {0x2: "NOT READY", 0x3: "MEDIUM ERROR", 0x4: "HARDWARE ERROR",
              0x5: "ILLEGAL REQUEST", 0x6: "UNIT ATTENTION", 0x7: "DATA PROTECT",
              0xB: "ABORTED COMMAND"}
# What an array's answers mean to its operator (SPC-4 annex D names, then the likely cause).
MEANINGS = {
    (0x25, 0x00): "LOGICAL UNIT NOT SUPPORTED: the LUN is gone from the array (unmapped or "
                  "deleted)",
    (0x21, 0x00): "LOGICAL BLOCK ADDRESS OUT OF RANGE: the LUN is smaller than the Core "
                  "expects (it shrank)",
    (0x27, 0x07): "SPACE ALLOCATION FAILED WRITE PROTECT: the array's thin pool is out of "
                  "space",
    (0x27, 0x00): "WRITE PROTECTED: the array made the LUN read-only",
    (0x0C, 0x00): "WRITE ERROR: the array could not write",
    (0x11, 0x00): "UNRECOVERED READ ERROR: the array could not read",
    (0x04, 0x03): "LOGICAL UNIT NOT READY, MANUAL INTERVENTION REQUIRED",
}


def meaning(e: BaseException) -> str:
    """A CHECK CONDITION in words; anything else as it says itself."""
    if not isinstance(e, CheckCondition):
        return str(e)
    key = SENSE_KEYS.get(e.key, f"sense key 0x{e.key:X}")
    what = MEANINGS.get((e.asc, e.ascq), f"ASC/ASCQ {e.asc:02X}/{e.ascq:02X}")
    return f"{e} ({key}, {what})"


def os_error(e: BaseException, url: str, action: str) -> OSError:
    """The array's answer as the OSError a disk would have given."""
    if isinstance(e, OSError):
        return e
    if isinstance(e, ReservationConflict):
        return Fenced(f"fenced: another Core holds the reservation on {redact(url)} ({action} "
                      "refused with RESERVATION CONFLICT); registering again is an explicit "
                      "rejoin step")
    if (action.startswith("PERSISTENT RESERVE") and isinstance(e, CheckCondition)
            and e.key == 0x5 and (e.asc, e.ascq) in ((0x24, 0x00), (0x20, 0x00))):
        return PrUnsupported(f"{action} on {redact(url)}: the array does not support it "
                             f"({meaning(e)})")
    code = errno.EIO
    if isinstance(e, CheckCondition) and (e.asc, e.ascq) == (0x27, 0x07):
        code = errno.ENOSPC  # thin provisioning: space allocation failed write protect
    return OSError(code, f"{action} on {redact(url)}: {meaning(e)}")


def redact(url: str) -> str:
    """The URL without a CHAP secret (``user%secret@`` -> ``user@``), for logs and alarms."""
    head, sep, rest = url.partition("://")
    cred, at, tail = rest.partition("@")
    if not at or "/" in cred:
        return url
    return f"{head}{sep}{cred.split('%', 1)[0]}@{tail}"


class IscsiDevice:
    """One SAN LUN, blocking calls over an asyncio initiator on its own thread."""

    def __init__(self, url: str, client: IscsiClient, loop: asyncio.AbstractEventLoop,
                 thread: threading.Thread) -> None:
        self.path = url
        self._client = client
        self._loop = loop
        self._thread = thread
        self._pending: list[concurrent.futures.Future[Any]] = []
        self._lock = threading.Lock()  # _pending: pwrite on the Core's loop, sync in a worker
        self._size = 0
        self._size_at = 0.0
        self._size_error: BaseException | None = None
        self._size_asking = False
        self._fenced: str | None = None
        self._unmap_ok = True  # until the array refuses UNMAP (then zeros are written)

    @classmethod
    def open(cls, url: str, initiator_name: str = INITIATOR_NAME,
             timeout: float = 30.0, isid: int | None = None) -> IscsiDevice:
        """Log in and read the size. ``initiator_name`` identifies the Core to the array
        (ACLs, and each Core of an HA pair its own I_T nexus for persistent reservations);
        ``isid`` is random unless given."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name=f"iscsi {redact(url)}",
                                  daemon=True)
        thread.start()
        client = IscsiClient(_routed(url), initiator_name=initiator_name, give_up_s=math.inf,
                             login_timeout_s=min(timeout, 15.0), isid=isid)
        dev = cls(url, client, loop, thread)
        try:
            dev._call(client.connect(), timeout, "login")
            dev._set_size(dev._call(client.capacity(), timeout, "READ CAPACITY"))
            if _ha_key is not None:
                dev._join(_ha_key, timeout)
        except OSError:
            dev._stop_loop()
            raise
        _log.info("san_lun_opened", url=redact(url), size=dev._size)
        return dev

    def _join(self, key: int, timeout: float) -> None:
        """A new session of an HA Core: registered if the key is still listed (steelfusion/
        iscsi/client.py ``keep_registration``), else it stays out and the device is fenced."""
        self._call(self._client.keep_registration(key), timeout, "PERSISTENT RESERVE (join)")
        if self._client.pr_lost:
            self._fenced = (f"{redact(self.path)}: this Core's reservation key 0x{key:016x} was "
                            "preempted by its HA partner (fenced)")
            _log.error("san_lun_fenced", url=redact(self.path), action="open")

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float, action: str) -> T:
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except (IscsiError, TimeoutError, concurrent.futures.TimeoutError) as e:
            fut.cancel()
            raise self._error(e, action) from None

    def _error(self, e: BaseException, action: str) -> OSError:
        err = os_error(e, self.path, action)
        if isinstance(err, Fenced) and self._fenced is None:
            self._fenced = err.strerror
            _log.error("san_lun_fenced", url=redact(self.path), action=action)
        return err

    def _reap(self, wait: bool) -> None:
        """Forget finished writes; raise the first failed one's error."""
        with self._lock:
            pending, self._pending = self._pending, []
        first: BaseException | None = None
        keep = []
        for fut in pending:
            if wait:
                try:
                    fut.result(CALL_TIMEOUT)
                except BaseException as e:
                    first = first or e
            elif fut.done():
                if fut.exception() is not None:
                    first = first or fut.exception()
            else:
                keep.append(fut)
        if keep:
            with self._lock:
                self._pending[:0] = keep
        if first is not None:
            raise self._error(first, "a write")

    # -- Device ------------------------------------------------------------------------------
    def _set_size(self, capacity: tuple[int, int]) -> None:
        bs, blocks = capacity
        self._size, self._size_at, self._size_error = bs * blocks, time.monotonic(), None

    def _size_answer(self, fut: concurrent.futures.Future[tuple[int, int]]) -> None:
        self._size_asking = False
        if fut.cancelled():
            return
        e = fut.exception()
        if e is None:
            self._set_size(fut.result())
        else:
            self._size_error = e

    def size(self) -> int:
        if self._size_error is not None:
            e, self._size_error = self._size_error, None
            raise os_error(e, self.path, "READ CAPACITY")
        if (time.monotonic() - self._size_at > SIZE_REFRESH_S and not self._size_asking
                and self._client.connected):
            self._size_asking = True
            asyncio.run_coroutine_threadsafe(self._client.capacity(), self._loop
                                             ).add_done_callback(self._size_answer)
        return self._size

    def pread(self, length: int, offset: int) -> bytes:
        why = self._down()  # a fenced Core still reads (WRITE EXCLUSIVE, steelfusion/fence.py)
        if why is not None:
            raise OSError(errno.EIO, why)
        return bytes(self._call(self._client.read(offset, length), READ_TIMEOUT, "a read"))

    def trouble(self) -> str | None:
        """Why the Core should raise an alarm about this LUN: fenced, or the session down."""
        return self._fenced if self._fenced is not None else self._down()

    def _down(self) -> str | None:
        if self._client.connected:
            return None
        return (f"the iSCSI session to {redact(self.path)} is down "
                f"({self._client.last_loss or 'logging in'}); reconnecting")

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        bs = self._client.block_size
        if offset % bs or len(data) % bs:
            raise ValueError(f"{redact(self.path)}: a write at {offset} of {len(data)} bytes is "
                             f"not whole {bs}-byte blocks (the array takes only whole blocks)")
        if len(self._pending) > 64:
            self._reap(wait=False)
        fut = asyncio.run_coroutine_threadsafe(self._client.write(offset, bytes(data)),
                                               self._loop)
        with self._lock:
            self._pending.append(fut)

    def pwritev(self, bufs: Sequence[bytes | memoryview], offset: int) -> None:
        self.pwrite(b"".join(bufs), offset)

    def discard(self, offset: int, length: int) -> None:
        """UNMAP on the array (its thin pool gets the space back), queued in order with the
        writes; an array that refuses UNMAP (not thin, ILLEGAL REQUEST) gets zeros instead,
        and only zeros from then on (issue 18)."""
        bs = self._client.block_size
        if offset % bs or length % bs:
            raise ValueError(f"{redact(self.path)}: a discard at {offset} of {length} bytes is "
                             f"not whole {bs}-byte blocks")
        if self._unmap_ok:
            fut = asyncio.run_coroutine_threadsafe(self._unmap(offset, length), self._loop)
            with self._lock:
                self._pending.append(fut)
            return
        write_zeros(self.pwrite, offset, length)

    async def _unmap(self, offset: int, length: int) -> None:
        try:
            await self._client.unmap(offset, length)
        except CheckCondition as e:
            if e.key != 0x5:  # not ILLEGAL REQUEST: a real failure, reported as a write's
                raise
            self._unmap_ok = False
            _log.info("san_unmap_unsupported", url=redact(self.path), sense=str(e))
            zeros = bytes(min(length, 1 << 20))
            for off in range(offset, offset + length, len(zeros)):
                await self._client.write(off, zeros[:min(len(zeros), offset + length - off)])

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """The array's own GET LBA STATUS over the range (issue 18); only DEALLOCATED counts
        as not mapped (ANCHORED holds space). An array without it is all mapped, which
        promises nothing wrong."""
        bs = self._client.block_size
        end = offset + length
        out: list[tuple[int, int, bool]] = []
        pos = offset
        while pos < end:
            try:
                descs = self._call(self._client.lba_status(pos // bs), CALL_TIMEOUT,
                                   "GET LBA STATUS")
            except OSError:
                return [*out, (pos, end - pos, True)]
            step = [(lba * bs, n * bs, st != 1) for lba, n, st in descs if n]
            if not step or step[0][0] > pos:
                return [*out, (pos, end - pos, True)]
            for o, n, mapped in step:
                if o + n <= pos:
                    continue
                n = min(o + n, end) - pos
                out.append((pos, n, mapped))
                pos += n
                if pos >= end:
                    break
        return out

    def allocated(self) -> int | None:
        return None  # the array's to say (its thin pool)

    def sync(self) -> None:
        self._reap(wait=True)
        self._call(self._client.sync(), CALL_TIMEOUT, "SYNCHRONIZE CACHE")

    def lock(self) -> None:
        """Nothing here: fencing a partner Core is :mod:`steelfusion.fence` (pr_* below)."""

    # -- persistent reservations (steelfusion/fence.py) --------------------------------------
    @property
    def fenced(self) -> str | None:
        """Why this device was refused with RESERVATION CONFLICT (None until it is)."""
        return self._fenced

    def pr_read_keys(self) -> tuple[int, list[int]]:
        return self._call(self._client.pr_read_keys(), PR_TIMEOUT,
                          "PERSISTENT RESERVE IN READ KEYS")

    def pr_read_reservation(self) -> tuple[int, int | None, int | None]:
        return self._call(self._client.pr_read_reservation(), PR_TIMEOUT,
                          "PERSISTENT RESERVE IN READ RESERVATION")

    def pr_register(self, key: int, *, rejoin: bool = False) -> None:
        """REGISTER AND IGNORE EXISTING KEY. Refused once this device was fenced, unless
        ``rejoin``: registering again silently would undo the partner's fence."""
        if self._fenced is not None and not rejoin:
            raise Fenced(f"{self._fenced}; not registering again without rejoin")
        self._reap(wait=True)  # a fenced write queued before must not pass for a new one's
        self._call(self._client.pr_register(key), PR_TIMEOUT,
                   "PERSISTENT RESERVE OUT REGISTER AND IGNORE EXISTING KEY")
        if self._fenced is not None:
            _log.warning("san_lun_rejoined", url=redact(self.path), key=f"0x{key:016x}")
        self._fenced = None

    def pr_reserve(self, key: int, pr_type: int) -> None:
        self._call(self._client.pr_reserve(key, pr_type), PR_TIMEOUT,
                   "PERSISTENT RESERVE OUT RESERVE")

    def pr_preempt(self, key: int, victim: int, pr_type: int, *, abort: bool) -> None:
        what = "PREEMPT AND ABORT" if abort else "PREEMPT"
        self._call(self._client.pr_preempt(key, victim, pr_type, abort=abort), PR_TIMEOUT,
                   f"PERSISTENT RESERVE OUT {what}")

    def close(self) -> None:
        try:
            self._reap(wait=True)
        except OSError as e:
            _log.warning("san_lun_close_error", url=redact(self.path), error=str(e))
        try:
            self._call(self._client.close(), 30.0, "logout")
        except OSError as e:
            _log.warning("san_lun_logout_failed", url=redact(self.path), error=str(e))
        self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._loop.is_running():
            self._loop.close()
