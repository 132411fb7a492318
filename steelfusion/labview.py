"""``steelfusion lab status`` as text: one line per node, the WAN's links, the arrays and
disks, and the coredr command for each Core. Pure functions of the status dict."""

from __future__ import annotations

from typing import Any

from steelfusion.labha import ha_words
from steelfusion.units import format_size


def status_lines(st: dict[str, Any]) -> list[str]:
    """The whole status, in the order an operator reads it."""
    return [*node_lines(st), *wan_lines(st), *storage_lines(st), *coredr_lines(st),
            *web_lines(st)]


def web_lines(st: dict[str, Any]) -> list[str]:
    """Each node's web console and Prometheus metrics address (issue 15)."""
    w = st.get("witness") or {}
    nodes = [*([w] if w and not w.get("embedded_in") else []), *st["cores"], *st["edges"]]
    rows = []
    for n in nodes:
        if not (n.get("metrics") or n.get("console")):
            continue
        console = f"console http://{n['console']}/" if n.get("console") else "console -"
        metrics = f"metrics http://{n['metrics']}/metrics" if n.get("metrics") else ""
        ns = f"  (inside {n['netns']})" if n.get("netns") else ""
        rows.append((n.get("name") or "witness", console, metrics, ns))
    if not rows:
        return []
    nw = max(len(r[0]) for r in rows)
    cw = max(len(r[1]) for r in rows)
    pw = st.get("console_password_file")
    head = "web console and metrics, per node" + (f" (password in {pw}):" if pw else ":")
    return [head, *(f"  {a:<{nw}}  {b:<{cw}}  {c}{d}".rstrip() for a, b, c, d in rows)]


def storage_lines(st: dict[str, Any]) -> list[str]:
    out = []
    for k in st.get("sans") or []:
        whose = " and ".join(k.get("cores") or [k["core"]])
        state = ("up" if k.get("accepting") else "up (portal not accepting)") if k["running"] \
            else f"DOWN (an outage of {whose}'s storage: `steelfusion lab start {k['name']}`)"
        out.append(f"{k['name']:<12} {state}  portal={k['portal']}  ({whose}'s array, "
                   f"{len(k.get('luns') or {})} LUNs)")
    for k in st.get("disks") or []:
        if not k.get("running"):
            state = "DOWN (the Journal LUN on it is unreachable: `steelfusion lab start " \
                    f"{k['name']}`)"
        elif k.get("error"):
            state = f"up error={k['error']}"
        else:
            failed = f", {k['failed_calls']} calls failed" if k.get("failed_calls") else ""
            state = f"up mode={k.get('mode')} for {k.get('seconds')} s{failed}"
        out.append(f"{k['name']:<12} {state}  ({k['core']}'s Journal LUN, {k['mount']})")
    return out


def coredr_lines(st: dict[str, Any]) -> list[str]:
    """The exact coredr command line for each Core (a netns lab's with --netns)."""
    cmds = [c["coredr"] for c in st["cores"] if c.get("coredr")]
    if not cmds:
        return []
    width = max(len(c) for c in cmds)
    return ["coredr, per Core:", *(f"  {cmd:<{width}}  # {c['name']}" for c, cmd in
                                   zip(st["cores"], cmds, strict=True))]


