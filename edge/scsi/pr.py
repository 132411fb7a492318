"""SCSI-3 persistent reservations (SPC-4 §5.13, §6.15, §6.16), sans-IO.

One :class:`PersistentReservations` per logical unit holds the registrations
(I_T nexus → reservation key), the reservation (holder, type, scope) and the
PRgeneration.  It is shared by every session and path to the LU, so two
initiators (or two sessions of one initiator, multipath) see the same state.

It never touches a disk: :meth:`PersistentReservations.out` returns a
:class:`PrOutcome` saying what changed, which unit attentions to establish
and which nexuses' tasks to abort (PREEMPT AND ABORT); the logical unit then
persists :meth:`~PersistentReservations.to_bytes` with an atomic replace
before it answers GOOD, so registrations survive restarts
(:func:`load_state`, :func:`dump_state`).

I_T nexus identifiers are ``"<initiator port>|<target port>"`` with the iSCSI
port names of RFC 7143 §4.2.7.2 / SPC-4 §7.6.4.6
(``iqn...,i,0x<ISID>`` and ``iqn...,t,0x<TPGT>``), so a session that logs in
again with the same ISID finds its registration again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import IntEnum

import crc32c as _crc32c_mod

from steelfusion.iscsi.commands import PrOut, PrType

_crc32c = _crc32c_mod.crc32c

STATE_FORMAT = "steelfusion-pr"
STATE_VERSION = 1


VALID_TYPES = frozenset(int(t) for t in PrType)
ALL_REGISTRANTS = frozenset({PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS,
                             PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS})
REGISTRANTS_ONLY = frozenset({PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY,
                              PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY})
_EXCLUSIVE_ACCESS = frozenset({PrType.EXCLUSIVE_ACCESS, PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY,
                               PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS})

TYPE_MASK = 0x8000 | 0x4000 | 0x2000 | 0x0800 | 0x0200 | 0x0001
"""PERSISTENT RESERVATION TYPE MASK of REPORT CAPABILITIES (SPC-4 §6.15.4): all six."""


Sa = PrOut
"""PERSISTENT RESERVE OUT service actions: the initiator's table (one for both sides)."""


class Access(IntEnum):
    """How a command touches the medium, for conflict checks (SPC-4 Table 65,
    SBC-3 Table 13)."""

    ALLOWED = 0  # never conflicts (INQUIRY, REPORT LUNS, TEST UNIT READY, ...)
    READ = 1  # reads the medium or device state: conflicts under Exclusive Access
    WRITE = 2  # modifies the medium: conflicts under both Write and Exclusive Access


# Unit attentions (SPC-4 Table 28): (ASC, ASCQ).
UA_RESERVATIONS_PREEMPTED = (0x2A, 0x03)
UA_RESERVATIONS_RELEASED = (0x2A, 0x04)
UA_REGISTRATIONS_PREEMPTED = (0x2A, 0x05)


class PrError(Exception):
    """A PROUT/PRIN request that must fail.  ``conflict`` means status
    RESERVATION CONFLICT; otherwise CHECK CONDITION with ILLEGAL REQUEST and
    ``asc``/``ascq`` (and ``field_pointer`` into the CDB when ``in_cdb``)."""

    def __init__(self, message: str, *, conflict: bool = False, asc: int = 0x24,
                 ascq: int = 0, field_pointer: int | None = None, in_cdb: bool = True) -> None:
        super().__init__(message)
        self.conflict = conflict
        self.asc = asc
        self.ascq = ascq
        self.field_pointer = field_pointer
        self.in_cdb = in_cdb


def _conflict(message: str) -> PrError:
    return PrError(message, conflict=True)


@dataclass(slots=True)
class PrOutcome:
    """What one PERSISTENT RESERVE OUT did: ``changed`` means the state must be
    persisted before status; ``unit_attentions`` lists (nexus id, ASC, ASCQ);
    ``abort`` the nexuses whose tasks PREEMPT AND ABORT aborts."""

    changed: bool = False
    unit_attentions: list[tuple[str, int, int]] = field(default_factory=list)
    abort: set[str] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class ProutParams:
    """A decoded PERSISTENT RESERVE OUT basic parameter list (SPC-4 §6.16.3)."""

    key: int
    sa_key: int
    spec_i_pt: bool = False
    all_tg_pt: bool = False
    aptpl: bool = False

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> ProutParams:
        """24 bytes; anything else is PARAMETER LIST LENGTH ERROR (5/1A/00)."""
        if len(data) != 24:
            raise PrError(f"parameter list length {len(data)}, want 24", asc=0x1A, ascq=0x00)
        b = bytes(data)
        return cls(key=int.from_bytes(b[0:8], "big"), sa_key=int.from_bytes(b[8:16], "big"),
                   spec_i_pt=bool(b[20] & 0x08), all_tg_pt=bool(b[20] & 0x04),
                   aptpl=bool(b[20] & 0x01))


