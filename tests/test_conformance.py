"""libiscsi's conformance suite against a lab Edge, as part of ``make test``.

Runs ``iscsi-test-cu -t ALL --dataloss URL URL`` (the URL twice, so the
MultipathIO suite gets a second session) against a lab Edge exporting a
128 MiB LUN, then counts clean passes, skips and failures with
``steelfusion.iscsi.conformance`` (CUnit counts a skip as a pass).  Fails on
any failed test, or when clean passes drop below the floor kept in
``tests/conformance-floor.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from steelfusion.iscsi import conformance
from steelfusion.lab import Lab
from tests.conftest import tool

pytestmark = [pytest.mark.lab, pytest.mark.initiator, pytest.mark.timeout(300)]

FLOOR_FILE = Path(__file__).with_name("conformance-floor.json")
MiB = 1 << 20


def test_iscsi_test_cu_against_a_lab_edge(tmp_path: Path) -> None:
    tool("iscsi-test-cu")
    floor = json.loads(FLOOR_FILE.read_text())
    lab = Lab(tmp_path / "lab")
    t0 = time.monotonic()
    try:
        data = lab.up(luns=1, lun_size=128 * MiB, edges=1)
        url = data["edges"][0]["targets"][0]["url"]
        tally, transcript = conformance.run([url, url], tests="ALL", dataloss=True,
                                            timeout=240, cwd=str(tmp_path))
    finally:
        if lab.file.exists():
            lab.down()
    (tmp_path / "iscsi-test-cu.txt").write_text(transcript)
    summary = f"{tally.summary()} in {time.monotonic() - t0:.0f} s"
    print(summary)
    assert tally.total >= 200, f"transcript did not parse ({summary}):\n{transcript[-3000:]}"
    failed = {o.name: o.messages[:3] for o in tally.outcomes if o.result == "failed"}
    assert tally.failed <= floor["failed_max"], f"{summary}; failed: {failed}"
    assert tally.clean >= floor["clean_min"], (
        f"{summary}: below the floor of {floor['clean_min']} clean passes; "
        f"skipped: {tally.names('skipped')}")