def wan_lines(st: dict[str, Any]) -> list[str]:
    """A netns lab's WAN: the emulator, each link's settings (one line per site pair when
    both directions agree), ports that are down."""
    from steelfusion.lab import format_duration, format_rate

    if not st.get("netns"):
        return []
    wan = st.get("wan") or {}
    name_w = max(len(n["name"]) for n in [*st["cores"], *st["edges"], {"name": "witness"}])
    head = (f"{'wan':<{name_w}} {'up' if wan.get('running') else 'DOWN':<4} "
            f"control={wan.get('control')} pid {wan.get('pid')}")
    if not wan.get("running"):
        return [head + " (links are gone while it is down: `steelfusion lab start wan`)"]
    if wan.get("error"):
        return [f"{head} error={wan['error']}"]
    out = [head]

    def settings(ln: dict[str, Any]) -> str:
        if ln.get("cut"):
            return "CUT"
        parts = [f"delay={format_duration(ln.get('delay') or 0)}"]
        if ln.get("jitter"):
            parts.append(f"jitter={format_duration(ln['jitter'])}")
        parts.append(f"rate={format_rate(ln.get('rate') or 0)}")
        parts.append(f"loss={(ln.get('loss') or 0) * 100:g}%")
        return " ".join(parts)

    def traffic(ln: dict[str, Any]) -> str:
        dropped = sum((ln.get("dropped") or {}).values())
        return (f"{ln.get('forwarded', 0)} pkts {format_size(ln.get('bytes', 0))}"
                + (f", dropped {dropped}" if dropped else ""))

    links = {(ln["src"], ln["dst"]): ln for ln in wan.get("links") or []
             if isinstance(ln, dict) and "src" in ln and "dst" in ln}
    rows = []
    done: set[tuple[str, str]] = set()
    for (a, b), ln in links.items():
        if (a, b) in done:
            continue
        back = links.get((b, a))
        done |= {(a, b), (b, a)}
        if back is not None and settings(back) == settings(ln):
            rows.append([f"  link {a} <-> {b}", settings(ln),
                         f"({traffic(ln)} / {traffic(back)})"])
        else:
            rows.append([f"  link {a} -> {b}", settings(ln), f"({traffic(ln)})"])
            if back is not None:
                rows.append([f"  link {b} -> {a}", settings(back), f"({traffic(back)})"])
    if rows:
        widths = [max(len(r[i]) for r in rows) for i in range(2)]
        out += [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}" for r in rows]
    for name, p in (wan.get("ports") or {}).items():
        if isinstance(p, dict) and not p.get("up", True):
            out.append(f"  port {name} ({p.get('address')}) DOWN")
    return out


def alarm_names(node: dict[str, Any]) -> str:
    names = [a.get("alarm", "?") for a in node.get("alarms") or [] if isinstance(a, dict)]
    return ", ".join(names) or "-"


def node_lines(st: dict[str, Any]) -> list[str]:
    """One line per node; each column as wide as its longest value (``disconnected``)."""
    def word(running: Any) -> str:
        return "up" if running else "DOWN"

    rows: list[list[str]] = []
    w = st["witness"]
    if w:
        where = (f"inside {w['embedded_in']} (kill/start {w['embedded_in']} to stop/start it)"
                 if w.get("embedded_in") else f"pid {w.get('pid')}")
        rows.append(["witness", word(w.get("running")), f"listen={w.get('address')}",
                     f"control={w.get('control')}", f"alarms={alarm_names(w)}", where])
    cores = []
    for c in st["cores"]:
        epoch = c["epoch"] if c["epoch"] is not None else "-"
        cores.append([c["name"], word(c["running"]), f"role={c['role']}",
                      f"replication={c['replication']}", f"epoch={epoch}",
                      f"control={c.get('control')}", f"alarms={alarm_names(c)}"])
        if st.get("ha"):  # Core HA (lab up --ha): role, partner, LUNs served
            cores[-1].insert(3, ha_words(c) or "ha=-")
    edges = []
    for e in st["edges"]:
        ub = e.get("uncommitted_bytes")
        edges.append([e["name"], word(e["running"]), f"core={e.get('core') or '-'}",
                      f"uncommitted={format_size(ub) if ub is not None else '?'}",
                      f"control={e.get('control')}", f"portal={e['portal']}",
                      f"alarms={alarm_names(e)}"])
    if st.get("netns"):  # where each node runs: its site's namespace
        for row, node in ((rows[0], w) if rows else (None, None),
                          *zip(cores, st["cores"], strict=True),
                          *zip(edges, st["edges"], strict=True)):
            if row is not None and node is not None:
                row.insert(2, f"netns={node.get('netns') or '-'}")
    name_w = max(len(r[0]) for r in [*rows, *cores, *edges, ["witness"]])
    out = []
    for group in (rows, cores, edges):
        widths = [max(len(r[i]) for r in group) for i in range(len(group[0]))] if group else []
        for r in group:
            cells = [r[0].ljust(name_w), *(v.ljust(widths[i]) for i, v in enumerate(r) if i)]
            cells[1] = r[1].ljust(4)
            out.append(" ".join(cells).rstrip())
    return out
