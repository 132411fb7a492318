"""Reports of a `steelfusion drill` (issue 10, item 3): terminal summary, JSON, HTML page.

The HTML page is one self-contained file (inline CSS and SVG, no script, no CDN) so it can be
mailed or archived with the drill's logs and still open in ten years. Hover texts are SVG
``<title>`` elements, which every browser shows without JavaScript. Every string that comes
from the history or the findings is escaped: node names, details and messages are data.
"""

from __future__ import annotations

import html
import itertools
import json
import math
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from typing import Any

from steelfusion.drillcheck import (
    FAULT_KINDS,
    HA_KINDS,
    OPERATOR_KINDS,
    Finding,
    HaStep,
    History,
    Result,
    Rto,
)
from steelfusion.drillplan import FAULT_KINDS as PLANNED_KINDS
from steelfusion.drillplan import HA_FAULT_KINDS

# --- terminal --------------------------------------------------------------------------------


def _secs(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} s"


def rto_summary(rtos: Iterable[Rto]) -> dict[str, float | int | None]:
    """Median and max RTO from the failure, and from the command, over recovered failovers."""
    rs = list(rtos)
    ff = [r.from_failure for r in rs if r.from_failure is not None]
    fc = [r.from_command for r in rs if r.from_command is not None]
    return {"failovers": len(rs),
            "median_from_failure": statistics.median(ff) if ff else None,
            "max_from_failure": max(ff) if ff else None,
            "median_from_command": statistics.median(fc) if fc else None,
            "max_from_command": max(fc) if fc else None}


def ha_summary(steps: Iterable[HaStep]) -> dict[str, dict[str, float | int | None]]:
    """Per kind (takeover, handback): how many, and the median and max seconds from the
    cause."""
    out: dict[str, dict[str, float | int | None]] = {}
    ss = list(steps)
    for kind in HA_KINDS:
        xs = [s.seconds for s in ss if s.kind == kind and s.seconds is not None]
        out[kind] = {"count": sum(1 for s in ss if s.kind == kind),
                     "median": statistics.median(xs) if xs else None,
                     "max": max(xs) if xs else None}
    return out


def _ha_words(steps: Iterable[HaStep]) -> str:
    """``takeover median 1.2 s max 2.1 s (3), handback median 3.9 s max 4.2 s (3)``."""
    parts = []
    for kind, v in ha_summary(steps).items():
        med, mx = v["median"], v["max"]
        timed = (f"median {med:.1f} s max {mx:.1f} s " if med is not None and mx is not None
                 else "")
        parts.append(f"{kind} {timed}({v['count']})")
    return ", ".join(parts)


def render_text(result: Result, max_per_kind: int = 5) -> str:
    """A short readable summary; the first line says PASS or FAIL."""
    r = result
    c = r.counts
    s = rto_summary(r.rto)
    nfind = sum(r.finding_counts.values())
    head = (f"{'PASS' if r.passed else 'FAIL'}: RPO {r.rpo} (acknowledged writes lost), "
            f"faults and operator actions {sum(r.faults.values())}, failovers {len(r.rto)}")
    if r.rto:
        head += (f", RTO median {_secs(s['median_from_failure'])} max "
                 f"{_secs(s['max_from_failure'])} from the failure")
    if r.ha:
        head += f", Core HA: {_ha_words(r.ha)}"
    if nfind:
        head += f", {nfind} findings"
    lines = [head,
             f"  writes: {c.get('writes', 0)} (ok {c.get('writes_ok', 0)}, failed "
             f"{c.get('writes_failed', 0)}, indeterminate {c.get('writes_indeterminate', 0)}, "
             f"committed {c.get('writes_committed', 0)}); {c.get('blocks_checked', 0)} blocks "
             f"checked in {c.get('copies', 0)} copies"]
    if r.per_copy:
        lines.append("  copies: " + "; ".join(
            f"{name} {pc.get('blocks_checked', 0)} blocks, {pc.get('lost_writes', 0)} lost"
            for name, pc in r.per_copy.items()))
    if r.faults:
        lines.append("  events: " + ", ".join(f"{k} {v}" for k, v in r.faults.items()))
    for rto in r.rto:
        cause = (f"{rto.cause_kind} at +{rto.cause_t - r.t0:.1f} s" if rto.cause_t is not None
                 else "no known cause")
        lines.append(f"  {rto.kind} at +{rto.command_t - r.t0:.1f} s to "
                     f"{rto.new_primary or '?'}: RTO {_secs(rto.from_failure)} from the failure "
                     f"({cause}), {_secs(rto.from_command)} from the command"
                     + (f" [{rto.basis}]" if rto.basis else ""))
    for st in r.ha:
        cause = (f"{_secs(st.seconds)} after {st.cause_kind} at +{st.cause_t - r.t0:.1f} s"
                 if st.cause_t is not None else "no known cause")
        lines.append(f"  {st.kind} at +{st.t - r.t0:.1f} s: {st.detail or st.node} ({cause})")
    for kind, fs in r.findings.items():
        total = r.finding_counts.get(kind, len(fs))
        lines.append(f"  {kind}: {total}")
        lines += [f"    {f.message}" for f in fs[:max_per_kind]]
        if total > max_per_kind:
            lines.append(f"    ... {total - max_per_kind} more")
    if r.lost_write_ids:
        shown = ", ".join(map(str, r.lost_write_ids[:20]))
        more = f" ... ({len(r.lost_write_ids) - 20} more)" if len(r.lost_write_ids) > 20 else ""
        lines.append(f"  lost write ids: {shown}{more}")
    if r.replay:
        lines.append(f"  replay: {r.replay}")
    return "\n".join(lines)


