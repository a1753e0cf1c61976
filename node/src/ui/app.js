// Shoal dashboard: reads this node's admin API every 2 s and the live tap.
// Plain DOM, no framework; every value goes in through textContent, never
// innerHTML, so a member or service name cannot inject markup.
"use strict";

const POLL_MS = 2000;
const TAP_ROWS = 50;

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function row(cells, attrs) {
  const tr = document.createElement("tr");
  for (const c of cells) {
    if (c instanceof Node) {
      const td = document.createElement("td");
      td.appendChild(c);
      tr.appendChild(td);
    } else if (c && typeof c === "object") {
      tr.appendChild(el("td", c.text, c.cls));
    } else {
      tr.appendChild(el("td", c));
    }
  }
  for (const [k, v] of Object.entries(attrs || {})) tr.setAttribute(k, v);
  return tr;
}

function fill(tableId, rows, emptyText, columns) {
  const body = document.querySelector("#" + tableId + " tbody");
  body.replaceChildren();
  if (rows.length === 0) {
    const tr = document.createElement("tr");
    const td = el("td", emptyText, "muted");
    td.colSpan = columns;
    tr.appendChild(td);
    body.appendChild(tr);
    return;
  }
  for (const r of rows) body.appendChild(r);
}

function pct(rate) {
  return (rate * 100).toFixed(1) + "%";
}

function ms(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  return v < 10 ? v.toFixed(2) + " ms" : v.toFixed(1) + " ms";
}

function ago(msSince, isSelf) {
  if (isSelf) return "self";
  if (msSince < 1000) return "just now";
  if (msSince < 60000) return (msSince / 1000).toFixed(1) + " s ago";
  return Math.round(msSince / 60000) + " min ago";
}

function successClass(rate) {
  if (rate >= 0.99) return "good";
  if (rate >= 0.9) return "warn";
  return "bad";
}

async function getJson(path) {
  const r = await fetch(path, { cache: "no-store", headers: { accept: "application/json" } });
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}

// === members ===

function renderMembers(members) {
  members.sort((a, b) => a.name.localeCompare(b.name));
  const self = members.find((m) => m.self);
  if (self) {
    document.getElementById("node").textContent =
      "node " + self.name + " · zone " + self.zone + " · " + self.build;
    document.title = "Shoal · " + self.name;
  }
  const alive = members.filter((m) => m.state === "alive").length;
  document.getElementById("members-count").textContent = alive + " alive of " + members.length;
  const rows = members.map((m) =>
    row(
      [
        { text: m.name + (m.self ? " (this node)" : ""), cls: "name" },
        { text: m.state, cls: "state-" + m.state },
        { text: m.serving, cls: "serving-" + m.serving },
        m.zone,
        ago(m.last_seen_ms, m.self),
        (m.services || []).join(", ") || "–",
        m.build,
      ],
      { "data-member": m.name },
    ),
  );
  fill("members", rows, "no members", 7);
}

// === services ===

// Success over the last minute of this node's outbound calls to `service`,
// from /v1/stats: requests-weighted over the edges that reach it.
function serviceSuccess(stats, service) {
  let requests = 0;
  let ok = 0;
  for (const s of stats) {
    if (s.direction !== "outbound" || s.destination !== service) continue;
    requests += s.requests;
    ok += s.success_rate * s.requests;
  }
  return requests === 0 ? null : ok / requests;
}

function renderServices(services, stats) {
  services.sort((a, b) => a.service.localeCompare(b.service));
  const rows = [];
  for (const s of services) {
    const rate = serviceSuccess(stats || [], s.service);
    const success = rate === null
      ? { text: "no traffic", cls: "muted success" }
      : { text: pct(rate), cls: "success " + successClass(rate) };
    const endpoints = s.endpoints.length ? s.endpoints : [null];
    endpoints.forEach((e, i) => {
      const first = i === 0;
      if (e === null) {
        rows.push(row([{ text: s.service, cls: "name" }, "no endpoints", "", "", "", "", "", success],
          { "data-service": s.service }));
        return;
      }
      const here = e.from_here;
      const hereText = here
        ? here.status + (here.in_flight ? " · " + here.in_flight + " in flight" : "")
        : "–";
      const latency = here && here.ewma_ms !== null && here.ewma_ms !== undefined ? here.ewma_ms : null;
      const cells = [
        { text: first ? s.service : "", cls: "name" },
        e.node + " (" + e.addr + ")",
        { text: e.health, cls: "health-" + e.health },
        { text: e.routable ? "yes" : "no" + (e.refused ? " (" + e.refused + ")" : ""),
          cls: e.routable ? "good" : "bad" },
        e.zone,
        hereText,
        ms(latency),
        first ? success : "",
      ];
      const attrs = { "data-endpoint": s.service + "/" + e.node };
      if (first) attrs["data-service"] = s.service;
      rows.push(row(cells, attrs));
    });
  }
  fill("services", rows, "no services", 8);
}

// === golden metrics ===

function statCells(s, route) {
  return [
    s.direction === undefined ? "" : s.direction,
    s.source === undefined ? "" : s.source,
    s.destination === undefined ? "" : s.destination,
    route,
    s.rps.toFixed(2),
    s.requests,
    { text: s.requests ? pct(s.success_rate) : "–", cls: "success " + (s.requests ? successClass(s.success_rate) : "muted") },
    ms(s.p50_ms),
    ms(s.p99_ms),
  ];
}

