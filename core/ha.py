"""Core HA decisions, sans-IO: who leads, when to take the partner's LUNs over, when to give
them back (issue 16; seed 002, "FusionSync and Core HA").

Two Cores of one data center (X and Y) are an active-active pair: each serves its own LUNs
to its own Edges and replicates them to its own peer (X to X', Y to Y'). One is configured
the *leader*, the other the *follower*; the acting leader is the configured leader while it
is up, else the follower. They heartbeat each other over the HA link. This object is fed
what the heartbeats and the Core's own storage say, and answers with :class:`Action` s the
adapter (:mod:`core.hahost`) carries out:

* ``TAKEOVER`` when the partner has been unreachable for ``grace`` seconds past the link's
  own ``dead_after`` (the follower waits ``2 * grace``, so in a split where both still reach
  the array the leader fences first and the follower, fenced, stands by), or when the
  partner is reachable but reports its storage unreachable for ``grace`` while ours works.
  The adapter fences the partner on the shared LUNs first (SCSI-3 persistent reservations,
  :mod:`steelfusion.fence`) and only then serves its LUNs.
* ``STANDBY`` when this Core finds itself fenced or the partner says it took our LUNs over:
  stop serving them at once (the Edges resend what was not acknowledged to whoever serves
  them now).
* ``HANDBACK`` when we serve the partner's LUNs and the partner is back, in standby, and its
  storage works, for ``settle`` seconds: the LUNs go back by themselves. Automatic rather
  than by command because nothing is lost by it (the Edges resend their uncommitted writes
  on the move), the seed's HA Cores are active-active by design (each Core serves its own
  LUNs), and an operator who forgets the command leaves one Core carrying both loads.
* ``START_OWN`` when a starting Core finds its partner does not hold its LUNs (or no
  partner answers within ``start_wait``).

A standby Core whose partner then disappears does *not* take everything back by itself:
its LUNs were taken because it failed or was cut off, and the partner may only be cut off
from it now. ``coredr ha takeover`` is the operator's word that the partner is down for good.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Mode(StrEnum):
    STARTING = "starting"  # waiting to hear whether the partner holds our LUNs
    ACTIVE = "active"  # serving our own LUNs (and maybe the partner's)
    STANDBY = "standby"  # our LUNs are served by the partner (or nobody: fenced)


class Action(StrEnum):
    START_OWN = "start-own"
    TAKEOVER = "takeover"
    STANDBY = "standby"
    HANDBACK = "handback"


@dataclass(frozen=True, slots=True)
class PartnerView:
    """What the partner's last heartbeat said (``ha`` control messages on the HA link)."""

    name: str
    mode: Mode
    hosting: bool  # it serves our LUNs
    storage_ok: bool
    role: str
    datacenter: str | None
    ha: str  # leader / follower (configured)

    @classmethod
    def of(cls, body: dict[str, Any]) -> PartnerView:
        """From a heartbeat body; ValueError names what is wrong with it."""
        try:
            return cls(str(body["name"]), Mode(body["mode"]), bool(body["hosting"]),
                       bool(body["storage_ok"]), str(body["role"]),
                       body.get("datacenter"), str(body["ha"]))
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"malformed HA heartbeat {body!r}: {e!r}") from None


