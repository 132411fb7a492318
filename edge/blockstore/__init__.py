"""The Edge blockstore: a write reserve (log of uncommitted writes) and a read cache.

DESIGN.md, write path step 1: a host write is stored as *uncommitted*, then
acknowledged; it is shipped in order to the primary Core and freed when the
Core acknowledges it (step 6). The part holding uncommitted data is the
*write reserve*; when it is full, host writes wait — never fail, never drop.

Writes are batched: :meth:`Blockstore.append` only queues a record for the
log and its data for the cache; :meth:`Blockstore.drain` writes the queued
log records with as few syscalls as it can. The iSCSI target calls
``drain()`` before it sends any response, so a write is in the log (the page
cache, which survives SIGKILL) before it is acknowledged. The cache writes
are off that path: they go out at the next event-loop turn, or first thing
when anything reads a cache file (:meth:`Blockstore.write_caches`).

The modules, in the order a write meets them, each with the files it owns
under the blockstore directory:

- :mod:`~edge.blockstore.reserve`: :class:`WriteReserve`, the bytes the
  reserve holds and the writers waiting for room (no file).
- :mod:`~edge.blockstore.wal`: :class:`WriteLog`, the record and segment
  formats, segments and spares, appends, group commit, replay and its CRC
  checks (``wal/seg-<n>.wal``, ``wal/spare-<n>.wal``).
- :mod:`~edge.blockstore.cache`: :class:`RegionCache`, one sparse file per
  LUN valid region by region, and its map (``cache-<lun>.img``,
  ``cache-<lun>.map``).
- :mod:`~edge.blockstore.store`: :class:`Blockstore`, which keeps the three
  in step: sequence numbers, committed seqs, which replayed records count,
  when the cache writes go out (``state.json``).

A package rather than modules beside ``edge/target.py``: the four are one
room (only the Blockstore is used from outside), and the names other code
imports stay importable from ``edge.blockstore``, as below.
"""

from edge.blockstore.cache import ABSENT, FULL, PARTIAL, SECTOR, RegionCache
from edge.blockstore.reserve import WriteReserve
from edge.blockstore.store import Blockstore
from edge.blockstore.wal import (
    REC,
    REC_HEAD,
    SEG_HEADER,
    BlockstoreError,
    Record,
    WriteLog,
)

__all__ = [
    "ABSENT",
    "FULL",
    "PARTIAL",
    "REC",
    "REC_HEAD",
    "SECTOR",
    "SEG_HEADER",
    "Blockstore",
    "BlockstoreError",
    "Record",
    "RegionCache",
    "WriteLog",
    "WriteReserve",
]
