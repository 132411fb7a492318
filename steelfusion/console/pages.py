"""The console's pages, rendered on the node: a login form, the Core's Replication page and
the Edge's page. ``static/console.js`` fills them in from the live status stream."""

from __future__ import annotations

import html
import json

from steelfusion.console import NodeView

#: What each action does, said before the operator confirms it (the refusals, if any, come
#: from the Core afterwards, in ``coredr``'s words).
CONFIRM = {
    "suspend": "Suspend replication on {name}? The Witness must approve. From then on Edge "
               "writes are applied here only, their regions logged in the Journal LUN, and "
               "acknowledged without the secondary, until you resume (a resync then copies "
               "those regions). If this Core is lost while suspended, writes it acknowledged "
               "are only here.",
    "resume": "Resume replication on {name}? The regions changed while suspended are copied "
              "to the secondary (a resync, with progress shown here); the secondary is "
              "inconsistent until it ends. New writes are mirrored meanwhile.",
    "failover": "Fail over to {name}? This secondary becomes the primary at the next epoch, "
                "with replication suspended (journaling), and the Edges move here by "
                "themselves. Allowed only when neither this Core nor the Witness reaches the "
                "primary.",
    "terminate": "Terminate replication on {name}? The pair must be set up again afterwards.",
}
FORCE_HELP = ("force: promote even an inconsistent replica, or without the Witness's answer. "
              "Data the old primary had and this Core lacks is then lost.")


def _head(title: str) -> str:
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{html.escape(title)}</title>'
            f'<link rel="stylesheet" href="/static/console.css"></head>')


def login(view: NodeView) -> str:
    name = html.escape(view.name)
    return (_head(f"{view.name} - steelfusion console") +
            f'<body class="login"><form method="post" action="/login" id="login">'
            f'<h1>steelfusion {html.escape(view.kind)} <b>{name}</b></h1>'
            f'<label>Password <input type="password" name="password" id="password" '
            f'autofocus autocomplete="current-password"></label>'
            f'<button type="submit" id="login-button">Log in</button>'
            f'<p class="hint">The password is <code>[console] password</code> in the node\'s '
            f'config.</p></form></body></html>')


def page(view: NodeView, csrf: str) -> str:
    """The node's page; ``csrf`` goes into it for the actions (and only there)."""
    cfg = {"kind": view.kind, "name": view.name, "csrf": csrf, "actions": list(view.actions),
           "confirm": {a: CONFIRM[a].format(name=view.name) for a in view.actions},
           "forceHelp": FORCE_HELP}
    body = _core_body() if view.kind == "core" else _edge_body()
    title = ("Replication" if view.kind == "core" else "Edge") + f" - {view.name}"
    blob = json.dumps(cfg).replace("</", "<\\/")
    return (_head(title) +
            f'<body class="{view.kind}"><header><h1>{html.escape(title)}</h1>'
            f'<span id="live" class="live off">connecting</span>'
            f'<form method="post" action="/logout" class="logout">'
            f'<input type="hidden" name="csrf" value="{html.escape(csrf)}">'
            f'<button type="submit">Log out</button></form></header>'
            f'<main>{body}</main>'
            f'<script type="application/json" id="config">{blob}</script>'
            f'<script src="/static/console.js"></script></body></html>')


def _core_body() -> str:
    return """
<section class="summary">
  <div><span class="k">Role</span><span id="role">-</span></div>
  <div><span class="k">Epoch</span><span id="epoch">-</span></div>
  <div><span class="k">Replication</span><span id="state" class="state">-</span></div>
  <div><span class="k">Peer</span><span id="peer">-</span></div>
  <div><span class="k">Connections</span><span id="conns">-</span></div>
  <div><span class="k">Witness</span><span id="witness">-</span></div>
</section>
<section class="actions" id="actions"></section>
<p id="result" class="result"></p>
<section id="resync-box" class="resync" hidden>
  <h2>Resync</h2>
  <progress id="resync" max="100" value="0"></progress> <span id="resync-text"></span>
  <canvas id="resync-plot" width="640" height="140"></canvas>
</section>
<section><h2>LUNs</h2><table id="luns"><thead><tr><th>LUN</th><th>size</th><th>applied</th>
<th>durable</th><th>acked</th><th>lag (writes)</th><th>mirror queue</th><th>edge</th></tr></thead>
<tbody></tbody></table></section>
<section><h2>Journal</h2><p id="journal">-</p></section>
<section><h2>Alarms</h2><ul id="alarms"><li>none</li></ul></section>
<section><h2>Events</h2><ol id="events" class="events" reversed></ol></section>
<dialog id="confirm"><form method="dialog">
  <p id="confirm-text"></p>
  <label id="force-box" hidden><input type="checkbox" id="confirm-force"> <span id="force-help"></span></label>
  <menu><button value="cancel" id="confirm-cancel">Cancel</button>
  <button value="ok" id="confirm-ok" class="danger">Confirm</button></menu>
</form></dialog>
"""


def _edge_body() -> str:
    return """
<section class="summary">
  <div><span class="k">Primary Core</span><span id="core">-</span></div>
  <div><span class="k">Uncommitted</span><span id="uncommitted">-</span></div>
  <div><span class="k">Commit lag</span><span id="lag">-</span></div>
  <div><span class="k">Write reserve</span><progress id="reserve" max="100" value="0"></progress>
    <span id="reserve-text"></span></div>
  <div><span class="k">iSCSI sessions</span><span id="sessions">-</span></div>
</section>
<section class="plots">
  <figure><figcaption>Commit lag (s), last 5 minutes</figcaption>
    <canvas id="lag-plot" width="480" height="140"></canvas></figure>
  <figure><figcaption>Host writes (MB/s), last 5 minutes</figcaption>
    <canvas id="rate-plot" width="480" height="140"></canvas></figure>
</section>
<section><h2>LUNs</h2><table id="luns"><thead><tr><th>LUN</th><th>size</th><th>reads</th>
<th>cache hits</th><th>misses</th><th>writes</th><th>written</th><th>uncommitted writes</th>
<th>committed seq</th><th>cached regions</th></tr></thead><tbody></tbody></table></section>
<section><h2>Alarms</h2><ul id="alarms"><li>none</li></ul></section>
"""