@dataclass
class HaState:
    """One Core's view of its HA pair; every method takes ``now`` (monotonic seconds)."""

    name: str
    partner: str
    leader: bool  # configured leader
    grace: float
    start_wait: float
    now: float
    mode: Mode = Mode.STARTING
    hosting: bool = False  # we serve the partner's LUNs
    storage_ok: bool = True
    seen: PartnerView | None = None
    seen_at: float | None = None  # last heartbeat
    down_since: float | None = None  # partner unreachable since
    trouble_since: float | None = None  # partner reports its storage down since
    back_since: float | None = None  # partner back in standby with working storage since
    settle: float = 3.0
    takeovers: int = 0
    handbacks: int = 0
    why: str = ""  # the reason for the last change, for status and events
    started: float = field(init=False)

    def __post_init__(self) -> None:
        self.started = self.now
        self.down_since = self.now

    # -- inputs -------------------------------------------------------------------------
    def heartbeat(self, view: PartnerView, now: float) -> None:
        if view.name != self.partner:
            raise ValueError(f"HA heartbeat from {view.name!r}, but this Core's partner is "
                             f"{self.partner!r}")
        self.seen, self.seen_at, self.down_since = view, now, None
        if view.storage_ok or view.mode is not Mode.ACTIVE:
            self.trouble_since = None
        elif self.trouble_since is None:
            self.trouble_since = now
        if view.mode is Mode.STANDBY and view.storage_ok and not view.hosting:
            self.back_since = self.back_since if self.back_since is not None else now
        else:
            self.back_since = None

    def partner_lost(self, now: float) -> None:
        if self.down_since is None:
            self.down_since = now
        self.seen = None
        self.trouble_since = self.back_since = None

    def fenced(self, why: str) -> list[Action]:
        """Our storage refused us (RESERVATION CONFLICT) or the partner took our LUNs."""
        if self.mode is Mode.STANDBY:
            return []
        self.mode, self.why = Mode.STANDBY, why
        self.hosting = False
        return [Action.STANDBY]

    def handed_back(self) -> list[Action]:
        """The partner gave our LUNs back: serve them again."""
        if self.mode is not Mode.STANDBY:
            return []
        self.mode, self.why = Mode.ACTIVE, f"{self.partner} handed this Core's LUNs back"
        if self.seen is not None:  # its last heartbeat, sent before it let them go, is stale
            self.seen = dataclasses.replace(self.seen, hosting=False)
        return [Action.START_OWN]

    def forced_takeover(self) -> list[Action]:
        """``coredr ha takeover``: the operator says the partner is down for good."""
        acts = []
        if self.mode is not Mode.ACTIVE:
            self.mode = Mode.ACTIVE
            acts.append(Action.START_OWN)
        if not self.hosting:
            self.hosting = True
            self.takeovers += 1
            acts.append(Action.TAKEOVER)
        self.why = f"the operator took {self.partner}'s LUNs over"
        return acts

    def took_over(self) -> None:
        """The adapter's takeover failed (or waits to be tried again): we do not serve them."""
        if self.hosting:
            self.hosting, self.takeovers = False, self.takeovers - 1

    # -- decisions ----------------------------------------------------------------------
    @property
    def partner_up(self) -> bool:
        return self.seen is not None

    def wait(self) -> float:
        """The unreachable time before a takeover: the leader's grace, twice for the follower."""
        return self.grace if self.leader else 2 * self.grace

    def decide(self, now: float) -> list[Action]:
        self.now = now
        s = self.seen
        if self.mode is Mode.STARTING:
            if s is not None:
                if s.hosting:
                    self.mode, self.why = Mode.STANDBY, f"{self.partner} serves this Core's LUNs"
                    return []
                self.mode, self.why = Mode.ACTIVE, "started beside its partner"
                return [Action.START_OWN]
            if now - self.started >= self.start_wait:
                self.mode, self.why = Mode.ACTIVE, f"{self.partner} did not answer at start"
                return [Action.START_OWN]
            return []
        if self.mode is not Mode.ACTIVE:
            return []
        if s is not None and s.hosting:  # we were cut off and the partner took our LUNs
            return self.fenced(f"{self.partner} serves this Core's LUNs")
        if self.hosting:
            if s is not None and self.back_since is not None and now - self.back_since >= self.settle:
                self.hosting, self.back_since = False, None
                self.handbacks += 1
                self.why = f"{self.partner} is back: its LUNs go back to it"
                return [Action.HANDBACK]
            return []
        if not self.storage_ok:
            return []
        if s is None and self.down_since is not None and now - self.down_since >= self.wait():
            self.hosting, self.takeovers = True, self.takeovers + 1
            self.why = f"{self.partner} unreachable for {now - self.down_since:.1f} s"
            return [Action.TAKEOVER]
        if s is not None and self.trouble_since is not None \
                and now - self.trouble_since >= self.wait():
            self.hosting, self.takeovers = True, self.takeovers + 1
            self.why = f"{self.partner} cannot reach its storage"
            return [Action.TAKEOVER]
        return []

    def acting_leader(self) -> str:
        """Who accepts suspend, resume, failover and terminate for the pair now."""
        if self.mode is Mode.STANDBY:
            return self.partner
        if self.leader or self.seen is None or self.seen.mode is not Mode.ACTIVE:
            return self.name
        return self.partner

    def view(self) -> dict[str, Any]:
        return {"mode": self.mode.value, "configured": "leader" if self.leader else "follower",
                "leader": self.acting_leader(), "partner": self.partner,
                "partner_up": self.partner_up,
                "partner_mode": self.seen.mode.value if self.seen is not None else None,
                "hosting_partner": self.hosting, "storage_ok": self.storage_ok,
                "takeovers": self.takeovers, "handbacks": self.handbacks, "why": self.why}
