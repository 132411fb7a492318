"""The Edge's write log: record and segment formats, segments and spares, queued
appends written by :meth:`WriteLog.drain`, group-committed fdatasync, replay.

On disk, ``<blockstore>/wal/seg-<n>.wal``: segments of the log. Each starts
with a segment header and holds records, each a header with a CRC32C over
header and data::

    struct seg_header { char magic[8] /* "SFWALSEG" */; uint32 version; uint32 crc; };
    struct record { char magic[4] /* "SFWR" */; uint16 version; uint16 flags;
                    uint64 gseq; uint32 lun; uint64 seq; uint64 offset; uint32 length;
                    uint32 crc /* over the 40 bytes before it, then the data */; };

Version 2: the record CRC starts from
``crc32c(uint64_be(n))`` instead of 0, ``n`` being the segment's number, and
a segment that is full ends with a SEAL record (``flags`` bit 0, length 0).
Segment files are recycled (below), so bytes after the last valid record may
be records of the file's previous life; their CRC was seeded with another
number, so they never replay. Replay of a sealed segment stops at the seal;
a segment neither sealed nor last whose tail is invalid is reported as
corrupt. A new file is preallocated, so a zeroed tail is normal.

Version 3 (this build writes it) adds the COMMIT mark (``flags`` bit 1,
length 0, ``seq`` = the LUN's newest seq the Core has, ``gseq`` = the last
write's) and the DISCARD record (``flags`` bit 2, data = the uint64 length
of the range the host deallocated: UNMAP, WRITE SAME with UNMAP): written now and then as the Core acknowledges, never synced on its
own (it rides with the next appends' writes), so that after the Edge is
killed replay resends what was uncommitted, not every record since the last
retired segment (issue 18). A lost mark only means more is resent. Versions
1 (CRC from 0, no seal) and 2 are still read, so an upgrade keeps the
uncommitted writes; a segment is sealed in its own version.

Once every record of a sealed segment is committed the file is renamed
``spare-<n>.wal`` (never replayed); up to :data:`SPARES_MAX` spares are kept
and become the next segments (new header, then renamed), so log writes
overwrite allocated blocks instead of growing a file; more are unlinked off
the event loop. Which records replay, and what a segment's retirement must
wait for, is the Blockstore's business (:mod:`edge.blockstore.store`).
"""

from __future__ import annotations

import asyncio
import errno
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from steelfusion import log
from steelfusion.atomic import fsync_dir
from steelfusion.fileio import pread_full, pwrite_all, pwritev_all
from steelfusion.groupcommit import GroupCommit
from steelfusion.wire import crc32c

_log = log.get("blockstore")

SEG_MAGIC = b"SFWALSEG"
SEG_HEADER = struct.Struct(">8sII")
REC_MAGIC = b"SFWR"
REC = struct.Struct(">4sHHQIQQII")
REC_HEAD = struct.Struct(">4sHHQIQQI")  # REC without its crc: what the crc covers first
REC_VERSION = 3
REC_VERSIONS_READ = (1, 2, 3)
FLAG_SEAL = 1
FLAG_COMMIT = 2
FLAG_DISCARD = 4  # (version 3) the host deallocated [offset, offset + the uint64 data)
SEG_BYTES = 64 << 20
SPARES_MAX = 2

Data = bytes | memoryview


class BlockstoreError(Exception):
    """The blockstore's files are unusable (bad magic, wrong version, I/O error)."""


@dataclass(slots=True)
class Record:
    """One uncommitted write: where its data lies in the log, and maybe in memory."""

    gseq: int
    lun: int
    seq: int
    offset: int
    length: int
    seg: int
    pos: int  # offset of the data in the segment file
    data: Data | None
    discard: int = 0  # a discard: the range's length (``length`` is 0, no data to ship)


class _Replayed(NamedTuple):
    version: int
    end: int  # where replay stopped: after the last valid record (or the seal)
    sealed: bool


