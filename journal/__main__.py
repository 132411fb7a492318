"""``python -m journal inspect PATH [--json]``: the operator's read-only view of a Journal LUN.

Prints the superblock, the LUN slots with their dirty / activity-log region
counts, and the log's use; ``coredr journal status`` shows the same fields
(:func:`journal.describe` here, :meth:`journal.Journal.usage` on a running Core).
Exit status 0, or 2 with the alarm key and the operator's message on error.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from journal import JournalError, describe
from steelfusion.units import format_size


def render(d: dict[str, Any]) -> str:
    """Human table of :func:`journal.describe`'s result."""
    if d.get("version") != 2:
        return "\n".join([f"Journal LUN {d['path']}: version {d.get('version')}",
                          *[f"  note: {n}" for n in d.get("notes", [])]])
    log = d["log"]
    lines = [
        f"Journal LUN {d['path']}",
        f"  format      version {d['version']}, journal id {d['journal_id']}, "
        f"generation {d['generation']}",
        f"  created     {d['created']}   last checkpoint {d['last_checkpoint']}",
        f"  size        {format_size(d['size'])} (recorded {format_size(d['recorded_size'])}; "
        f"{len(d['luns'])} slot(s) need {format_size(d['required_size'])}, room for "
        f"{d['slot_capacity']})",
        f"  regions     {format_size(d['region_bytes'])} by default",
        f"  log         {format_size(log['used_bytes'])} of {format_size(log['bytes'])} used "
        f"({log['blocks']} block(s), {log['records']} record(s))"
        + (f", torn tail of {log['torn_tail_bytes']} bytes ignored" if log["torn_tail_bytes"]
           else ""),
        f"  shutdown    {'clean' if d['clean_shutdown'] else 'UNCLEAN (AL regions will be resynced)'}"
        f"; superblock copies valid: {d['superblock_copies_valid']}/2",
    ]
    if d["luns"]:
        lines.append(f"  {'LUN':>6} {'slot':>4} {'size':>10} {'region':>9} {'dirty':>9} "
                     f"{'AL':>6} {'to resync':>10}")
        for u in d["luns"]:
            lines.append(f"  {u['lun']:>6} {u['slot']:>4} {format_size(u['lun_bytes']):>10} "
                         f"{format_size(u['region_bytes']):>9} {u['dirty_regions']:>9} "
                         f"{u['al_regions']:>6} {format_size(u['resync_bytes']):>10}")
    else:
        lines.append("  no LUN slots yet")
    lines += [f"  note: {n}" for n in d["notes"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m journal", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ins = sub.add_parser("inspect", help="show superblock, LUN slots, dirty counts, log use")
    ins.add_argument("path")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    args = ap.parse_args(argv)
    try:
        d = describe(args.path)
    except JournalError as e:
        if args.json:
            print(json.dumps({"error": e.alarm, "message": str(e)}))
        else:
            print(f"{e.alarm}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(d, indent=2) if args.json else render(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