def iscsi_transport_id(initiator_port: str) -> bytes:
    """iSCSI TransportID, format 01b (SPC-4 §7.6.4.6): ``name,i,0x<ISID>``,
    NUL-terminated and padded to a multiple of 4 (at least 20 bytes)."""
    name = initiator_port.encode("utf-8", "replace") + b"\0"
    name += b"\0" * ((-len(name)) & 3)
    if len(name) < 20:
        name += b"\0" * (20 - len(name))
    return bytes((0x45, 0)) + len(name).to_bytes(2, "big") + name


class PersistentReservations:
    """Registrations and the persistent reservation of one logical unit."""

    def __init__(self) -> None:
        self.generation = 0
        self.registrations: dict[str, int] = {}  # nexus id -> key, in registration order
        self.holder: str | None = None  # nexus id; unused for all-registrants types
        self.type = 0  # 0: no reservation
        self.scope = 0
        self.aptpl = False

    # ------------------------------------------------------------------ queries

    @property
    def reserved(self) -> bool:
        return self.type != 0

    def is_holder(self, nexus: str) -> bool:
        """SPC-4 §5.13.10: for all-registrants types every registrant holds it."""
        if not self.type:
            return False
        if self.type in ALL_REGISTRANTS:
            return nexus in self.registrations
        return self.holder == nexus

    def allowed(self, nexus: str, access: Access) -> bool:
        """False when the command must end in RESERVATION CONFLICT (SPC-4
        Table 65 / SBC-3 Table 13, by reservation type)."""
        t = self.type
        if not t or access is Access.ALLOWED or self.is_holder(nexus):
            return True
        registered = nexus in self.registrations
        if t in REGISTRANTS_ONLY and registered:
            return True
        if access is Access.WRITE:
            return False
        return t not in _EXCLUSIVE_ACCESS

    # ------------------------------------------------------------------ PERSISTENT RESERVE IN

    def read_keys(self) -> bytes:
        """READ KEYS (SPC-4 §6.15.2)."""
        keys = b"".join(k.to_bytes(8, "big") for k in self.registrations.values())
        return self.generation.to_bytes(4, "big") + len(keys).to_bytes(4, "big") + keys

    def read_reservation(self) -> bytes:
        """READ RESERVATION (SPC-4 §6.15.3); the key is 0 for all-registrants."""
        head = self.generation.to_bytes(4, "big")
        if not self.type:
            return head + bytes(4)
        key = 0 if self.type in ALL_REGISTRANTS else self.registrations.get(self.holder or "", 0)
        body = key.to_bytes(8, "big") + bytes(4) + bytes((0, (self.scope << 4) | self.type)) \
            + bytes(2)
        return head + len(body).to_bytes(4, "big") + body

    def report_capabilities(self) -> bytes:
        """REPORT CAPABILITIES (SPC-4 §6.15.4): CRH, PTPL_C, TMV with every
        type; SPEC_I_PT and ALL_TG_PT are not offered."""
        b2 = 0x10 | 0x01  # CRH, PTPL_C
        b3 = 0x80 | (0x01 if self.aptpl else 0)  # TMV, PTPL_A
        return bytes((0, 8, b2, b3)) + TYPE_MASK.to_bytes(2, "big") + bytes(2)

    def read_full_status(self, relative_port: int = 1) -> bytes:
        """READ FULL STATUS (SPC-4 §6.15.5): one descriptor per registration."""
        out = bytearray()
        for nexus, key in self.registrations.items():
            initiator_port = nexus.split("|", 1)[0]
            tid = iscsi_transport_id(initiator_port)
            holder = self.is_holder(nexus)
            d = bytearray(24)
            d[0:8] = key.to_bytes(8, "big")
            d[12] = 0x01 if holder else 0
            d[13] = ((self.scope << 4) | self.type) if holder else 0
            d[18:20] = relative_port.to_bytes(2, "big")
            d[20:24] = len(tid).to_bytes(4, "big")
            out += d + tid
        return self.generation.to_bytes(4, "big") + len(out).to_bytes(4, "big") + bytes(out)

    # ------------------------------------------------------------------ PERSISTENT RESERVE OUT

    def out(self, sa: int, nexus: str, params: ProutParams, *, scope: int = 0,
            pr_type: int = 0) -> PrOutcome:
        """Apply one PERSISTENT RESERVE OUT (SPC-4 §5.13.5-§5.13.11, §6.16).
        Raises :class:`PrError`; on success the caller persists if
        ``outcome.changed`` and establishes the unit attentions."""
        if params.spec_i_pt:
            raise PrError("SPEC_I_PT not supported", asc=0x26, in_cdb=False, field_pointer=20)
        if params.all_tg_pt:
            raise PrError("ALL_TG_PT not supported", asc=0x26, in_cdb=False, field_pointer=20)
        if sa in (Sa.REGISTER, Sa.REGISTER_AND_IGNORE):
            return self._register(nexus, params, ignore=sa == Sa.REGISTER_AND_IGNORE)
        if sa == Sa.REGISTER_AND_MOVE:
            raise PrError("REGISTER AND MOVE not supported", field_pointer=1)
        if sa not in (Sa.RESERVE, Sa.RELEASE, Sa.CLEAR, Sa.PREEMPT, Sa.PREEMPT_AND_ABORT):
            raise PrError(f"service action {sa}", field_pointer=1)
        mine = self.registrations.get(nexus)
        if mine is None:
            raise _conflict("I_T nexus not registered")
        if params.key != mine:
            raise _conflict("RESERVATION KEY does not match the registration")
        if sa == Sa.CLEAR:
            return self._clear(nexus)
        if sa == Sa.RESERVE:
            self._check_type(scope, pr_type)
            return self._reserve(nexus, pr_type)
        if sa == Sa.RELEASE:
            return self._release(nexus, pr_type, scope)
        if self._preempts_reservation(params):
            self._check_type(scope, pr_type)
        return self._preempt(nexus, params, pr_type, scope, abort=sa == Sa.PREEMPT_AND_ABORT)

    @staticmethod
    def _check_type(scope: int, pr_type: int) -> None:
        if scope != 0:
            raise PrError(f"scope {scope}: only LU_SCOPE", field_pointer=2)
        if pr_type not in VALID_TYPES:
            raise PrError(f"reservation type {pr_type}", field_pointer=2)

    def _register(self, nexus: str, p: ProutParams, *, ignore: bool) -> PrOutcome:
        mine = self.registrations.get(nexus)
        out = PrOutcome()
        if mine is None:
            if not ignore and p.key != 0:
                raise _conflict("unregistered I_T nexus with nonzero RESERVATION KEY")
            if p.sa_key == 0:
                return out  # nothing to register (SPC-4 §5.13.7.2)
            self.registrations[nexus] = p.sa_key
        else:
            if not ignore and p.key != mine:
                raise _conflict("RESERVATION KEY does not match the registration")
            if p.sa_key == 0:
                self._unregister(nexus, out)
            else:
                self.registrations[nexus] = p.sa_key
        self.aptpl = p.aptpl
        self.generation = (self.generation + 1) & 0xFFFFFFFF
        out.changed = True
        return out

    def _unregister(self, nexus: str, out: PrOutcome) -> None:
        """Remove a registration; a reservation it held goes too (§5.13.11.2.3)."""
        del self.registrations[nexus]
        if not self.type:
            return
        if self.type in ALL_REGISTRANTS:
            if not self.registrations:
                self._drop_reservation()
            return
        if self.holder == nexus:
            released_type = self.type
            self._drop_reservation()
            if released_type in REGISTRANTS_ONLY:
                out.unit_attentions += [(n, *UA_RESERVATIONS_RELEASED)
                                        for n in self.registrations]

    def _drop_reservation(self) -> None:
        self.holder = None
        self.type = 0
        self.scope = 0

    def _reserve(self, nexus: str, pr_type: int) -> PrOutcome:
        if self.type:
            if self.is_holder(nexus) and self.type == pr_type:
                return PrOutcome()  # same reservation again: GOOD, no change
            raise _conflict("reserved by another I_T nexus or with another type")
        self.type = pr_type
        self.scope = 0
        self.holder = None if pr_type in ALL_REGISTRANTS else nexus
        return PrOutcome(changed=True)

    def _release(self, nexus: str, pr_type: int, scope: int) -> PrOutcome:
        if not self.type or not self.is_holder(nexus):
            return PrOutcome()  # §5.13.11.2.2: nothing to release, GOOD
        if pr_type != self.type or scope != self.scope:
            raise PrError("RELEASE type/scope differ from the reservation", asc=0x26, ascq=0x04,
                          field_pointer=2)
        released = self.type
        self._drop_reservation()
        out = PrOutcome(changed=True)
        if released in REGISTRANTS_ONLY or released in ALL_REGISTRANTS:
            out.unit_attentions += [(n, *UA_RESERVATIONS_RELEASED)
                                    for n in self.registrations if n != nexus]
        return out

    def _clear(self, nexus: str) -> PrOutcome:
        out = PrOutcome(changed=True)
        out.unit_attentions += [(n, *UA_RESERVATIONS_PREEMPTED)
                                for n in self.registrations if n != nexus]
        self.registrations.clear()
        self._drop_reservation()
        self.generation = (self.generation + 1) & 0xFFFFFFFF
        return out

    def _preempts_reservation(self, p: ProutParams) -> bool:
        if not self.type:
            return False
        if self.type in ALL_REGISTRANTS:
            return p.sa_key == 0
        return self.registrations.get(self.holder or "") == p.sa_key

    def _preempt(self, nexus: str, p: ProutParams, pr_type: int, scope: int, *,
                 abort: bool) -> PrOutcome:
        """PREEMPT / PREEMPT AND ABORT (SPC-4 §5.13.11.4)."""
        out = PrOutcome(changed=True)
        if self._preempts_reservation(p):
            if self.type in ALL_REGISTRANTS:
                victims = [n for n in self.registrations if n != nexus]
            else:
                victims = [n for n, k in self.registrations.items()
                           if k == p.sa_key and n != nexus]
            for n in victims:
                del self.registrations[n]
            self.type = pr_type
            self.scope = scope
            self.holder = None if pr_type in ALL_REGISTRANTS else nexus
        else:
            if p.sa_key == 0:
                raise PrError("SERVICE ACTION RESERVATION KEY is zero", asc=0x26,
                              in_cdb=False, field_pointer=8)
            victims = [n for n, k in self.registrations.items() if k == p.sa_key and n != nexus]
            if not victims and p.sa_key not in self.registrations.values():
                raise _conflict("no registration with that key")
            for n in victims:
                del self.registrations[n]
        out.unit_attentions += [(n, *UA_REGISTRATIONS_PREEMPTED) for n in victims]
        if abort:
            out.abort = set(victims)
        self.generation = (self.generation + 1) & 0xFFFFFFFF
        return out

    # ------------------------------------------------------------------ persistence

    def to_dict(self) -> dict[str, object]:
        return {"generation": self.generation, "aptpl": self.aptpl,
                "registrations": [{"nexus": n, "key": f"0x{k:016x}"}
                                  for n, k in self.registrations.items()],
                "reservation": ({"holder": self.holder, "type": self.type, "scope": self.scope}
                                if self.type else None)}

    def to_bytes(self) -> bytes:
        return dump_state(self.to_dict())

    @classmethod
    def from_bytes(cls, data: bytes) -> PersistentReservations:
        body = load_state(data)
        pr = cls()
        pr.generation = int(body["generation"]) & 0xFFFFFFFF  # type: ignore[call-overload]
        pr.aptpl = bool(body.get("aptpl", False))
        regs = body.get("registrations") or []
        assert isinstance(regs, list)
        for r in regs:
            pr.registrations[str(r["nexus"])] = int(str(r["key"]), 16)
        res = body.get("reservation")
        if res:
            assert isinstance(res, dict)
            t = int(res["type"])
            if t not in VALID_TYPES:
                raise ValueError(f"bad reservation type {t}")
            pr.type, pr.scope = t, int(res.get("scope", 0))
            pr.holder = None if t in ALL_REGISTRANTS else str(res["holder"])
        return pr


def dump_state(body: dict[str, object]) -> bytes:
    """Versioned JSON with a magic and a CRC32C over the canonical body."""
    canon = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    doc = {"format": STATE_FORMAT, "version": STATE_VERSION, "crc32c": _crc32c(canon),
           "state": body}
    return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


def load_state(data: bytes) -> dict[str, object]:
    """Inverse of :func:`dump_state`; raises ValueError on a bad magic,
    version or checksum."""
    doc = json.loads(data)
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
        raise ValueError("not a persistent-reservation state file")
    if doc.get("version") != STATE_VERSION:
        raise ValueError(f"unsupported version {doc.get('version')!r}")
    body = doc.get("state")
    if not isinstance(body, dict):
        raise ValueError("missing state")
    canon = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    if _crc32c(canon) != doc.get("crc32c"):
        raise ValueError("checksum mismatch")
    return body