function renderStats(stats) {
  const rows = [];
  for (const s of stats) {
    const edge = s.direction + " " + s.source + "→" + s.destination;
    // A flat row for one route (`route` field) or an edge with its routes
    // (`routes` list): both shapes show one line per route.
    const flatRoute = typeof s.route === "string" ? (s.route || "(no route)") : "all";
    rows.push(row(statCells(s, flatRoute), { "data-edge": edge }));
    if (Array.isArray(s.routes)) {
      const named = s.routes.filter((r) => r.route !== "");
      if (named.length > 0) {
        for (const r of s.routes) {
          const cells = statCells(r, r.route || "(no route)");
          cells[0] = cells[1] = cells[2] = "";
          rows.push(row(cells, { "data-route": edge + " " + (r.route || "(no route)"), class: "route" }));
        }
      }
    }
  }
  fill("stats", rows, "no traffic in the last minute", 9);
}

// === policies ===

function renderPolicies(policies) {
  policies.sort((a, b) => (a.kind + "/" + a.name).localeCompare(b.kind + "/" + b.name));
  const rows = policies.map((p) => {
    const everywhere = p.applied_on >= p.live_nodes;
    return row(
      [
        p.kind,
        { text: p.name + (p.deleted ? " (deleted)" : ""), cls: "name" },
        { text: p.version, cls: "mono" },
        p.origin,
        { text: p.applied_on + "/" + p.live_nodes, cls: everywhere ? "good" : "warn" },
        p.conflict
          ? { text: "kept " + p.conflict.winner + ", lost " + p.conflict.loser, cls: "bad" }
          : { text: "none", cls: "muted" },
      ],
      { "data-policy": p.kind + "/" + p.name },
    );
  });
  fill("policies", rows, "no policies", 6);
}

// === poll ===

async function poll() {
  const [members, services, stats, policies] = await Promise.allSettled([
    getJson("/v1/members"),
    getJson("/v1/services"),
    getJson("/v1/stats"),
    getJson("/v1/policies"),
  ]);
  const errors = [];
  const value = (r) => {
    if (r.status === "fulfilled") return r.value;
    errors.push(r.reason.message || String(r.reason));
    return null;
  };
  const m = value(members);
  const sv = value(services);
  const st = value(stats);
  const p = value(policies);
  if (m) renderMembers(m);
  if (st) renderStats(st);
  if (sv) renderServices(sv, st);
  if (p) renderPolicies(p);
  const err = document.getElementById("error");
  err.hidden = errors.length === 0;
  err.textContent = errors.join("; ");
  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
}

function schedule() {
  poll()
    .catch((e) => {
      const err = document.getElementById("error");
      err.hidden = false;
      err.textContent = String(e);
    })
    .finally(() => setTimeout(schedule, POLL_MS));
}

// === tap ===

function startTap() {
  const state = document.getElementById("tap-state");
  const body = document.querySelector("#tap tbody");
  // `?tap=off` leaves the stream closed: for one-shot renders (a headless
  // browser's virtual clock does not advance while a stream is open).
  if (new URLSearchParams(window.location.search).get("tap") === "off") {
    state.textContent = "tap off (?tap=off)";
    return;
  }
  if (typeof EventSource === "undefined") {
    state.textContent = "tap unavailable (no EventSource in this browser)";
    return;
  }
  let opened = false;
  const source = new EventSource("/v1/tap");
  source.onopen = () => {
    opened = true;
    state.textContent = "live";
    state.className = "good";
  };
  source.onmessage = (msg) => {
    let ev;
    try {
      ev = JSON.parse(msg.data);
    } catch (_) {
      return;
    }
    const failed = ev.status >= 500 || (ev.grpc_status !== null && ev.grpc_status !== undefined && ev.grpc_status !== 0);
    const tr = row(
      [
        (ev.time || "").replace(/^.*T/, "").replace(/Z$/, ""),
        ev.direction,
        ev.service,
        ev.route || "",
        ev.endpoint || "",
        ev.method,
        { text: ev.path, cls: "mono" },
        { text: ev.status, cls: failed ? "bad" : "good" },
        ev.grpc_status === null || ev.grpc_status === undefined ? "" : ev.grpc_status,
        ms(ev.duration_ms !== undefined ? ev.duration_ms : ev.duration),
      ],
      { "data-tap": ev.service + " " + ev.path },
    );
    body.insertBefore(tr, body.firstChild);
    while (body.children.length > TAP_ROWS) body.removeChild(body.lastChild);
  };
  source.addEventListener("lagged", (msg) => {
    try {
      const n = JSON.parse(msg.data).missed;
      state.textContent = "live (missed " + n + " events)";
    } catch (_) {
      /* ignore a malformed notice */
    }
  });
  source.onerror = () => {
    if (!opened || source.readyState === EventSource.CLOSED) {
      // The node has no tap (404), refuses this caller (401/403) or is gone.
      source.close();
      state.textContent = "tap unavailable";
      state.className = "muted";
    } else {
      state.textContent = "tap reconnecting…";
      state.className = "warn";
    }
  };
}

document.addEventListener("DOMContentLoaded", () => {
  schedule();
  startTap();
});