def _seg_seed(seg: int) -> int:
    """Initial CRC of a version-2 segment's records: ties a record to one life of a file."""
    return crc32c(seg.to_bytes(8, "big"))


def _seg_header(version: int) -> bytes:
    head = SEG_MAGIC + version.to_bytes(4, "big")
    return head + crc32c(head).to_bytes(4, "big")


def _seal_record(seg: int, version: int = REC_VERSION) -> bytes:
    head = REC_HEAD.pack(REC_MAGIC, version, FLAG_SEAL, 0, 0, 0, 0, 0)
    return head + crc32c(head, _seg_seed(seg)).to_bytes(4, "big")


def _preallocate(fd: int, nbytes: int) -> None:
    """Allocate a segment's blocks up front, so log writes never grow the file."""
    if not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
            raise


def _close_unlink(fd: int, path: Path) -> None:
    try:
        os.close(fd)
        path.unlink(missing_ok=True)
    except OSError as e:
        _log.warning("write_log_unlink_failed", path=str(path), error=str(e))


_Syncs = tuple[list[int], Path | None]  # one group commit's files: segments, maybe the folder


def _fdatasync_all(work: _Syncs) -> None:
    fds, directory = work
    for fd in fds:
        os.fdatasync(fd)
    if directory is not None:
        fsync_dir(directory)


