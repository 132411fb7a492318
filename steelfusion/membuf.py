"""Buffers for bytes about to arrive: allocated without zero-filling.

``bytearray(n)`` zero-fills; for a 512 KiB frame that memset was 6% of a
primary Core's CPU at 128 KiB host writes (perf, ``__memset_avx512``).  A
frame or PDU received into its own buffer overwrites every byte before
anyone reads it (the decoders check the fill before decoding), so the
zeroing is pure waste: ``numpy.empty`` allocates without touching memory.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def uninitialized(n: int) -> memoryview:
    """A writable ``n``-byte buffer (format ``B``) with undefined contents.

    Only for buffers that are filled completely before they are read.
    """
    # numpy's stubs do not declare ndarray as a Buffer (no ``__buffer__``), though
    # it implements the buffer protocol; Any here costs nothing at run time (no cast()).
    arr: Any = np.empty(n, dtype=np.uint8)
    return memoryview(arr)
