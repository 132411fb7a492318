"""What `steelfusion drill` checks before it starts: can this machine run it, and is its folder
its own (issue 10, item 3; ``--ha``: issue 16). steelfusion/drill.py re-exports both."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from steelfusion.drillplan import DrillError
from steelfusion.lab import Lab, LabError, node_alive

HA_TOOLS = {"tgtd": "tgt", "tgtadm": "tgt", "qemu-io": "qemu-utils", "qemu-img": "qemu-utils"}
"""What ``drill --ha`` runs besides our own processes: the arrays (tgt) and the hosts'
initiator (qemu-utils)."""


def refusal(euid: int | None = None, ha: bool = False) -> str | None:
    """Why this process cannot run a drill (one line), or None when it can. The netns drill
    needs root and network namespaces; the HA drill (loopback) only its tools."""
    if ha:
        for tool, pkg in HA_TOOLS.items():
            if shutil.which(tool) is None:
                return (f"steelfusion drill --ha needs {tool}: install the Debian package "
                        f"{pkg} (`make install` does it)")
        return None
    uid = os.geteuid() if euid is None else euid
    if uid != 0:
        return ("steelfusion drill needs root: it puts the sites in network namespaces joined "
                "by an emulated WAN (lab up --netns); run it as root (or run the loopback "
                "Core HA drill: --ha)")
    from steelfusion import netns

    why = netns.available()
    if why is not None:
        return (f"steelfusion drill needs network namespaces and /dev/net/tun: {why}; run it "
                f"as root on a host (or container) that has them")
    for tool in ("qemu-io", "qemu-img"):
        if shutil.which(tool) is None:
            return (f"steelfusion drill needs {tool} (the hosts' initiator): install the "
                    f"Debian package qemu-utils (`make install` does it)")
    return None


def prepare_workdir(workdir: Path) -> None:
    """The drill's own folder: absent, empty, or an earlier drill's (emptied now). A running
    lab, or anything else in it, is refused and left alone."""
    if workdir.exists() and not workdir.is_dir():
        raise DrillError(f"--workdir {workdir} is not a directory (give a folder for the drill)")
    lab = Lab(workdir)
    if lab.file.exists():
        try:
            data = lab.load()
        except LabError as e:
            raise DrillError(str(e)) from None
        alive = [n["name"] for n in lab.processes(data) if node_alive(n)]
        if alive:
            raise DrillError(f"a lab is already running in {workdir} ({', '.join(alive)}); "
                             f"run `steelfusion lab down --workdir {workdir}` first, or give "
                             f"the drill another --workdir")
    if workdir.is_dir() and any(workdir.iterdir()):
        if not (workdir / "drill.json").exists():
            raise DrillError(f"--workdir {workdir} is not empty and is not an earlier drill's "
                             f"folder (no drill.json); give an empty or new folder")
        if lab.file.exists():  # a stopped drill lab: its namespaces go with it
            with contextlib.suppress(LabError):
                lab.down()
        for p in workdir.iterdir():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DrillError(f"cannot create --workdir {workdir}: {e.strerror or e}") from None


__all__ = ["HA_TOOLS", "prepare_workdir", "refusal"]
