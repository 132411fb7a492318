"""The drill's workload payloads (issue 10, item 3): self-describing blocks, and scanning an
image to attribute every block to the write that produced it.

Split from the checker (:mod:`steelfusion.drillcheck`) because both sides use it: the drill
runner writes :func:`payloads`, the checker reads images back with :func:`scan`. Nothing here
knows about histories or faults.

**Workload model.** A host writes whole blocks (4 KiB), and every block it writes is
self-describing (:func:`payload`): a header — magic, a tag of the drill seed, LUN, write id,
block number, a CRC32C of header and body, the block size — then a body of pseudo-random
words derived from (seed, write id, LUN, block). Any block read back from any copy is
therefore attributed (:func:`identify`, :func:`scan`) to the one write that produced it, or
found to be a value no write produced (torn between two writes, corrupt, another run's data),
or never-written zeros. The body is a counter-based hash (splitmix64 of a per-block key), not
a seeded RNG stream, so :func:`scan` regenerates and compares the bodies of a whole image with
a few numpy operations: a 64 MiB LUN checks in a fraction of a second. The body is compared
word for word, which catches a torn block deterministically; the CRC is also checked so a
tool that knows only the header layout (:data:`HEADER`) can verify blocks without numpy.
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from steelfusion.wire import crc32c

BLOCK = 4096
"""Block size of the drill workload: hosts write whole 4 KiB blocks."""

MAGIC = b"SFDRILL\x01"
HEADER = struct.Struct("<8sIIQQII")
"""magic, seed tag, LUN, write id, block, CRC32C, block size (little-endian, 40 bytes).
The CRC covers bytes [0, 32) then [36, size): everything but itself."""
_CRC_AT = 32

_HDR_DTYPE = np.dtype([("magic", "S8"), ("tag", "<u4"), ("lun", "<u4"), ("wid", "<u8"),
                       ("block", "<u8"), ("crc", "<u4"), ("size", "<u4")])

ZERO, VALID, BAD = 0, 1, 2
""":attr:`Scan.status` values: never-written zeros, a valid drill block, anything else."""
TORN, FOREIGN, GARBAGE = 1, 2, 3
""":attr:`Scan.why` a block is BAD: a header of this run over a body or CRC that does not match
it (a torn or corrupted block), a drill block of another seed or block size, no drill header."""
WHY = {TORN: "a torn or corrupt block", FOREIGN: "a block of another drill seed or block size",
       GARBAGE: "bytes no drill write produced"}

_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_M1 = _U64(0xBF58476D1CE4E5B9)
_M2 = _U64(0x94D049BB133111EB)
_LUN_MUL = _U64(0xD6E8FEB86659FD93)
WRITE_ID_MAX = (1 << 64) - 1
"""Write ids fit the header's 64 bits."""

U64Array = npt.NDArray[np.uint64]
Image = bytes | bytearray | memoryview | npt.NDArray[Any] | str | os.PathLike[str]
"""A LUN image: its bytes, a uint8 array, or the path of a file holding it (memory-mapped)."""


# --- workload payloads -------------------------------------------------------------------

def _mix(x: U64Array) -> U64Array:
    """splitmix64's finalizer: a bijection of uint64 that scatters every input bit."""
    x = (x ^ (x >> _U64(30))) * _M1
    x = (x ^ (x >> _U64(27))) * _M2
    return x ^ (x >> _U64(31))


@functools.lru_cache(maxsize=64)
def _seed_word(seed: int) -> int:
    return int.from_bytes(hashlib.blake2b(str(seed).encode(), digest_size=8).digest(), "little")


def _seed64(seed: int) -> U64Array:
    """Any int seed as one uint64 word (hashed, so 1 and 2 share no structure)."""
    return np.array([_seed_word(seed)], dtype=np.uint64)


def seed_tag(seed: int) -> int:
    """The 32-bit tag of a drill seed in every block's header (another run's data is foreign)."""
    return int(_mix(_seed64(seed) ^ _U64(0x5F5F))[0]) & 0xFFFFFFFF


def _keys(seed: int, wid: U64Array, lun: U64Array, block: U64Array) -> U64Array:
    k = _mix(_seed64(seed) + wid * _GOLDEN)
    k = _mix(k ^ (lun * _LUN_MUL + _U64(1)))
    return _mix(k + block * _GOLDEN)


def _bodies(keys: U64Array, words: int) -> U64Array:
    """Body words of each key, shape (len(keys), words): splitmix64 counters, vectorised."""
    ctr = (np.arange(1, words + 1, dtype=np.uint64) * _GOLDEN)[None, :]
    return _mix(keys[:, None] + ctr)


def check_size(size: int) -> int:
    """Body words of a ``size``-byte block; ValueError for a size no drill block can have."""
    if size < HEADER.size + 8 or size % 8:
        raise ValueError(f"block size {size} must be a multiple of 8 and at least "
                         f"{HEADER.size + 8} bytes")
    return (size - HEADER.size) // 8


def _crc(block: bytes | memoryview) -> int:
    mv = memoryview(block)
    return int(crc32c(mv[_CRC_AT + 4:], crc32c(mv[:_CRC_AT])))


