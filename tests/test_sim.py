"""The seeded simulation of the write path (steelfusion/sim.py, issue 9): it passes, it is
deterministic, and it finds each planted bug (a checker that cannot fail proves nothing)."""

from __future__ import annotations

import pytest

from steelfusion.sim import Sim, SimFailure, run_seed

SEEDS = 2000


@pytest.mark.timeout(300)
def test_two_thousand_seeds_of_mixed_faults_pass() -> None:
    failures = []
    for seed in range(SEEDS):
        try:
            run_seed(seed)
        except SimFailure as e:
            failures.append(str(e))
            if len(failures) >= 3:
                break
    assert not failures, "\n\n".join(failures)


def test_a_seed_replays_exactly() -> None:
    a, b = Sim(1234), Sim(1234)
    ra, rb = a.run(), b.run()
    assert a.log == b.log and ra == rb
    assert bytes(a.primary.disk.durable) == bytes(b.primary.disk.durable)


def test_receiver_losing_frames_is_caught_by_the_gap_check() -> None:
    """The issue-9 fault (a receiver dropping mirror WRITEs) with today's rules: every gap is
    refused and resent, nothing acknowledged is lost."""
    gaps = 0
    for seed in range(200):
        gaps += run_seed(seed, "lost-frames").gaps
    assert gaps > 50  # the fault really happened, often


def _first_failure(plant: str, limit: int = 200) -> tuple[int, str]:
    for seed in range(limit):
        try:
            run_seed(seed, plant)
        except SimFailure as e:
            return seed, str(e)
    raise AssertionError(f"{limit} seeds with {plant} planted and no invariant broke")


@pytest.mark.parametrize("plant, says", [
    ("lost-frames,skip-gap", "core-b"),  # issue 9: a gap taken for a resend
    ("ack-before-fsync", "durable applied seq"),
    ("seal-late", "durable applied seq"),
])
def test_planted_bugs_are_found(plant: str, says: str) -> None:
    seed, msg = _first_failure(plant)
    assert says in msg and f"steelfusion sim --seed {seed} --plant {plant}" in msg


def test_unknown_plant_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown planted bug"):
        Sim(1, plant="typo")
