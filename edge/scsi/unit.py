"""The logical unit as its command handlers see it, so imports run one way.

:mod:`edge.scsi.lu` (the LU: state and dispatch) imports the command table
(:mod:`edge.scsi.commands`), whose rows hold the handlers of
:mod:`~edge.scsi.pages`, :mod:`~edge.scsi.sbc`, :mod:`~edge.scsi.reservations`,
:mod:`~edge.scsi.sanitize` and :mod:`~edge.scsi.xcopy`.  The handlers need the
LU's shape, not its class: this module, below all of them, holds that shape
(:class:`Unit`, which :class:`edge.scsi.lu.LogicalUnit` satisfies) and the
plain types the two sides share: the I_T nexus, the Block Limits, the
command table's rows.  LIO does the same with the ``se_device`` / ``se_cmd``
structs of ``target_core_base.h`` that ``target_core_{spc,sbc,pr,xcopy}.c``
take; tgt with ``struct scsi_lu`` in ``tgtd.h``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Self

from edge.aio import RangeLock
from edge.backends import BlockBackend, LbaStatusBackend, ThinBackend
from edge.scsi.pr import Access, PersistentReservations
from edge.scsi.sense import Buffer, ScsiResult


@dataclass(frozen=True, slots=True)
class ItNexus:
    """Who sent a command: initiator port and target port (SAM-5 §4.6.2).

    ``session_id`` tells two sessions of the same initiator port apart (the
    old and the new one during reinstatement); unit attentions, SPC-2
    reservations and copy results belong to it.  ``pr_id`` is the stable
    identity persistent reservations are registered under.
    """

    initiator_name: str = "local"
    isid: int = 0
    target_name: str = ""
    tpgt: int = 1
    session_id: int = 0

    @property
    def initiator_port(self) -> str:
        """RFC 7143 §4.2.7.2: iSCSI initiator port name."""
        return f"{self.initiator_name},i,0x{self.isid:012x}"

    @property
    def target_port(self) -> str:
        return f"{self.target_name},t,0x{self.tpgt:04x}"

    @property
    def pr_id(self) -> str:
        return f"{self.initiator_port}|{self.target_port}"


@dataclass(frozen=True, slots=True)
class Limits:
    """What the Block Limits VPD page (SBC-3 §6.5.3, SBC-4 §6.6.4) promises;
    every value is in logical blocks and is enforced by the commands."""

    max_transfer: int
    optimal_transfer: int
    max_compare_and_write: int = 255
    max_unmap: int = 0
    max_unmap_descriptors: int = 0
    max_write_same: int = 0
    max_prefetch: int = 0
    max_atomic: int = 0
    optimal_granularity: int = 1


class Unit(Protocol):
    """What the command handlers use of a logical unit
    (:class:`edge.scsi.lu.LogicalUnit`).  Properties are read; the plain
    attributes are the shared state a handler changes."""

    # -- geometry and what the LU offers
    @property
    def backend(self) -> BlockBackend: ...
    @property
    def thin_io(self) -> ThinBackend | None: ...
    @property
    def lba_io(self) -> LbaStatusBackend | None: ...
    @property
    def block_size(self) -> int: ...
    @property
    def blocks(self) -> int: ...
    @property
    def max_transfer_blocks(self) -> int: ...
    @property
    def max_atomic_blocks(self) -> int: ...
    @property
    def physical_exponent(self) -> int: ...
    @property
    def limits(self) -> Limits: ...
    @property
    def thin(self) -> bool: ...
    @property
    def read_only(self) -> bool: ...
    @property
    def cancel_safe(self) -> bool: ...
    @property
    def inquiry(self) -> bytes: ...
    @property
    def vpd(self) -> dict[int, bytes]: ...
    @property
    def commands(self) -> Table: ...

    # -- mode pages (setting them refreshes write_cache and software_write_protect)
    pages: dict[int, bytes]

    @property
    def write_cache(self) -> bool: ...
    @property
    def software_write_protect(self) -> bool: ...

    # -- range locks, reservations
    @property
    def locks(self) -> RangeLock: ...

    spc2_holder: int | None
    pr: PersistentReservations

    @property
    def pr_lock(self) -> asyncio.Lock: ...
    @property
    def pr_path(self) -> Path | None: ...
    @property
    def on_abort(self) -> Callable[[Self, set[str]], None] | None: ...

    def conflicts(self, nexus: ItNexus, access: Access) -> bool: ...

    # -- unit attentions and copy results of each I_T nexus
    def establish_ua(self, asc: int, ascq: int, *, pr_ids: Iterable[str] | None = None,
                     except_session: int | None = None) -> None: ...

    def next_ua(self, nexus: ItNexus) -> tuple[int, int] | None: ...

    def copy_results(self, nexus: ItNexus) -> dict[int, bytes] | None: ...

    @property
    def copy_resolver(self) -> Callable[[bytes], Unit | None] | None: ...

    # -- sanitize
    sanitize_task: asyncio.Task[None] | None
    sanitize_progress: int
    sanitize_failed: bool

    @property
    def sanitizing(self) -> bool: ...


Handler = Callable[[Unit, bytes, Buffer, ItNexus], Awaitable[ScsiResult]]
"""``handler(lu, cdb, data_out, nexus)``: runs one command; raises
:class:`~edge.scsi.sense.ScsiError` or
:class:`~edge.scsi.sense.ReservationConflict` for its failures."""


@dataclass(frozen=True, slots=True)
class Command:
    """One operation code (and service action) the LU serves: a row of the
    command table (:data:`edge.scsi.commands.COMMANDS`).

    ``usage`` is the CDB USAGE DATA of REPORT SUPPORTED OPERATION CODES (SPC-4
    §6.35.3): byte 0 the opcode, then a mask of the bits we evaluate.
    ``access`` drives persistent-reservation conflicts; ``spc2_ok`` lets the
    command through an SPC-2 reservation held by another nexus (SPC-2
    §5.5.1); ``ua_exempt`` commands neither report nor clear a unit attention
    (SAM-5 §5.14)."""

    opcode: int
    sa: int | None
    usage: bytes
    handler: Handler
    access: Access = Access.WRITE
    spc2_ok: bool = False
    ua_exempt: bool = False


Table = dict[int, Command | dict[int, Command]]
"""Opcode -> its command, or service action -> command for opcodes with
service actions."""
