"""State files (issue 13): magic, checked format, CRC; a damaged one refuses the start.

``core-state.json`` holds a Core's role and epoch: if a flipped byte loaded
as a default, a demoted Core could come back primary (split brain). The
Edge's ``state.json`` holds its stream, leases and committed seqs. Every
damage (a flipped byte anywhere, any truncation, another kind, a newer
format) must be a one-line refusal naming the file, what is wrong and what
to do; a file of the previous layout (no magic) is migrated once.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from steelfusion import statefile
from steelfusion.statefile import StateFileError

BODY: dict[str, Any] = {"role": "primary", "state": "running", "epoch": 12345,
                        "name": "core-a", "synced": True}


def _check(body: dict[str, Any]) -> None:
    if not isinstance(body.get("epoch"), int):
        raise ValueError("epoch is not a number")


def _load(path: Path, **kw: Any) -> dict[str, Any] | None:
    return statefile.load(path, "test-state", 1, remedy="restore it from a backup",
                          check=_check, **kw)


def test_round_trip_and_envelope(tmp_path: Path) -> None:
    p = tmp_path / "s.json"
    assert _load(p) is None  # absent: the caller decides (a first start)
    statefile.save(p, "test-state", 1, BODY)
    env = json.loads(p.read_text())
    assert env["magic"] == "steelfusion-test-state" and env["format"] == 1
    assert isinstance(env["crc32c"], int) and env["state"] == BODY
    assert _load(p) == BODY


def test_every_flipped_byte_is_refused_or_harmless(tmp_path: Path) -> None:
    """Flip each byte in turn: the loader refuses, or the body is exactly what was saved."""
    p = tmp_path / "s.json"
    statefile.save(p, "test-state", 1, BODY)
    good = p.read_bytes()
    refused = 0
    for i in range(len(good)):
        for mask in (0x01, 0x10):
            bad = bytearray(good)
            bad[i] ^= mask
            p.write_bytes(bytes(bad))
            try:
                body = _load(p)
            except StateFileError as e:
                refused += 1
                msg = str(e)
                assert "\n" not in msg and msg.startswith(f"{p}: ")
                assert msg.endswith("restore it from a backup")
                continue
            assert body == BODY, (i, mask, bytes(bad))
    assert refused >= len(good)  # nearly every flip; whitespace flips may stay valid JSON


def test_every_truncation_is_refused_or_harmless(tmp_path: Path) -> None:
    p = tmp_path / "s.json"
    statefile.save(p, "test-state", 1, BODY)
    good = p.read_bytes()
    for n in range(len(good)):
        p.write_bytes(good[:n])
        try:
            assert _load(p) == BODY, n  # only the final newline may go
            assert n == len(good) - 1
        except StateFileError as e:
            assert "truncated" in str(e) or "empty" in str(e), (n, str(e))


def test_random_damage_fuzz(tmp_path: Path) -> None:
    """Random truncations plus garbage tails and random byte runs: never a wrong body."""
    rng = random.Random(13)
    p = tmp_path / "s.json"
    for _ in range(300):
        body = {"epoch": rng.randrange(1 << 40), "role": rng.choice(["primary", "secondary"]),
                "lease": {str(rng.randrange(9)): rng.randrange(1 << 30) for _ in range(3)}}
        statefile.save(p, "test-state", 1, body)
        good = p.read_bytes()
        cut = rng.randrange(len(good))
        bad = bytearray(good[:cut] + (rng.randbytes(rng.randrange(4)) if rng.random() < 0.5
                                      else b""))
        if rng.random() < 0.5 and bad:
            at = rng.randrange(len(bad))
            bad[at:at + 3] = rng.randbytes(3)
        p.write_bytes(bytes(bad))
        try:
            assert _load(p) == body
        except StateFileError:
            pass


@pytest.mark.parametrize(("doc", "words"), [
    ({"magic": "steelfusion-other", "format": 1, "crc32c": 0, "state": {}}, "not a test-state"),
    ({"magic": "steelfusion-test-state", "format": 9, "crc32c": 0, "state": {}}, "newer"),
    ({"magic": "steelfusion-test-state", "format": "1", "crc32c": 0, "state": {}}, "format"),
    ({"magic": "steelfusion-test-state", "format": 1, "crc32c": 0, "state": 5}, "'state'"),
    ({"magie": "steelfusion-test-state", "format": 1, "crc32c": 0, "state": {}}, "no magic"),
    ([1, 2], "not a JSON object"),
])
def test_wrong_kind_newer_format_and_damaged_envelope(tmp_path: Path, doc: Any,
                                                      words: str) -> None:
    p = tmp_path / "s.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(StateFileError, match=words):
        _load(p, legacy=dict)


def test_empty_and_binary_files(tmp_path: Path) -> None:
    p = tmp_path / "s.json"
    for data, words in ((b"", "empty"), (b"\n\n", "empty"), (b"\xff\xfe\x00", "not text"),
                        (b"\x00" * 64, "JSON")):
        p.write_bytes(data)
        with pytest.raises(StateFileError, match=words):
            _load(p)


def test_check_runs_after_the_crc(tmp_path: Path) -> None:
    p = tmp_path / "s.json"
    statefile.save(p, "test-state", 1, {**BODY, "epoch": "twelve"})
    with pytest.raises(StateFileError, match="epoch is not a number"):
        _load(p)


def test_previous_layout_is_migrated_once(tmp_path: Path) -> None:
    p = tmp_path / "s.json"
    p.write_text(json.dumps(BODY))
    with pytest.raises(StateFileError, match="no magic"):
        _load(p)  # no legacy reader: refused, not guessed
    assert _load(p, legacy=dict) == BODY
    assert json.loads(p.read_text())["magic"] == "steelfusion-test-state"  # rewritten
    assert _load(p) == BODY  # now without the legacy reader too


def test_witness_state_is_the_same_envelope(tmp_path: Path) -> None:
    """witness-state.json had magic/format/CRC first; the shared module reads it as is,
    and its loader refuses every flipped byte or truncation that changes the state."""
    from witness.logic import DurableState, Member, PairRecord, WitnessStateError
    from witness.node import load_state

    st = DurableState().with_pair(PairRecord("pair-1", epoch=3, holder="core-b", holder_epoch=3,
                                             members={"core-a": Member("secondary", 2),
                                                      "core-b": Member("primary", 3)}))
    data = st.to_json()
    assert statefile.decode(data, "witness-state", 1) == json.loads(data)["state"]
    assert statefile.encode("witness-state", 1, json.loads(data)["state"]) == data
    p = tmp_path / "witness-state.json"
    for i in range(len(data)):
        for bad in (data[:i], data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]):
            p.write_bytes(bad)
            try:
                assert load_state(p) == st, i
            except WitnessStateError:
                pass


def _change_epoch(p: Path, old: int, new: int) -> None:
    """Edit the epoch in a state file by hand: still valid JSON, but not what was sealed."""
    text = p.read_text()
    assert f'"epoch": {old}' in text
    p.write_text(text.replace(f'"epoch": {old}', f'"epoch": {new}'))


def _assert_names_the_damaged_file(msg: str, p: Path) -> None:
    """One line naming the file, what is wrong with it and what to do."""
    assert str(p) in msg and "checksum" in msg and "restore it" in msg and "\n" not in msg


# ------------------------------------------------------------------------------- the Core

def _core_cfg(tmp: Path, name: str = "core-a", role: str = "primary") -> Any:
    from steelfusion.config import CoreConfig, LunConfig
    from steelfusion.lab import free_ports

    p1, p2 = free_ports(2)
    return CoreConfig(name=name, role=role, listen=("127.0.0.1", p1),
                      control=("127.0.0.1", p2), state_dir=str(tmp / "state"),
                      luns=(LunConfig(1, str(tmp / "lun-1.img"), 1 << 20),),
                      log_file=str(tmp / f"{name}.log"))


def _core(cfg: Any) -> Any:
    """Construct a Core (reads core-state.json, writes it back) and close it again."""
    from core.node import Core

    core = Core(cfg)
    out = (core.role, core.epoch)
    asyncio.run(core.stop())
    return out


def test_core_state_flipped_epoch_digit_refuses_the_start(tmp_path: Path) -> None:
    from core.lunstore import LunError

    cfg = _core_cfg(tmp_path)
    assert _core(cfg) == ("primary", 1)
    p = Path(cfg.state_dir) / "core-state.json"
    _change_epoch(p, 1, 7)
    with pytest.raises(LunError) as info:
        _core(cfg)
    _assert_names_the_damaged_file(str(info.value), p)


def test_core_state_of_the_previous_layout_is_migrated(tmp_path: Path) -> None:
    """An upgraded appliance keeps its role and epoch (here: demoted, epoch 5)."""
    cfg = _core_cfg(tmp_path)
    p = Path(cfg.state_dir) / "core-state.json"
    p.parent.mkdir(parents=True)
    p.write_text(json.dumps({"role": "secondary", "state": "running", "epoch": 5,
                             "name": "core-a", "synced": True}))
    assert _core(cfg) == ("secondary", 5)  # the config says primary: the file wins
    env = json.loads(p.read_text())
    assert env["magic"] == "steelfusion-core-state" and env["state"]["epoch"] == 5
    assert _core(cfg) == ("secondary", 5)


def test_core_state_missing_after_a_run_refuses_a_primary(tmp_path: Path) -> None:
    from core.lunstore import LunError

    cfg = _core_cfg(tmp_path)
    _core(cfg)
    p = Path(cfg.state_dir) / "core-state.json"
    p.unlink()
    with pytest.raises(LunError, match=r"missing, but applied\.state"):
        _core(cfg)
    sec = _core_cfg(tmp_path, role="secondary")  # the documented way back: secondary
    assert _core(sec) == ("secondary", 1)


def test_core_state_of_another_core_is_refused(tmp_path: Path) -> None:
    from core.lunstore import LunError

    _core(_core_cfg(tmp_path, name="core-b"))
    with pytest.raises(LunError, match="belongs to Core 'core-b'"):
        _core(_core_cfg(tmp_path, name="core-a"))


@pytest.mark.lab
def test_core_run_with_a_corrupt_state_file_exits_with_one_line(tmp_path: Path) -> None:
    """The real command: `steelfusion core run` exits != 0, one line, no traceback."""
    from steelfusion.config import write_toml

    cfg = _core_cfg(tmp_path)
    path = tmp_path / "core-a.toml"
    write_toml(path, cfg.to_dict())
    state = Path(cfg.state_dir) / "core-state.json"
    state.parent.mkdir(parents=True)
    good = statefile.encode("core-state", 1, {"role": "secondary", "state": "running",
                                              "epoch": 4, "name": "core-a", "synced": True})
    state.write_bytes(good.replace(b'"epoch": 4', b'"epoch": 1'))
    proc = subprocess.run([sys.executable, "-m", "steelfusion.cli", "core", "run", "--config",
                           str(path), "--quiet"], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr
    last = lines[-1]
    assert str(state) in last and "checksum mismatch" in last and "restore it" in last, lines
    assert sum(str(state) in ln and "Error" in ln for ln in lines) == 1, lines


# ------------------------------------------------------------------------------- the Edge

def _bs(tmp: Path) -> Any:
    from edge.blockstore import Blockstore

    return Blockstore(tmp / "bs", {1: 1 << 20}, 8 << 20)


def test_blockstore_state_flipped_digit_refuses(tmp_path: Path) -> None:
    from edge.blockstore import BlockstoreError

    bs = _bs(tmp_path)
    bs.see_epoch(3)
    bs.close()
    p = tmp_path / "bs" / "state.json"
    _change_epoch(p, 3, 2)  # a stale primary would pass
    with pytest.raises(BlockstoreError) as info:
        _bs(tmp_path)
    _assert_names_the_damaged_file(str(info.value), p)


def test_blockstore_state_of_format_1_is_migrated(tmp_path: Path) -> None:
    bs = _bs(tmp_path)
    bs.append(1, 0, b"x" * 4096)
    bs.drain()
    stream, nxt = bs.stream, bs.next_seq[1]
    bs.close()
    p = tmp_path / "bs" / "state.json"
    body = json.loads(p.read_text())["state"]
    p.write_text(json.dumps({"version": 1, **body, "epoch": 6}))  # what the old code wrote
    bs = _bs(tmp_path)
    assert bs.stream == stream and bs.epoch == 6 and bs.next_seq[1] >= nxt
    env = json.loads(p.read_text())
    assert env["magic"] == "steelfusion-blockstore-state" and env["format"] == 2
    bs.close()


@pytest.mark.parametrize(("doc", "words"), [
    ({"version": 2, "stream": 5}, "version 2 without a magic"),
    ({"version": 1, "stream": "5"}, "stream '5'"),
    ({"magic": "steelfusion-blockstore-state", "format": 3, "crc32c": 0, "state": {}},
     "newer"),
])
def test_blockstore_state_refusals(tmp_path: Path, doc: dict[str, Any], words: str) -> None:
    from edge.blockstore import BlockstoreError

    p = tmp_path / "bs" / "state.json"
    p.parent.mkdir(parents=True)
    p.write_text(json.dumps(doc))
    with pytest.raises(BlockstoreError, match=words):
        _bs(tmp_path)
