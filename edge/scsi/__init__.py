"""SCSI block-device emulation (SPC-4, SBC-3) over a :class:`~edge.backends.BlockBackend`,
split along the seams LIO and tgt use:

- :mod:`~edge.scsi.sense`: status codes, sense keys, the sense builder,
  :class:`ScsiError` (each error carries its wire answer)
- :mod:`~edge.scsi.cdb`: operation codes, CDB fields, range checks, LUN encoding
- :mod:`~edge.scsi.pages`: INQUIRY / VPD, READ CAPACITY, REPORT LUNS, MODE
  SENSE/SELECT, REQUEST SENSE
- :mod:`~edge.scsi.unit`: what the handlers see of a LU (:class:`~edge.scsi.unit.Unit`,
  which :class:`LogicalUnit` satisfies), :class:`ItNexus`, the table's row type;
  below the LU and every handler module, so imports run one way
- :mod:`~edge.scsi.commands`: the command table (rows hold the handlers and
  their reservation and unit-attention flags), REPORT SUPPORTED OPERATION CODES
- :mod:`~edge.scsi.lu`: :class:`LogicalUnit`: shared state, dispatch, unit
  attentions, the reservation checks, ``try_fast``
- :mod:`~edge.scsi.sbc`: read / write / verify / compare / write same / unmap /
  GET LBA STATUS / SYNCHRONIZE CACHE
- :mod:`~edge.scsi.sanitize`, :mod:`~edge.scsi.xcopy`
- :mod:`~edge.scsi.pr` (persistent reservation rules, sans-IO) and
  :mod:`~edge.scsi.reservations` (the reservation commands)

A host write goes ``edge.target`` -> :meth:`LogicalUnit.execute` (or
:meth:`LogicalUnit.try_fast`) -> :func:`edge.scsi.sbc.write` -> the backend
(``edge.node.EdgeLun``).  The names below are what a transport needs.
"""

from edge.scsi.lu import (
    LOCAL_NEXUS,
    UA_QUEUE_MAX,
    LogicalUnit,
    describe,
    execute,
)
from edge.scsi.sense import (
    BUSY,
    CHECK_CONDITION,
    CONDITION_MET,
    GOOD,
    RESERVATION_CONFLICT,
    TASK_ABORTED,
    TASK_SET_FULL,
    UA_BUS_DEVICE_RESET,
    UA_BUS_RESET,
    UA_POWER_ON_RESET,
    ScsiError,
    ScsiResult,
    SenseKey,
    check_condition,
    fixed_sense,
)
from edge.scsi.unit import ItNexus

__all__ = [
    "BUSY",
    "CHECK_CONDITION",
    "CONDITION_MET",
    "GOOD",
    "LOCAL_NEXUS",
    "RESERVATION_CONFLICT",
    "TASK_ABORTED",
    "TASK_SET_FULL",
    "UA_BUS_DEVICE_RESET",
    "UA_BUS_RESET",
    "UA_POWER_ON_RESET",
    "UA_QUEUE_MAX",
    "ItNexus",
    "LogicalUnit",
    "ScsiError",
    "ScsiResult",
    "SenseKey",
    "check_condition",
    "describe",
    "execute",
    "fixed_sense",
]