class WriteLog:
    """Segmented log with CRC32C records, queued appends and group-committed fdatasync.

    :meth:`append` only queues; :meth:`drain` writes. Whatever reads the
    files or syncs them first calls ``drain_hook`` while anything is queued
    (the Blockstore passes its own drain, which records a failure; alone,
    the log drains itself). ``may_retire`` is asked before a segment stops
    being replayed; False keeps it (the Blockstore persists its committed
    seqs first, see ``Blockstore._persist_committed``).
    """

    def __init__(self, directory: Path, *, drain_hook: Callable[[], None] | None = None,
                 may_retire: Callable[[], bool] | None = None) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.seg_bytes = SEG_BYTES
        self.active_seg = 0
        self.active_pos = 0
        self._seed = 0
        self.fds: dict[int, int] = {}
        self.refs: dict[int, int] = {}  # segment -> uncommitted records in it
        self.spares: list[tuple[int, int]] = []  # (old segment number, fd) of spare files
        self.unsynced: set[int] = set()
        self._dir_dirty = False  # a segment file was created or renamed since the last sync
        # A ticket per sync() call; only asked-for syncs run. Fail-stop: after a failed
        # fdatasync the kernel may have dropped the dirty pages and cleared the error, so a
        # later fdatasync "succeeds" without the data (PostgreSQL's fsyncgate, 2018). The
        # segments were taken off ``unsynced`` by the cut: every later sync() raises the
        # first error, and only a restart (replay from the log) makes the Edge trust it again.
        self._group: GroupCommit[_Syncs, OSError] = GroupCommit(
            self._cut_sync, _fdatasync_all, eager=False, fatal=OSError)
        self.corrupt: list[str] = []
        self.replayed: dict[int, _Replayed] = {}
        self.marks: dict[int, int] = {}  # LUN id -> newest COMMIT mark replayed
        # the queue: buffers back to back, and runs (segment, file position, first buffer)
        self._iov: list[Data] = []
        self._runs: list[tuple[int, int, int]] = []
        self._release_after_drain: set[int] = set()
        self.drain_hook: Callable[[], None] = drain_hook or self.drain
        self.may_retire: Callable[[], bool] = may_retire or (lambda: True)

    def _path(self, seg: int) -> Path:
        return self.dir / f"seg-{seg:012d}.wal"

    def _spare_path(self, seg: int) -> Path:
        return self.dir / f"spare-{seg:012d}.wal"

    def _numbers(self, prefix: str) -> list[int]:
        out = []
        for p in self.dir.glob(f"{prefix}-*.wal"):
            try:
                out.append(int(p.stem[len(prefix) + 1:]))
            except ValueError:
                continue
        return sorted(out)

    def segments(self) -> list[int]:
        return self._numbers("seg")

    # -- replay ------------------------------------------------------------------------
    def replay(self) -> list[tuple[Record, bytes]]:
        """Read every valid record of every segment, oldest first.

        A segment this build cannot read raises BlockstoreError: which file,
        what is wrong and the first thing to try (the Blockstore adds the last).
        """
        out: list[tuple[Record, bytes]] = []
        segs = self.segments()
        for i, seg in enumerate(segs):
            last = i == len(segs) - 1
            with open(self._path(seg), "rb") as f:
                raw = f.read()
            if len(raw) < SEG_HEADER.size:
                if not last:
                    self.corrupt.append(f"segment {seg}: truncated header")
                continue
            magic, version, crc = SEG_HEADER.unpack_from(raw)
            if magic != SEG_MAGIC or crc32c(raw[:12]) != crc:
                raise BlockstoreError(f"{self._path(seg)}: not a write-log segment (bad header); "
                                      "restore it from a backup")
            if version not in REC_VERSIONS_READ:
                raise BlockstoreError(f"{self._path(seg)}: version {version}, this build reads "
                                      f"{', '.join(map(str, REC_VERSIONS_READ))}; run the newer "
                                      "build that wrote it")
            seed = _seg_seed(seg) if version >= 2 else 0
            pos = SEG_HEADER.size
            sealed = False
            prev_gseq = out[-1][0].gseq if out else 0
            while pos + REC.size <= len(raw):
                magic, ver, flags, gseq, lun, seq, offset, length, crc = REC.unpack_from(raw, pos)
                end = pos + REC.size + length
                if magic != REC_MAGIC or ver != version or end > len(raw):
                    break
                data = raw[pos + REC.size:end]
                if crc32c(data, crc32c(raw[pos:pos + 40], seed)) != crc:
                    break
                pos = end
                if version >= 2 and flags & FLAG_SEAL:
                    sealed = True
                    break
                prev_gseq = gseq
                if version >= 3 and flags & FLAG_COMMIT:
                    self.marks[lun] = max(self.marks.get(lun, 0), seq)
                    continue
                if version >= 3 and flags & FLAG_DISCARD:
                    out.append((Record(gseq, lun, seq, offset, 0, seg, pos, None,
                                       int.from_bytes(data, "big")), b""))
                    continue
                out.append((Record(gseq, lun, seq, offset, length, seg, pos - length, None),
                            data))
            self.replayed[seg] = _Replayed(version, pos, sealed)
            if sealed or pos == len(raw):
                continue
            what = f"segment {seg}: {len(raw) - pos} bytes after the last valid record"
            if not last:
                self.corrupt.append(what)
                _log.error("write_log_corrupt", detail=what)
            elif version < 2 or self._looks_torn(raw, pos, prev_gseq, version):
                _log.warning("write_log_torn_tail", detail=what)
            elif any(raw[pos:pos + REC.size]):
                # a recycled file: what follows is its previous life (or a torn record
                # that was never acknowledged, since its writer drained it first)
                _log.info("write_log_tail_ignored", segment=seg, bytes=len(raw) - pos)
        return out

    @staticmethod
    def _looks_torn(raw: bytes, pos: int, prev_gseq: int, version: int) -> bool:
        """A record header of this life (the next gseq, or a mark's) whose record is
        incomplete or bad."""
        if pos + REC.size > len(raw):
            return raw[pos:pos + 4] == REC_MAGIC
        magic, ver, _f, gseq, *_ = REC.unpack_from(raw, pos)
        return magic == REC_MAGIC and ver == version and gseq in (prev_gseq, prev_gseq + 1)

    # -- segments and spares ---------------------------------------------------------
    def open_for_append(self) -> None:
        """Keep segments with uncommitted records, recycle the rest, start a new segment."""
        segs = self.segments()
        spare_nums = self._numbers("spare")
        self.active_seg = max(segs + spare_nums, default=0) + 1
        for n in spare_nums:
            if len(self.spares) < SPARES_MAX:
                self.spares.append((n, os.open(self._spare_path(n), os.O_RDWR)))
            else:
                self._spare_path(n).unlink(missing_ok=True)
        for seg in segs:
            self.fds[seg] = os.open(self._path(seg), os.O_RDWR)
            if self.refs.get(seg, 0) == 0:  # nothing uncommitted left in it
                self._retire(seg, background=False)
        # Seal the previous last segment where its replay stopped, so that once
        # it is no longer last its tail is not mistaken for corruption.
        info = self.replayed.get(segs[-1]) if segs else None
        if info is not None and segs[-1] in self.fds and info.version >= 2 and not info.sealed:
            pwrite_all(self.fds[segs[-1]], _seal_record(segs[-1], info.version), info.end)
            self.unsynced.add(segs[-1])
        self.refs.setdefault(self.active_seg, 0)
        self._seed = _seg_seed(self.active_seg)
        self.active_pos = SEG_HEADER.size
        self._create(self.active_seg)

    def _create(self, seg: int) -> int:
        """Open segment ``seg``'s file: a spare with a fresh header, else a preallocated file."""
        path = self._path(seg)
        if self.spares:
            old, fd = self.spares.pop(0)
            pwrite_all(fd, _seg_header(REC_VERSION), 0)
            os.rename(self._spare_path(old), path)
            if os.fstat(fd).st_size < self.seg_bytes:
                _preallocate(fd, self.seg_bytes)
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                pwrite_all(fd, _seg_header(REC_VERSION), 0)
                _preallocate(fd, self.seg_bytes)
            except BaseException:
                os.close(fd)
                raise
        self.fds[seg] = fd
        self.unsynced.add(seg)
        self._dir_dirty = True
        return fd

    def _retire(self, seg: int, background: bool) -> None:
        """A segment with nothing uncommitted: becomes a spare, or goes (off the event loop)."""
        if not self.may_retire():
            return  # kept: replaying it is safe, only its disk space is not reused yet
        fd = self.fds.pop(seg, None)
        self.refs.pop(seg, None)
        self.unsynced.discard(seg)
        spare = self._spare_path(seg)
        try:
            os.rename(self._path(seg), spare)  # from now on never replayed
        except FileNotFoundError:
            if fd is not None:
                os.close(fd)
            return
        self._dir_dirty = True
        if fd is None:
            fd = os.open(spare, os.O_RDWR)
        if len(self.spares) < SPARES_MAX:
            self.spares.append((seg, fd))
            return
        loop = None
        if background:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
        if loop is None:
            _close_unlink(fd, spare)
        else:
            loop.run_in_executor(None, _close_unlink, fd, spare)

    def hold(self, seg: int) -> None:
        """One more uncommitted record in ``seg``: it is not retired before :meth:`release`."""
        self.refs[seg] = self.refs.get(seg, 0) + 1

    def release(self, seg: int) -> None:
        """A record of ``seg`` is committed; the last one retires the segment (not the active one)."""
        left = self.refs[seg] - 1
        self.refs[seg] = left
        if left == 0 and seg != self.active_seg:
            if any(run[0] == seg for run in self._runs):  # still has queued writes
                self._release_after_drain.add(seg)
            else:
                self._retire(seg, background=True)

    # -- append and drain ------------------------------------------------------------
    def append(self, gseq: int, lun: int, seq: int, offset: int, data: Data,
               flags: int = 0) -> tuple[int, int]:
        """Queue one record (no syscall); returns (segment, data position).

        A record never spans segments: one that would not fit with the seal
        after it starts the next segment (unless the segment is empty).
        """
        n = len(data)
        pos = self.active_pos
        if pos + n + 2 * REC.size > self.seg_bytes and pos > SEG_HEADER.size:
            self._roll()
            pos = self.active_pos
        head = REC_HEAD.pack(REC_MAGIC, REC_VERSION, flags, gseq, lun, seq, offset, n)
        crc = crc32c(data, crc32c(head, self._seed))
        iov = self._iov
        if not iov:
            self._runs.append((self.active_seg, pos, 0))
        iov.append(head + crc.to_bytes(4, "big"))
        iov.append(data)
        self.active_pos = pos + REC.size + n
        return self.active_seg, pos + REC.size

    def mark(self, gseq: int, lun: int, seq: int) -> None:
        """Queue a COMMIT mark: the Core has every write of ``lun`` up to ``seq``."""
        self.append(gseq, lun, seq, 0, b"", FLAG_COMMIT)

    def _roll(self) -> None:
        """Queue the active segment's seal and start the next one (its file opens at drain)."""
        old = self.active_seg
        if not self._iov:
            self._runs.append((old, self.active_pos, 0))
        self._iov.append(_seal_record(old))
        if self.refs.get(old, 0) == 0:
            self._release_after_drain.add(old)
        new = old + 1
        self.refs.setdefault(new, 0)
        self.active_seg, self.active_pos, self._seed = new, SEG_HEADER.size, _seg_seed(new)
        self._runs.append((new, SEG_HEADER.size, len(self._iov)))

    @property
    def queued(self) -> bool:
        return bool(self._iov)

    def drain(self) -> None:
        """Write every queued record: one pwritev per run of IOV_MAX buffers in one segment.

        Raises OSError; the queue is gone either way (the Blockstore then
        refuses all further work, see ``Blockstore.drain``).
        """
        iov, runs = self._iov, self._runs
        if not iov:
            return
        self._iov, self._runs = [], []
        for i, (seg, pos, start) in enumerate(runs):
            end = runs[i + 1][2] if i + 1 < len(runs) else len(iov)
            fd = self.fds.get(seg)
            if fd is None:
                fd = self._create(seg)
            pwritev_all(fd, iov if len(runs) == 1 else iov[start:end], pos)
            self.unsynced.add(seg)
        if self._release_after_drain:
            segs, self._release_after_drain = self._release_after_drain, set()
            for seg in sorted(segs):
                if self.refs.get(seg, 0) == 0 and seg != self.active_seg:
                    self._retire(seg, background=True)

    def read(self, seg: int, pos: int, length: int) -> bytes:
        if self._iov:
            self.drain_hook()
        return pread_full(self.fds[seg], length, pos)

    # -- durability ------------------------------------------------------------------
    async def sync(self) -> None:
        """Drain, then fdatasync every segment written since the last sync; callers share it.

        A caller arriving while a sync runs gets the next pass, which covers
        its writes (group commit, :class:`~steelfusion.groupcommit.GroupCommit`).
        """
        if self._iov:
            self.drain_hook()
        await self._group.wait(self._group.issue())

    def _cut_sync(self, target: int) -> _Syncs:
        """The segments (and the folder) written since the last pass, on the loop thread."""
        fds = [self.fds[s] for s in self.unsynced if s in self.fds]
        self.unsynced = set()
        directory = self.dir if self._dir_dirty else None
        self._dir_dirty = False
        return fds, directory

    def close(self) -> None:
        """Sync and close (the caller drained); segments with nothing uncommitted become spares."""
        try:
            for seg in list(self.fds):
                os.fdatasync(self.fds[seg])
                if self.refs.get(seg, 0) == 0:
                    self._retire(seg, background=False)
        finally:
            for fd in self.fds.values():
                os.close(fd)
            self.fds.clear()
            for _, fd in self.spares:
                os.close(fd)
            self.spares.clear()
