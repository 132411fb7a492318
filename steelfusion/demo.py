"""``make demo``: the main job on the embedded default, end to end, with proof.

1. ``lab up``: Witness, primary Core, secondary Core, one Edge, on loopback;
2. a host writes random data through a real initiator (qemu-img, libiscsi)
   into the Edge's iSCSI LUN;
3. wait until the Edge holds nothing uncommitted;
4. read the LUN back through the initiator and hash the host's data, the
   primary's backend file and the secondary's replica: all three must match;
5. print a short report and take the lab down.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import click

from steelfusion.initiator import InitiatorError, qemu_read, qemu_write
from steelfusion.lab import Lab, LabError
from steelfusion.units import format_size


def _sha(path: Path, limit: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = limit
        while left:
            chunk = f.read(min(left, 8 << 20))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def run_demo(workdir: str | None, size: int, lun_size: int, keep: bool) -> int:
    """The demo; a refusal (bad option, a lab already running there) changes nothing and
    only a lab this demo started is taken down."""
    try:
        Lab.check_options(luns=1, lun_size=lun_size, edges=1)
    except LabError as e:
        raise click.ClickException(str(e)) from None
    if size > lun_size:
        raise click.ClickException(f"--size {format_size(size)} is larger than the LUN "
                                   f"({format_size(lun_size)})")
    if size <= 0:
        raise click.ClickException("--size must be more than 0 bytes")
    tmp = None
    if workdir is None:
        tmp = tempfile.mkdtemp(prefix="steelfusion-demo-")
        workdir = tmp
    wd = Path(workdir)
    lab = Lab(wd)
    click.echo(f"[1/5] lab up in {wd} (Witness, 2 Cores, 1 Edge; LUN {format_size(lun_size)})")
    t0 = time.monotonic()
    try:
        data = lab.up(luns=1, lun_size=lun_size, edges=1)
    except LabError as e:
        # refused, or failed and already stopped what it started: nothing of ours runs
        if tmp is not None and not any(Path(tmp).glob("*.log")):
            shutil.rmtree(tmp, ignore_errors=True)
        raise click.ClickException(str(e)) from None
    ok = False
    try:
        click.echo(f"      ready in {time.monotonic() - t0:.1f}s")
        target = data["edges"][0]["targets"][0]
        url = target["url"]
        lun_id = str(target["lun_id"])
        primary = next(c for c in data["cores"] if c["role"] == "primary")
        secondary = next(c for c in data["cores"] if c["role"] == "secondary")

        src = wd / "host-data.img"
        click.echo(f"[2/5] host writes {format_size(size)} of random data via qemu-img -> {url}")
        with open(src, "wb") as f:
            left = size
            while left:
                n = min(left, 4 << 20)
                f.write(os.urandom(n))
                left -= n
        wr = qemu_write(src, url)
        click.echo(f"      {format_size(wr.nbytes)} in {wr.seconds:.2f}s = {wr.mb_s:.1f} MB/s "
                   "(acknowledged by the Edge)")

        click.echo("[3/5] waiting until the Edge holds nothing uncommitted")
        lag = lab.wait_committed(timeout=300)
        click.echo(f"      committed on both Cores {lag:.2f}s after the host finished")

        click.echo("[4/5] reading back through the initiator and hashing every copy")
        back = wd / "read-back.img"
        rd = qemu_read(url, back)
        want = _sha(src, size)
        copies = {
            "host data (source)": want,
            "read back via iSCSI": _sha(back, size),
            f"primary {primary['name']} LUN file": _sha(Path(primary["luns"][lun_id]), size),
            f"secondary {secondary['name']} replica": _sha(Path(secondary["luns"][lun_id]), size),
        }
        st = lab.status()
        click.echo("[5/5] report")
        click.echo(f"      written     {format_size(size)} through qemu-img (libiscsi) at "
                   f"{wr.mb_s:.1f} MB/s; read back at {rd.mb_s:.1f} MB/s")
        click.echo(f"      commit lag  {lag:.2f}s until 0 bytes uncommitted on the Edge")
        for c in st["cores"]:
            click.echo(f"      {c['name']:<10} role={c['role']:<9} replication={c['replication']}")
        for name, digest in copies.items():
            mark = "OK " if digest == want else "BAD"
            click.echo(f"      {mark} {name:<34} sha256 {digest[:16]}…")
        ok = all(d == want for d in copies.values())
        click.echo("      RESULT: " + ("PASS — host data, primary LUN and replica are identical"
                                       if ok else "FAIL — copies differ"))
        back.unlink(missing_ok=True)
        src.unlink(missing_ok=True)
    except (LabError, InitiatorError) as e:
        click.echo(f"demo failed: {e} (logs: {wd}/*.log)", err=True)
        ok = False
    finally:
        if not keep:
            try:
                lab.down()
            except LabError:
                pass
            if tmp is not None and ok:
                shutil.rmtree(tmp, ignore_errors=True)
        else:
            click.echo(f"lab left running in {wd}; stop it with: steelfusion lab down "
                       f"--workdir {wd}")
    return 0 if ok else 1
