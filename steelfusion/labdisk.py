"""``lab up --journal-faults``: each Core's Journal LUN on a disk that fails on command.

The disk is ``steelfusion disk run`` (:mod:`steelfusion.faultdisk`, a FUSE file system), one
per Core, lab node ``jdisk-core-a`` mounted where that Core's Journal LUN lives;
``Lab.journal_fault`` (and ``steelfusion lab journal``) sets its mode. The lab's arrays
(``--san``) are the same kind of neighbour: :mod:`steelfusion.labsan`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from steelfusion import faultdisk
from steelfusion.atomic import atomic_write
from steelfusion.config import CoreConfig
from steelfusion.labproc import spawn, wait_mounted


def start_disks(d: Path, cores: Sequence[CoreConfig], data: dict[str, Any], timeout: float,
                started: list[tuple[str, int]], save: Callable[[dict[str, Any]], None]) -> None:
    """One failing disk per Core, mounted where its Journal LUN lives; each is in
    ``data["disks"]`` (saved) before the next starts, so a failed start can stop it."""
    data["disks"] = []
    for c in cores:
        assert c.journal_path is not None
        mount = Path(c.journal_path).parent
        name = f"jdisk-{c.name}"
        cfg = faultdisk.DiskConfig(name=name, backing=str(mount.parent / "jdisk.data"),
                                   mount=str(mount), log_file=str(d / f"{name}.log"))
        path = d / f"{name}.json"
        atomic_write(path, json.dumps({k: v for k, v in dataclasses.asdict(cfg).items()
                                       if k != "source"}, indent=2).encode(), mode=0o644)
        pid = spawn("disk", path, d, name)
        started.append((name, pid))
        node = {"name": name, "pid": pid, "role": "disk", "core": c.name,
                "config": str(path), "mount": cfg.mount, "backing": cfg.backing,
                "log": cfg.log_file, "netns": None}
        data["disks"].append(node)
        save(data)
        wait_mounted(node, timeout, d)


def unmount_disks(cores: Sequence[CoreConfig]) -> None:
    """After a failed start: no mount of ours stays behind (a killed disk leaves one)."""
    for c in cores:
        if c.journal_path and Path(c.journal_path).parent.name == "jdisk":
            with contextlib.suppress(OSError):
                faultdisk.unmount(Path(c.journal_path).parent)
