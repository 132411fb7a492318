// steelfusion console: fills the server-rendered page from the node's live status stream
// (server-sent events) and sends the operator's actions with the session's CSRF token.
"use strict";
(function () {
  const cfg = JSON.parse(document.getElementById("config").textContent);
  const $ = (id) => document.getElementById(id);
  const WINDOW_S = 300; // plots show the last five minutes
  const series = { resync: [], lag: [], rate: [] };
  let resyncSeen = false;
  let resumed = false; // a resume from this page: say its end as coredr does
  let lastEdge = null;

  function fmtSize(n) {
    if (n === null || n === undefined) return "?";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : String(n)) + " " + units[i];
  }
  function text(id, value) { const el = $(id); if (el) el.textContent = value; }
  function push(list, value) {
    const now = Date.now() / 1000;
    list.push([now, value]);
    while (list.length && list[0][0] < now - WINDOW_S) list.shift();
  }
  function rows(tbody, data) {
    tbody.replaceChildren(...data.map((cells) => {
      const tr = document.createElement("tr");
      for (const c of cells) { const td = document.createElement("td"); td.textContent = c; tr.append(td); }
      return tr;
    }));
  }
  function alarms(list) {
    const ul = $("alarms");
    if (!list || !list.length) { ul.replaceChildren(Object.assign(document.createElement("li"), { textContent: "none", className: "none" })); return; }
    ul.replaceChildren(...list.map((a) => Object.assign(document.createElement("li"), { textContent: a.alarm + ": " + a.message })));
  }

  // A line plot of [time, value] points over the last WINDOW_S seconds.
  function plot(canvas, points, fixedMax, floor) {
    if (!canvas) return;
    const ctx = canvas.getContext("2d");
    const w = canvas.width, h = canvas.height, padL = 44, padB = 16;
    ctx.clearRect(0, 0, w, h);
    const now = Date.now() / 1000;
    const max = fixedMax || Math.max(floor || 1, ...points.map((p) => p[1])) * 1.15;
    ctx.strokeStyle = "#ccd"; ctx.fillStyle = "#667"; ctx.font = "11px sans-serif";
    ctx.beginPath(); ctx.moveTo(padL, 4); ctx.lineTo(padL, h - padB); ctx.lineTo(w - 4, h - padB); ctx.stroke();
    ctx.fillText(max >= 10 ? max.toFixed(0) : max.toPrecision(2), 2, 12);
    ctx.fillText("0", 2, h - padB);
    ctx.fillText("-5 min", padL, h - 3); ctx.fillText("now", w - 26, h - 3);
    if (!points.length) return;
    ctx.strokeStyle = "#1d3557"; ctx.lineWidth = 2; ctx.beginPath();
    points.forEach(([t, v], i) => {
      const x = padL + (w - 4 - padL) * (1 - (now - t) / WINDOW_S);
      const y = h - padB - (h - padB - 4) * Math.min(1, v / max);
      if (i) ctx.lineTo(x, y); else ctx.moveTo(x, y);
    });
    ctx.stroke();
  }

  function showResync(r, state) {
    resyncSeen = true;
    $("resync-box").hidden = false;
    const pct = r ? r.percent : 100;
    $("resync").value = pct;
    push(series.resync, pct);
    if (r && state !== "running") {
      const eta = r.eta_s === null || r.eta_s === undefined ? "?" : r.eta_s;
      text("resync-text", `${fmtSize(r.bytes_done)} / ${fmtSize(r.bytes_total)} (${r.percent}%), ` +
        `${fmtSize(r.rate_bytes_s || 0)}/s, ETA ${eta} s`);
    } else {
      text("resync-text", "done");
    }
    plot($("resync-plot"), series.resync, 100);
  }

  function renderCore(st) {
    text("role", st.role);
    text("epoch", st.epoch);
    const state = $("state");
    state.textContent = st.replication;
    state.className = "state " + st.replication;
    const peer = st.peer || {};
    text("peer", `${peer.name || "-"} (${peer.address || "none"})`);
    const c = st.connections || {};
    const repl = (c.replication || []).filter((x) => x.established).length;
    const ifaces = Object.entries(c.replication_interfaces || {})
      .filter(([, n]) => n.expected).map(([i, n]) => `${i} ${n.established}/${n.expected}`);
    text("conns", `edges ${(c.edges || []).length}, replication ${repl}` + (ifaces.length ? ` (out: ${ifaces.join(", ")})` : ""));
    const w = st.witness;
    text("witness", !w ? "none" : (w.connected ? "connected" : "DOWN") + (w.holds ? ", holds the approval" : ""));
    if (st.resync) showResync(st.resync, st.replication);
    else if (resyncSeen) showResync(null, st.replication);
    if (resumed && st.replication !== "resyncing") {
      resumed = false;
      $("result").textContent = `replication ${st.replication}`;
    }
    rows($("luns").tBodies[0], Object.entries(st.luns || {}).map(([lun, l]) => [
      lun, fmtSize(l.size), l.applied_seq, l.durable_seq, l.acked_seq,
      Math.max(0, l.applied_seq - l.acked_seq), fmtSize(l.mirror_queue_bytes), l.edge || "-"]));
    const j = st.journal;
    text("journal", !j ? "no Journal LUN open" :
      `${j.path}: ${fmtSize(j.size)}, log ${fmtSize(j.used_log_bytes)} used, dirty ` +
      Object.entries(j.dirty_bytes || {}).map(([l, n]) => `LUN ${l} ${fmtSize(n)}`).join(", ") +
      `, activity log ${j.al_regions} regions`);
    alarms(st.alarms);
  }

  function renderEdge(st) {
    const bs = st.blockstore || {};
    const core = st.core || {};
    text("core", core.connected ? `${core.core} (${core.address})` : "not connected");
    text("uncommitted", `${fmtSize(st.uncommitted_bytes)} in ${bs.uncommitted_writes} writes`);
    const lag = st.commit_lag_s || 0;
    text("lag", lag.toFixed(2) + " s");
    $("reserve").value = bs.reserve_used_pct || 0;
    text("reserve-text", `${bs.reserve_used_pct}% of ${fmtSize(bs.reserve_bytes)}`);
    text("sessions", (st.iscsi || {}).connections);
    const now = Date.now() / 1000;
    if (lastEdge) {
      const dt = now - lastEdge.t;
      if (dt > 0) push(series.rate, Math.max(0, (bs.bytes_written - lastEdge.bytes) / dt / 1e6));
    }
    lastEdge = { t: now, bytes: bs.bytes_written };
    push(series.lag, lag);
    plot($("lag-plot"), series.lag, 0, 1);
    plot($("rate-plot"), series.rate, 0, 10);
    rows($("luns").tBodies[0], Object.entries(st.luns || {}).map(([lun, l]) => {
      const b = (bs.luns || {})[lun] || {};
      return [lun, fmtSize(l.size), l.reads, l.reads - l.read_misses, l.read_misses, l.writes,
        fmtSize(l.bytes_written), b.uncommitted_writes, b.committed_seq, `${b.cached_regions}/${b.regions}`];
    }));
    alarms(st.alarms);
  }

  function event(ev) {
    const ol = $("events");
    if (!ol) return;
    const { n, time, event: name, node, ...rest } = ev;
    const li = document.createElement("li");
    li.value = n;
    li.textContent = `${new Date(time * 1000).toLocaleTimeString()} ${name} ` + JSON.stringify(rest);
    ol.prepend(li);
    while (ol.children.length > 200) ol.lastChild.remove();
  }

  function connect() {
    const es = new EventSource("/api/events");
    es.onopen = () => { $("live").textContent = "live"; $("live").className = "live"; };
    es.onerror = () => { $("live").textContent = "reconnecting"; $("live").className = "live off"; };
    es.addEventListener("status", (m) => {
      const st = JSON.parse(m.data);
      (cfg.kind === "core" ? renderCore : renderEdge)(st);
    });
    es.addEventListener("node", (m) => event(JSON.parse(m.data)));
  }

  // Actions: a confirmation that says what will happen, then the node's own answer.
  async function act(cmd, force) {
    const result = $("result");
    result.className = "result";
    result.textContent = `${cmd}...`;
    let reply;
    try {
      const resp = await fetch(`/api/action/${cmd}`, {
        method: "POST", credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": cfg.csrf },
        body: JSON.stringify(cmd === "failover" ? { force } : {}),
      });
      reply = await resp.json();
    } catch (e) {
      reply = { ok: false, said: `Error: could not ask the node (${e})` };
    }
    result.textContent = reply.said || reply.error;
    result.className = "result" + (reply.ok ? "" : " refused");
    if (reply.ok && reply.resync) showResync(reply.resync, reply.state);
    resumed = cmd === "resume" && reply.ok && reply.state === "resyncing";
  }

  function setupActions() {
    const box = $("actions");
    const dlg = $("confirm");
    if (!box || !dlg) return;
    let pending = null;
    for (const cmd of cfg.actions) {
      const b = document.createElement("button");
      b.textContent = cmd[0].toUpperCase() + cmd.slice(1);
      b.id = `action-${cmd}`;
      b.addEventListener("click", () => {
        pending = cmd;
        text("confirm-text", cfg.confirm[cmd]);
        $("force-box").hidden = cmd !== "failover";
        $("confirm-force").checked = false;
        text("force-help", cfg.forceHelp);
        dlg.showModal();
      });
      box.append(b);
    }
    dlg.addEventListener("close", () => {
      if (dlg.returnValue === "ok" && pending) act(pending, $("confirm-force").checked);
      pending = null;
    });
  }

  setupActions();
  connect();
})();