# --- JSON -----------------------------------------------------------------------------------


def _plain(o: Any) -> Any:
    if hasattr(o, "item"):  # numpy scalars a runner may have passed in
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def to_json(result: Result, indent: int | None = 2) -> str:
    """The result as JSON (strict: no NaN or Infinity); :func:`from_json` reads it back."""
    d = asdict(result)
    d["rto_summary"] = rto_summary(result.rto)
    if result.ha:
        d["ha_summary"] = ha_summary(result.ha)
    return json.dumps(d, indent=indent, allow_nan=False, default=_plain)


def from_json(text: str) -> Result:
    d = json.loads(text)
    d.pop("rto_summary", None)
    d.pop("ha_summary", None)
    d["findings"] = {k: [Finding(**f) for f in fs] for k, fs in d["findings"].items()}
    d["rto"] = [Rto(**x) for x in d["rto"]]
    d["ha"] = [HaStep(**x) for x in d.get("ha", [])]
    return Result(**d)


# --- HTML -----------------------------------------------------------------------------------

_STATE_COLOURS = {
    "running": "#4caf50", "replica": "#81c784", "paused": "#ffc107", "suspended": "#ff9800",
    "resyncing": "#9c27b0", "inconsistent": "#ce93d8", "disconnected": "#90a4ae",
    "standalone": "#26a69a", "terminated": "#616161", "down": "#e0e0e0",
}
_OTHER_STATE = "#bdbdbd"
_EVENT_COLOURS = {"fault": "#d32f2f", "heal": "#388e3c", "operator": "#1565c0", "ha": "#6a1b9a",
                  "other": "#757575"}

_W, _LEFT, _RIGHT = 1200, 150, 20
_EV_H, _NODE_H, _RTO_H, _LAT_H, _AXIS_H = 70, 26, 22, 170, 24
_MAX_POINTS = 4000


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _event_class(kind: str) -> str:
    if kind in FAULT_KINDS:
        return "fault"
    if kind == "heal":
        return "heal"
    if kind in OPERATOR_KINDS:
        return "operator"
    if kind in HA_KINDS:
        return "ha"
    return "other"


def _nice_step(span: float, target: int = 10) -> float:
    raw = span / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    return next((m * mag for m in (1, 2, 5, 10) if m * mag >= raw), 10 * mag)


def _thin(points: list[tuple[float, float]], x: Any) -> list[tuple[float, float]]:
    """At most ~2 points per pixel column (its min and max), so outliers stay visible and a
    day-long drill does not make a 100 MB page."""
    if len(points) <= _MAX_POINTS:
        return points
    cols: dict[int, tuple[tuple[float, float], tuple[float, float]]] = {}
    for p in points:
        c = int(x(p[0]))
        lo, hi = cols.get(c, (p, p))
        cols[c] = (p if p[1] < lo[1] else lo, p if p[1] > hi[1] else hi)
    out = {q for pair in cols.values() for q in pair}
    return sorted(out)