def payloads(seed: int, write_id: int, lun: int, first_block: int, nblocks: int,
             size: int = BLOCK) -> bytes:
    """The bytes a host writes for write ``write_id``: ``nblocks`` self-describing blocks."""
    words = check_size(size)
    if (nblocks < 0 or first_block < 0 or not 0 <= write_id <= WRITE_ID_MAX
            or not 0 <= lun <= 0xFFFFFFFF):
        raise ValueError(f"write {write_id}, LUN {lun}, first block {first_block}, "
                         f"{nblocks} blocks: out of range (non-negative; LUN < 2**32)")
    blocks = np.arange(first_block, first_block + nblocks, dtype=np.uint64)
    ks = _keys(seed, np.full(nblocks, write_id, np.uint64), np.full(nblocks, lun, np.uint64),
               blocks)
    body = _bodies(ks, words).astype("<u8", copy=False)
    tag = seed_tag(seed)
    out = bytearray(nblocks * size)
    for i in range(nblocks):
        at = i * size
        out[at + HEADER.size:at + size] = body[i].tobytes()
        HEADER.pack_into(out, at, MAGIC, tag, lun, write_id, first_block + i, 0, size)
        struct.pack_into("<I", out, at + _CRC_AT, _crc(memoryview(out)[at:at + size]))
    return bytes(out)


def payload(seed: int, write_id: int, lun: int, block: int, size: int = BLOCK) -> bytes:
    """The one block write ``write_id`` puts at ``block`` of ``lun`` (see :func:`payloads`)."""
    return payloads(seed, write_id, lun, block, 1, size)


@dataclass
class Scan:
    """Per-block attribution of an image: :data:`ZERO`, :data:`VALID` or :data:`BAD` in
    ``status``; for valid blocks the write id, LUN and block number their header names."""

    status: npt.NDArray[np.uint8]
    wid: U64Array
    lun: U64Array
    block: U64Array
    tail: int = 0
    """Bytes after the last whole block (an image whose size is not a whole number of blocks)."""
    why: npt.NDArray[np.uint8] | None = None
    """For BAD blocks, :data:`TORN`, :data:`FOREIGN` or :data:`GARBAGE`; a TORN block keeps the
    write id, LUN and block its header claims (debugging a torn write starts there)."""

    def __len__(self) -> int:
        return len(self.status)


def as_array(image: Image) -> npt.NDArray[np.uint8]:
    """An image's bytes as a flat uint8 array (a file is memory-mapped, not read)."""
    if isinstance(image, str | os.PathLike):
        p = Path(image)
        try:
            if p.stat().st_size == 0:
                return np.zeros(0, np.uint8)
            return np.memmap(p, dtype=np.uint8, mode="r")
        except OSError as e:
            raise ValueError(f"image {p}: cannot read it ({e.strerror or e}); pass the path "
                             f"of a LUN file the drill read back") from None
    if isinstance(image, np.ndarray):
        return np.ascontiguousarray(image).reshape(-1).view(np.uint8)
    try:
        return np.frombuffer(image, dtype=np.uint8)
    except TypeError:
        raise ValueError(f"an image must be bytes, a numpy array or a file path, not "
                         f"{type(image).__name__}") from None


CHUNK_BYTES = 4 << 20
"""Images are scanned and compared this many bytes at a time."""


def scan(seed: int, image: Image, size: int = BLOCK) -> Scan:
    """Attribute every block of ``image`` at once (numpy, in 4 MiB chunks)."""
    words = check_size(size)
    raw = as_array(image)
    n = len(raw) // size
    tail = len(raw) - n * size
    status = np.zeros(n, np.uint8)
    wid = np.zeros(n, np.uint64)
    lun = np.zeros(n, np.uint64)
    blk = np.zeros(n, np.uint64)
    why = np.zeros(n, np.uint8)
    tag = seed_tag(seed)
    step = max(1, CHUNK_BYTES // size)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        rows = np.asarray(raw[lo * size:hi * size]).reshape(hi - lo, size)
        nonzero = rows.any(axis=1)
        hdr = np.ascontiguousarray(rows[:, :HEADER.size]).view(_HDR_DTYPE).reshape(hi - lo)
        magic = nonzero & (hdr["magic"] == MAGIC)
        cand = magic & (hdr["tag"] == tag) & (hdr["size"] == size)
        good = np.zeros(hi - lo, bool)
        idx = np.flatnonzero(cand)
        if len(idx):
            h = hdr[idx]
            want = _bodies(_keys(seed, h["wid"].astype(np.uint64), h["lun"].astype(np.uint64),
                                 h["block"].astype(np.uint64)), words)
            have = np.ascontiguousarray(rows[idx, HEADER.size:]).view("<u8")
            ok = (have == want).all(axis=1)
            for j in np.flatnonzero(ok):
                r = rows[idx[j]]
                if _crc(r.tobytes()) != int(h["crc"][j]):
                    ok[j] = False
            good[idx] = ok
            wid[lo:hi][idx] = h["wid"]
            lun[lo:hi][idx] = h["lun"]
            blk[lo:hi][idx] = h["block"]
        status[lo:hi] = np.where(good, VALID, np.where(nonzero, BAD, ZERO))
        why[lo:hi] = np.where(good | ~nonzero, 0,
                              np.where(cand, TORN, np.where(magic, FOREIGN, GARBAGE)))
    return Scan(status, wid, lun, blk, tail, why)


def identify(seed: int, data: bytes | bytearray | memoryview
             ) -> tuple[int, int, int] | Literal["zero"] | None:
    """Who wrote this block: ``(write_id, lun, block)``, ``"zero"`` if never written, or
    ``None`` for a value no write of this seed produced (torn, corrupt, foreign)."""
    size = len(data)
    if size < HEADER.size + 8 or size % 8:
        return "zero" if size and not any(data) else None
    s = scan(seed, data, size)
    if s.status[0] == ZERO:
        return "zero"
    if s.status[0] == BAD:
        return None
    return int(s.wid[0]), int(s.lun[0]), int(s.block[0])