def _timeline(result: Result, history: History) -> str:
    t0, t1 = history.span()
    if t1 <= t0:
        t1 = t0 + 1.0
    plot_w = _W - _LEFT - _RIGHT

    def x(t: float) -> float:
        return _LEFT + (t - t0) / (t1 - t0) * plot_w

    nodes = sorted({s.node for s in history.samples})
    y_nodes = _EV_H
    y_rto = y_nodes + _NODE_H * len(nodes) + 6
    y_lat = y_rto + _RTO_H + 10
    y_axis = y_lat + _LAT_H
    height = y_axis + _AXIS_H
    out: list[str] = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{height}" '
                      f'viewBox="0 0 {_W} {height}" role="img" class="timeline">',
                      '<style>text{font:11px sans-serif}.lbl{font-weight:bold}</style>']
    # time axis and grid
    step = _nice_step(t1 - t0)
    k = 0
    while k * step <= t1 - t0 + 1e-9:
        xx = x(t0 + k * step)
        out.append(f'<line x1="{xx:.1f}" y1="{_EV_H - 4}" x2="{xx:.1f}" y2="{y_axis}" '
                   f'stroke="#eee"/>')
        out.append(f'<text x="{xx:.1f}" y="{y_axis + 15}" text-anchor="middle">'
                   f'{k * step:g}s</text>')
        k += 1
    out.append(f'<text class="lbl" x="4" y="{_EV_H - 8}">events</text>')
    # node lanes: state bands, a role strip on top and acking strips below
    for i, node in enumerate(nodes):
        y = y_nodes + i * _NODE_H
        out.append(f'<text class="lbl" x="4" y="{y + 16}">{_e(node)}</text>')
        ss = sorted((s for s in history.samples if s.node == node), key=lambda s: s.t)
        gaps = [b.t - a.t for a, b in itertools.pairwise(ss) if b.t > a.t]
        # a sample stands until the next one, but a node not sampled for a while (killed,
        # stopped, cut off from the runner) is left blank rather than painted as it last was
        hold = 1.5 * statistics.median(gaps) if gaps else (t1 - t0) / 100
        for j, s in enumerate(ss):
            end = min(ss[j + 1].t if j + 1 < len(ss) else t1, s.t + hold)
            state = s.state or "down"
            colour = _STATE_COLOURS.get(state.lower(), _OTHER_STATE)
            tip = (f"{node} at +{s.t - t0:.2f}s: role {s.role}, epoch {s.epoch}, state {state}"
                   + (", acking" if s.acking else ""))
            w = max(x(end) - x(s.t), 0.5)
            out.append(f'<rect x="{x(s.t):.1f}" y="{y + 4}" width="{w:.1f}" height="16" '
                       f'fill="{colour}"><title>{_e(tip)}</title></rect>')
            if (s.role or "").lower() == "primary":
                out.append(f'<rect x="{x(s.t):.1f}" y="{y + 1}" width="{w:.1f}" height="3" '
                           f'fill="#0d47a1"/>')
            if s.acking and s.since is not None:
                out.append(f'<rect x="{x(s.since):.1f}" y="{y + 21}" '
                           f'width="{max(x(s.t) - x(s.since), 1):.1f}" height="3" '
                           f'fill="#000"/>')
    # split brain spans, over the lanes
    for f in result.findings.get("split_brain", []):
        a, b = f.detail.get("from"), f.detail.get("to")
        if isinstance(a, int | float) and isinstance(b, int | float):
            out.append(f'<rect x="{x(a):.1f}" y="{y_nodes}" width="{max(x(b) - x(a), 2):.1f}" '
                       f'height="{_NODE_H * len(nodes)}" fill="#f44336" opacity="0.45" stroke="#b71c1c">'
                       f'<title>{_e(f.message)}</title></rect>')
    # RTO lane
    out.append(f'<text class="lbl" x="4" y="{y_rto + 15}">failovers</text>')
    for r in result.rto:
        a = r.cause_t if r.cause_t is not None else r.command_t
        b = r.recovered_t if r.recovered_t is not None else t1
        tip = (f"{r.kind} to {r.new_primary}: RTO {_secs(r.from_failure)} from the failure "
               f"({r.cause_kind}), {_secs(r.from_command)} from the command")
        colour = "#7e57c2" if r.recovered_t is not None else "#f44336"
        out.append(f'<rect x="{x(a):.1f}" y="{y_rto + 5}" width="{max(x(b) - x(a), 2):.1f}" '
                   f'height="12" fill="{colour}" opacity="0.6"><title>{_e(tip)}</title></rect>')
        if r.from_failure is not None and x(b) - x(a) > 60:
            out.append(f'<text x="{x(a) + 3:.1f}" y="{y_rto + 15}">RTO '
                       f'{r.from_failure:.1f} s</text>')
        cx = x(r.command_t)
        out.append(f'<polygon points="{cx:.1f},{y_rto + 3} {cx + 5:.1f},{y_rto + 11} '
                   f'{cx:.1f},{y_rto + 19} {cx - 5:.1f},{y_rto + 11}" fill="#1565c0">'
                   f'<title>{_e(r.kind)} command at +{r.command_t - t0:.2f}s</title></polygon>')
        out.append(f'<line x1="{cx:.1f}" y1="{y_nodes}" x2="{cx:.1f}" y2="{y_axis}" '
                   f'stroke="#1565c0" stroke-dasharray="4 3"/>')
    # events: a marker, a rotated label and a faint line down through the lanes
    for ev in sorted(history.events, key=lambda e: e.t):
        colour = _EVENT_COLOURS[_event_class(ev.kind)]
        ex = x(ev.t)
        tip = f"+{ev.t - t0:.2f}s {ev.kind}" + (f" {ev.node}" if ev.node else "") + (
            f": {ev.detail}" if ev.detail else "")
        out.append(f'<line x1="{ex:.1f}" y1="{_EV_H - 6}" x2="{ex:.1f}" y2="{y_axis}" '
                   f'stroke="{colour}" stroke-width="0.6" opacity="0.5"/>')
        out.append(f'<circle cx="{ex:.1f}" cy="{_EV_H - 8}" r="4" fill="{colour}">'
                   f'<title>{_e(tip)}</title></circle>')
        out.append(f'<text x="{ex + 2:.1f}" y="{_EV_H - 14}" fill="{colour}" '
                   f'transform="rotate(-50 {ex + 2:.1f} {_EV_H - 14})">{_e(ev.kind)}</text>')
    # write latency, log scale
    out.append(f'<text class="lbl" x="4" y="{y_lat + 14}">write latency</text>')
    out.append(f'<rect x="{_LEFT}" y="{y_lat}" width="{plot_w}" height="{_LAT_H - 6}" '
               f'fill="none" stroke="#ccc"/>')
    pts = [(t, v) for t, v in history.latency_points() if v > 0 and math.isfinite(v)]
    if pts:
        lo = math.floor(math.log10(min(v for _, v in pts)))
        hi = math.ceil(math.log10(max(v for _, v in pts)))
        hi = max(hi, lo + 1)

        def ly(v: float) -> float:
            return y_lat + (_LAT_H - 8) * (1 - (math.log10(v) - lo) / (hi - lo)) + 1

        for d in range(lo, hi + 1):
            yy = ly(10.0 ** d)
            label = f"{10.0 ** d * 1000:g} ms" if d < 0 else f"{10.0 ** d:g} s"
            out.append(f'<line x1="{_LEFT}" y1="{yy:.1f}" x2="{_W - _RIGHT}" y2="{yy:.1f}" '
                       f'stroke="#eee"/><text x="{_LEFT - 4}" y="{yy + 4:.1f}" '
                       f'text-anchor="end">{label}</text>')
        for t, v in _thin(pts, lambda t: x(t)):
            out.append(f'<circle cx="{x(t):.1f}" cy="{ly(v):.1f}" r="1.6" fill="#37474f" '
                       f'opacity="0.6"/>')
    else:
        out.append(f'<text x="{_LEFT + 8}" y="{y_lat + 30}">no latency samples</text>')
    out.append("</svg>")
    return "\n".join(out)


def _legend() -> str:
    items = [f'<span class="sw" style="background:{c}"></span>{_e(s)}'
             for s, c in _STATE_COLOURS.items()]
    items += [f'<span class="dot" style="background:{c}"></span>{_e(k)}'
              for k, c in _EVENT_COLOURS.items()]
    items.append('<span class="sw" style="background:#0d47a1;height:4px"></span>primary')
    items.append('<span class="sw" style="background:#000;height:4px"></span>acknowledging')
    items.append('<span class="sw" style="background:#7e57c2"></span>failure to recovery (RTO)')
    items.append('<span class="sw" style="background:#f44336"></span>split brain / not recovered')
    return '<p class="legend">' + " ".join(items) + "</p>"


_CSS = """body{font:14px sans-serif;margin:20px;color:#222}
h1.pass{color:#2e7d32}h1.fail{color:#c62828}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:left}code{background:#f4f4f4;padding:2px 4px}
.legend span.sw{display:inline-block;width:14px;height:10px;margin:0 3px 0 10px}
.legend span.dot{display:inline-block;width:9px;height:9px;border-radius:5px;
margin:0 3px 0 10px}.finding{font-family:monospace;white-space:pre-wrap}"""


def _table(rows: Iterable[Iterable[object]], head: Iterable[object] | None = None) -> str:
    out = ["<table>"]
    if head is not None:
        out.append("<tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>")
    out += ["<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows]
    out.append("</table>")
    return "\n".join(out)


def _rel(t: float | None, t0: float) -> str:
    return "-" if t is None else f"+{t - t0:.2f}s"


def summary_line(result: Result, seed: int, kinds: Counter[str], skipped: int,
                 problems: Sequence[str], elapsed: float) -> str:
    """The drill's last line: verdict, faults by kind, RPO, RTO (or, in an HA drill, the
    takeovers and handbacks), writes, time."""
    rs = rto_summary(result.rto)
    med, mx = rs["median_from_failure"], rs["max_from_failure"]
    rto = (f"RTO median {med:.1f} s max {mx:.1f} s ({rs['failovers']} failovers)"
           if med is not None and mx is not None else f"RTO - ({rs['failovers']} failovers)")
    if result.ha:
        rto = _ha_words(result.ha) if not result.rto else f"{rto}; {_ha_words(result.ha)}"
    verdict = "PASS" if result.passed and not problems else "FAIL"
    skip = f", {skipped} skipped" if skipped else ""
    return (f"{verdict} seed {seed}: {sum(kinds.values())} faults injected ("
            + ", ".join(f"{k} {kinds[k]}" for k in (*PLANNED_KINDS, *HA_FAULT_KINDS)
                        if kinds[k])
            + f"{skip}); RPO {result.rpo}; {rto}; {result.counts.get('writes_ok', 0)} "
            f"writes acknowledged; {elapsed:.0f} s")


def render_html(result: Result, history: History, title: str = "steelfusion drill",
                problems: Sequence[str] = ()) -> str:
    """One self-contained page: verdict, counts, runner problems (what the runbook says must
    work and did not), timeline (SVG), failovers, findings."""
    r = result
    verdict = "PASS" if r.passed else "FAIL"
    t0 = history.span()[0]
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{_e(title)}: {verdict}</title><style>{_CSS}</style></head><body>",
             f'<h1 class="{verdict.lower()}">{_e(title)}: {verdict}</h1>',
             f"<p>{_e(render_text(r, 0).splitlines()[0])}</p>"]
    if r.replay:
        parts.append(f"<p>Replay: <code>{_e(r.replay)}</code></p>")
    parts.append(_table([(k, v) for k, v in r.counts.items()]
                        + [("RPO (acknowledged writes lost)", r.rpo)]))
    if r.per_copy:
        parts.append(_table([(name, pc.get("blocks_checked", 0), pc.get("lost_blocks", 0),
                               pc.get("lost_writes", 0)) for name, pc in r.per_copy.items()],
                            ("copy", "blocks checked", "blocks lost", "writes lost")))
    if problems:
        parts.append('<h2>Runner problems</h2><ul class="finding">'
                     + "".join(f"<li>{_e(p)}</li>" for p in problems) + "</ul>")
    parts.append("<h2>Timeline</h2>")
    parts.append(_timeline(r, history))
    parts.append(_legend())
    if r.faults:
        parts.append("<h2>Faults and operator actions</h2>")
        parts.append(_table(sorted(r.faults.items()), ("kind", "count")))
    if r.rto:
        parts.append("<h2>Failovers</h2>")
        parts.append(_table(
            [(x.kind, _rel(x.command_t, t0), x.new_primary or "?",
              f"{x.cause_kind} {_rel(x.cause_t, t0)}" if x.cause_kind else "-",
              _rel(x.takeover_t, t0), _rel(x.recovered_t, t0), x.basis or "-",
              _secs(x.from_failure), _secs(x.from_command)) for x in r.rto],
            ("kind", "command", "new primary", "caused by", "took over", "recovered",
             "recovery marked by", "RTO from failure", "RTO from command")))
    if r.ha:
        parts.append("<h2>Core HA: takeovers and handbacks</h2>")
        parts.append(_table(
            [(x.kind, _rel(x.t, t0), x.core or "?", x.node or "?",
              f"{x.cause_kind} {_rel(x.cause_t, t0)}" if x.cause_kind else "-",
              _secs(x.seconds), x.detail) for x in r.ha],
            ("kind", "at", "Core", "served by", "caused by", "seconds", "what")))
    parts.append("<h2>Findings</h2>")
    if not r.findings:
        parts.append("<p>None.</p>")
    for kind, fs in r.findings.items():
        total = r.finding_counts.get(kind, len(fs))
        more = f" (showing {len(fs)})" if total > len(fs) else ""
        parts.append(f"<h3>{_e(kind)}: {total}{_e(more)}</h3><ul>")
        for f in fs:
            detail = json.dumps(f.detail, sort_keys=True, default=_plain)
            parts.append(f'<li><span class="finding">{_e(f.message)}</span><br>'
                         f"<small>{_e(detail)}</small></li>")
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)
