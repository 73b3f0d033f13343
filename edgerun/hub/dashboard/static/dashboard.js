// edgerun hub dashboard: plain JS, no framework. Every value from the fleet goes into the DOM as text.
"use strict";
(() => {
  const TOKEN_KEY = "edgerun-hub-token";
  const OVERSCAN = 10;           // rows rendered above and below the visible ones
  const MAX_ROWS = 100;          // never more rows than this in the DOM
  const MAX_EVENTS = 200;
  const STALL_MS = 40000;        // no byte (not even a ping) for this long: reconnect
  const COLS = 8;
  const $ = (id) => document.getElementById(id);
  const collator = new Intl.Collator(undefined, { numeric: true, sensitivity: "base" });

  const S = {
    rows: new Map(), order: [], events: [], rollouts: new Map(), releases: [],
    sort: { key: "id", dir: 1 }, filter: "all", query: "", terms: [], facet: null,
    instance: null, maxRev: 0, maxSeq: 0, hello: null, loaded: false, gen: 0, rowH: 34, measured: false,
    mounted: new Map(), painted: false, eventsShown: false, syncing: false,
  };

  // --- helpers -------------------------------------------------------------------------------
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function badge(state) { return el("span", "badge b-" + String(state).replace(/[^a-z_]/g, ""), String(state).replace(/_/g, " ")); }
  function fmtBytes(n) {
    if (n === null || n === undefined) return "–";
    const u = ["B", "K", "M", "G", "T"]; let i = 0; let v = n;
    while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
    return (v >= 100 || i === 0 ? v.toFixed(0) : v.toFixed(1)) + u[i];
  }
  function ago(ts) {
    if (!ts) return "–";
    const s = Math.max(0, Date.now() / 1000 - ts);
    if (s < 5) return "now";
    if (s < 60) return Math.floor(s) + "s ago";
    if (s < 3600) return Math.floor(s / 60) + "m ago";
    if (s < 86400) return Math.floor(s / 3600) + "h ago";
    return Math.floor(s / 86400) + "d ago";
  }
  function when(ts) { return ts ? new Date(ts * 1000).toLocaleString() : "–"; }
  function clock(ts) { return ts ? new Date(ts * 1000).toLocaleTimeString([], { hour12: false }) : "–"; }
  const fmtN = (n) => n.toLocaleString();
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  // --- token and API -------------------------------------------------------------------------
  function takeTokenFromUrl() {
    const url = new URL(location.href);
    const t = url.searchParams.get("token");
    if (t) {
      sessionStorage.setItem(TOKEN_KEY, t);
      url.searchParams.delete("token");
      history.replaceState(null, "", url.pathname + url.search + url.hash);
    }
  }
  function headers(extra) {
    const h = Object.assign({}, extra || {});
    const t = sessionStorage.getItem(TOKEN_KEY);
    if (t) h.Authorization = "Bearer " + t;
    return h;
  }
  function api(path, opts) {
    const o = Object.assign({}, opts || {});  // the server says no-store; the default mode takes the preload
    o.headers = headers(o.headers);
    return fetch(path, o);
  }
  function showLogin(message) {
    S.gen++;
    setLive("down", "signed out");
    $("main").hidden = true;
    $("login").hidden = false;
    $("login-error").hidden = !message;
    $("login-error").textContent = message || "";
    $("login-token").focus();
  }

  // --- rows ----------------------------------------------------------------------------------
  function derive(r) {
    const parts = [r.id, r.profile, r.online === true ? "online" : r.online === false ? "offline" : "unknown", r.health];
    for (const k of Object.keys(r.tags || {})) parts.push(k + "=" + r.tags[k]);
    for (const m of r.models || []) parts.push(m.name + " v" + m.version, m.variant, m.backend, m.tuned ? "tuned" : "");
    const u = r.update;
    if (u) parts.push(u.state, u.model + " v" + u.version);
    if (r.error) parts.push(r.error);
    r._text = parts.join("\n").toLowerCase();
    r._tags = Object.keys(r.tags || {}).sort().map((k) => k + "=" + r.tags[k]).join(" ");
  }
  function applyRow(r) {
    const old = S.rows.get(r.id);
    if (r.rev > S.maxRev) S.maxRev = r.rev;
    if (old && old.rev >= r.rev) return false;
    derive(r);
    S.rows.set(r.id, r);
    return true;
  }
  function classify(r) {
    return (r.online === true ? "online" : "offline") + (r.health === "ok" ? "" : " " + r.health);
  }

  // --- filter and sort -----------------------------------------------------------------------
  const SORTS = {
    id: (a, b) => collator.compare(a.id, b.id),
    online: (a, b) => rank(a.online) - rank(b.online),
    profile: (a, b) => collator.compare(a.profile || "", b.profile || ""),
    tags: (a, b) => collator.compare(a._tags, b._tags),
    models: (a, b) => collator.compare(modelKey(a), modelKey(b)),
    update: (a, b) => healthRank(a) - healthRank(b) || collator.compare(a.update ? a.update.state : "", b.update ? b.update.state : ""),
    memory: (a, b) => (a.rss || 0) - (b.rss || 0),
    seen: (a, b) => (a.seen || 0) - (b.seen || 0),
  };
  function rank(online) { return online === true ? 0 : online === false ? 1 : 2; }
  function healthRank(r) { return r.health === "failed" ? 0 : r.health === "updating" ? 1 : 2; }
  function tunedText(t) {
    if (!t) return "";
    const ms = (x) => (x == null ? "–" : x.toPrecision(3) + " ms");
    return `\n  tuned on ${t.cpu_model || "this CPU"}: ${t.variant} on ${t.backend}` + (t.options ? ` (${t.options})` : "") +
      `, ${ms(t.latency_ms)}; the hub's choice ${ms(t.default_latency_ms)}` + (t.complete ? "" : " (ran out of time)");
  }
  function modelKey(r) { return (r.models || []).map((m) => m.name + " " + String(m.version).padStart(8, "0")).join(","); }
  function parseTerms(q) {
    const out = []; const re = /"([^"]+)"|(\S+)/g; let m;
    while ((m = re.exec(q.toLowerCase()))) out.push(m[1] || m[2]);
    return out;
  }
  function matches(r) {
    const f = S.filter;
    if (f === "online" && r.online !== true) return false;
    if (f === "offline" && r.online === true) return false;
    if ((f === "updating" || f === "failed") && r.health !== f) return false;
    const fc = S.facet;
    if (fc && fc.kind === "profile" && (r.profile || "") !== fc.value) return false;
    if (fc && fc.kind === "version" && !(r.models || []).some((m) => m.name === fc.model && m.version === fc.version)) return false;
    for (const t of S.terms) if (!r._text.includes(t)) return false;
    return true;
  }
  function computeOrder() {
    const cmp = SORTS[S.sort.key] || SORTS.id; const dir = S.sort.dir;
    const list = [];
    for (const r of S.rows.values()) if (matches(r)) list.push(r);
    list.sort((a, b) => (cmp(a, b) * dir) || collator.compare(a.id, b.id));
    S.order = list.map((r) => r.id);
  }

  // --- summary -------------------------------------------------------------------------------
  function renderSummary() {
    let online = 0, updating = 0, failed = 0;
    const profiles = new Map(), versions = new Map();
    for (const r of S.rows.values()) {
      if (r.online === true) online++;
      if (r.health === "updating") updating++;
      if (r.health === "failed") failed++;
      const p = r.profile || "";
      profiles.set(p, (profiles.get(p) || 0) + 1);
      for (const m of r.models || []) {
        const k = m.name + "\u0000" + m.version;
        versions.set(k, (versions.get(k) || 0) + 1);
      }
    }
    const known = S.rows.size;
    const counts = { all: known, online, offline: known - online, updating, failed };
    $("n-known").textContent = fmtN(known);
    $("n-online").textContent = fmtN(online);
    $("n-offline").textContent = fmtN(known - online);
    $("n-updating").textContent = fmtN(updating);
    $("n-failed").textContent = fmtN(failed);
    for (const b of document.querySelectorAll(".qf")) {
      let n = b.querySelector(".n");
      if (!n) { n = el("span", "n"); b.appendChild(n); }
      n.textContent = fmtN(counts[b.dataset.filter]);
    }
    const pchips = [...profiles.entries()].sort((a, b) => b[1] - a[1]).map(([p, n]) => {
      const c = el("button", "chip"); c.append(el("span", null, p || "(none)"), el("b", null, fmtN(n)));
      c.addEventListener("click", () => setFacet({ kind: "profile", value: p, label: "profile " + (p || "(none)") }));
      return c;
    });
    $("profiles").replaceChildren(...pchips.slice(0, 12));
    const released = new Set(S.releases.map((x) => x.model + "\u0000" + x.version));
    const vchips = [...versions.entries()].sort((a, b) => {
      const [am, av] = a[0].split("\u0000"), [bm, bv] = b[0].split("\u0000");
      return collator.compare(am, bm) || Number(bv) - Number(av);
    }).map(([k, n]) => {
      const [model, version] = k.split("\u0000");
      const c = el("button", "chip" + (released.has(k) ? " released" : ""));
      c.append(el("span", null, model + " v" + version), el("b", null, fmtN(n)));
      if (released.has(k)) c.title = "the fleet's current release";
      c.addEventListener("click", () => setFacet({ kind: "version", model, version: Number(version), label: model + " v" + version }));
      return c;
    });
    $("versions").replaceChildren(...(vchips.length ? vchips.slice(0, 16) : [el("span", "muted small", "no model served yet")]));
  }

  // --- the table (virtualized) ---------------------------------------------------------------
  function cellTd(cls, text, title) {
    const td = el("td", cls, text);
    if (title) td.title = title;
    return td;
  }
  function buildRow(r) {
    const tr = el("tr", "dev " + classify(r));
    tr.dataset.id = r.id;
    tr._rev = r.rev;
    tr.appendChild(cellTd("id", r.id, r.id));
    const st = el("td");
    const online = r.online === true ? "online" : r.online === false ? "offline" : "unknown";
    st.appendChild(el("span", "st " + (r.online === true ? "st-on" : "st-off"), online));
    if (r.session) st.title = "session " + r.session;
    tr.appendChild(st);
    tr.appendChild(cellTd("", r.profile || "–", r.profile));
    const tags = el("td");
    for (const t of r._tags ? r._tags.split(" ") : []) tags.appendChild(el("span", "tag", t));
    if (r._tags) tags.title = r._tags;
    tr.appendChild(tags);
    const models = el("td");
    for (const [i, m] of (r.models || []).entries()) {
      models.appendChild(el("span", "ver", (i ? ", " : "") + m.name + " v" + m.version));
      const sub = [m.variant, m.backend].filter(Boolean).join(" · ");
      if (sub) models.appendChild(el("span", "sub", sub));
      if (m.tuned) models.appendChild(el("span", "sub tuned", "tuned"));
    }
    if (!(r.models || []).length) models.textContent = "–";
    else models.title = r.models.map((m) => `${m.name} v${m.version}: ${m.variant || "–"} on ${m.backend || "–"}, ` +
      `${fmtBytes(m.memory)}` + tunedText(m.tuned)).join("\n");
    tr.appendChild(models);
    tr.appendChild(updateCell(r));
    const mem = cellTd("mem", r.rss ? fmtBytes(r.rss) + " / " + fmtBytes(r.available) : "–");
    if (r.rss) mem.title = `rss ${fmtBytes(r.rss)}, ${fmtBytes(r.available)} available`;
    tr.appendChild(mem);
    const seen = cellTd("seen", ago(r.seen), when(r.seen));
    tr._seen = seen;
    tr.appendChild(seen);
    return tr;
  }
  function updateCell(r) {
    const td = el("td", "upd");
    const u = r.update;
    const title = [];
    if (u) {
      td.appendChild(badge(u.state));
      td.appendChild(document.createTextNode(" " + u.model + " v" + u.version));
      if (u.state === "downloading" && typeof u.progress === "number") {
        const bar = el("span", "prog"); const fill = el("span");
        fill.style.width = Math.round(Math.max(0, Math.min(1, u.progress)) * 100) + "%";
        bar.appendChild(fill); td.appendChild(bar);
        td.appendChild(document.createTextNode(Math.round(u.progress * 100) + "%"));
      }
      title.push(`${u.model} v${u.version}: ${u.state}`, u.detail || "");
    }
    if (r.error) {
      td.appendChild(el("span", "err", r.error));
      title.push("error: " + r.error);
    }
    if (!u && !r.error) td.textContent = "–";
    const t = title.filter(Boolean).join("\n");
    if (t) td.title = t;
    return td;
  }
  function spacer() {
    const tr = el("tr", "spacer"); const td = el("td"); td.colSpan = COLS; tr.appendChild(td); tr._td = td; return tr;
  }
  const topSpacer = spacer(), bottomSpacer = spacer();
  function setSpacer(sp, px) { sp._td.style.height = px + "px"; sp.hidden = px <= 0; }

  function renderWindow() {
    const wrap = $("table-wrap");
    const headH = wrap.querySelector("thead").offsetHeight;
    const n = S.order.length;
    const visible = Math.ceil(wrap.clientHeight / S.rowH) + 1;
    const first = Math.floor(Math.max(0, wrap.scrollTop - headH) / S.rowH);
    const start = Math.max(0, Math.min(first - OVERSCAN, n - visible - OVERSCAN));
    const end = Math.min(n, start + Math.min(MAX_ROWS, visible + 2 * OVERSCAN));
    const keep = new Map(); const nodes = [];
    for (let i = Math.max(0, start); i < end; i++) {
      const id = S.order[i]; const r = S.rows.get(id);
      let tr = S.mounted.get(id);
      if (!tr || tr._rev !== r.rev) tr = buildRow(r);
      keep.set(id, tr); nodes.push(tr);
    }
    setSpacer(topSpacer, Math.max(0, start) * S.rowH);
    setSpacer(bottomSpacer, (n - end) * S.rowH);
    $("rows").replaceChildren(topSpacer, ...nodes, bottomSpacer);
    S.mounted = keep;
    if (!S.measured && nodes.length) {
      const h = nodes[0].getBoundingClientRect().height;
      S.measured = true;
      if (h > 0 && Math.abs(h - S.rowH) > 0.5) { S.rowH = h; renderWindow(); return; }
    }
    $("empty").hidden = n > 0 || !S.loaded;
    const total = S.rows.size;
    $("shown").textContent = n === total ? `${fmtN(total)} devices` : `${fmtN(n)} of ${fmtN(total)} devices`;
    if (!S.painted && nodes.length) {
      S.painted = true;
      performance.mark("edgerun:rows");
      requestAnimationFrame(() => setTimeout(() => {
        performance.mark("edgerun:painted");
        document.documentElement.dataset.ready = "1";
      }, 0));
    }
  }

  let frame = 0, dirty = { order: false, summary: false, rollouts: false };
  function schedule(what) {
    Object.assign(dirty, what);
    if (!frame) frame = requestAnimationFrame(flushFrame);
  }
  function flushFrame() {
    frame = 0;
    const d = dirty; dirty = { order: false, summary: false, rollouts: false };
    if (d.summary) renderSummary();
    if (d.order) computeOrder();
    renderWindow();
    if (d.rollouts) renderRollouts();
  }
  function refreshAgo() {
    for (const tr of S.mounted.values()) {
      const r = S.rows.get(tr.dataset.id);
      if (r && tr._seen) tr._seen.textContent = ago(r.seen);
    }
  }

  // --- filters, sort, facets, URL ------------------------------------------------------------
  function setFilter(f) {
    S.filter = f;
    for (const b of document.querySelectorAll(".qf")) b.setAttribute("aria-pressed", String(b.dataset.filter === f));
    for (const b of document.querySelectorAll(".stat")) b.setAttribute("aria-pressed", String(b.dataset.filter === f && f !== "all"));
    $("table-wrap").scrollTop = 0;
    saveHash(); schedule({ order: true });
  }
  function setFacet(fc) {
    S.facet = fc;
    const box = $("facet");
    box.hidden = !fc;
    if (fc) {
      const x = el("button", null, "×"); x.title = "clear"; x.setAttribute("aria-label", "clear " + fc.label);
      x.addEventListener("click", () => setFacet(null));
      box.replaceChildren(el("span", null, fc.label), x);
    }
    $("table-wrap").scrollTop = 0;
    schedule({ order: true });
  }
  function setQuery(q) {
    S.query = q; S.terms = parseTerms(q);
    $("table-wrap").scrollTop = 0;
    saveHash(); schedule({ order: true });
  }
  function setSort(key) {
    S.sort = S.sort.key === key ? { key, dir: -S.sort.dir } : { key, dir: 1 };
    for (const th of document.querySelectorAll("thead th")) {
      th.setAttribute("aria-sort", th.dataset.key === key ? (S.sort.dir > 0 ? "ascending" : "descending") : "none");
    }
    saveHash(); schedule({ order: true });
  }
  function saveHash() {
    const p = new URLSearchParams();
    if (S.query) p.set("q", S.query);
    if (S.filter !== "all") p.set("f", S.filter);
    if (S.sort.key !== "id" || S.sort.dir !== 1) p.set("s", (S.sort.dir < 0 ? "-" : "") + S.sort.key);
    const h = p.toString();
    history.replaceState(null, "", location.pathname + location.search + (h ? "#" + h : ""));
  }
  function loadHash() {
    const p = new URLSearchParams(location.hash.slice(1));
    S.query = p.get("q") || ""; S.terms = parseTerms(S.query); $("search").value = S.query;
    const f = p.get("f");
    if (f && ["online", "offline", "updating", "failed"].includes(f)) S.filter = f;
    const s = p.get("s");
    if (s && SORTS[s.replace(/^-/, "")]) S.sort = { key: s.replace(/^-/, ""), dir: s.startsWith("-") ? -1 : 1 };
    for (const b of document.querySelectorAll(".qf")) b.setAttribute("aria-pressed", String(b.dataset.filter === S.filter));
    for (const th of document.querySelectorAll("thead th")) {
      th.setAttribute("aria-sort", th.dataset.key === S.sort.key ? (S.sort.dir > 0 ? "ascending" : "descending") : "none");
    }
  }

  // --- events --------------------------------------------------------------------------------
  function eventItem(e, fresh) {
    const li = el("li", "ev" + (e.failed ? " ev-failed" : "") + (fresh ? " ev-new" : ""));
    li.dataset.seq = e.seq;
    const t = el("time", "ev-time", clock(e.received)); t.title = when(e.received);
    const main = el("div", "ev-main");
    const dev = el("button", "ev-dev", e.device); dev.title = "show " + e.device;
    dev.addEventListener("click", () => { $("search").value = e.device; setQuery(e.device); });
    main.append(dev, el("span", "ver", e.model + " v" + e.version), badge(e.state));
    li.append(t, main);
    if (e.detail) { const d = el("div", "ev-detail", e.detail); d.title = e.detail; li.appendChild(d); }
    return li;
  }
  function showEvents() { S.eventsShown = true; renderEvents(); }
  function renderEvents() {
    if (!S.eventsShown) return;
    $("events").replaceChildren(...S.events.map((e) => eventItem(e, false)));
    $("n-events").textContent = S.events.length ? `last ${S.events.length}` : "none yet";
  }
  function addEvents(list) {
    const fresh = list.filter((e) => e.seq > S.maxSeq).sort((a, b) => a.seq - b.seq);
    if (!fresh.length) return;
    S.maxSeq = fresh[fresh.length - 1].seq;
    if (!S.eventsShown) { S.events = fresh.reverse().concat(S.events).slice(0, MAX_EVENTS); return; }
    const ol = $("events");
    for (const e of fresh) { S.events.unshift(e); ol.insertBefore(eventItem(e, true), ol.firstChild); }
    S.events.length = Math.min(S.events.length, MAX_EVENTS);
    while (ol.children.length > MAX_EVENTS) ol.lastChild.remove();
    $("n-events").textContent = `last ${S.events.length}`;
  }

  // --- rollouts ------------------------------------------------------------------------------
  const SEGMENTS = [
    ["active", ["active"]], ["failed", ["failed", "timed_out"]], ["updating", ["updating"]],
    ["reverting", ["reverting", "reverted", "kept", "revert_timed_out"]], ["pending", ["pending"]],
  ];
  function grouped(c) {
    const out = {};
    for (const [name, states] of SEGMENTS) out[name] = states.reduce((n, s) => n + (c[s] || 0), 0);
    return out;
  }
  function countsText(g) { return SEGMENTS.filter(([n]) => g[n]).map(([n]) => `${g[n]} ${n}`).join(", "); }
  function applyRollout(r) {
    const old = S.rollouts.get(r.id);
    if (Number.isInteger(r.rev) && r.rev > S.maxRev) S.maxRev = r.rev;
    if (old && old.rev >= r.rev) return false;
    S.rollouts.set(r.id, r);
    return true;
  }
  function rolloutCard(r) {
    const card = el("div", "rollout"); card.dataset.id = r.id; card._rev = r.rev;
    const head = el("div", "ro-head");
    const title = el("span", "ro-title", "#" + r.id + " ");
    title.appendChild(el("span", "ver", r.model + " v" + r.version));
    const where = `stage ${Math.min(r.stage + 1, r.stages)} of ${r.stages} · ${fmtN(r.devices)} devices`;
    head.append(title, badge(r.state), el("span", "ro-stage", where));
    card.appendChild(head);
    if (r.request) card.appendChild(el("p", "ro-note", `${r.request} requested — waiting for the hub running the rollout`));
    if (!r.runner_alive) {
      card.appendChild(el("p", "ro-note", `no hub is running it now (runner ${r.runner || "–"}); ` +
        `\`edgerun hub rollout resume ${r.id}\` picks it up`));
    }
    if (r.reason) card.appendChild(el("p", "ro-reason", r.reason));
    const stages = el("div", "stages");
    stages.setAttribute("aria-label", "stages");
    for (let i = 0; i < r.stages; i++) {
      const c = r.stage_counts[i] || {}; const g = grouped(c);
      const total = Object.values(c).reduce((a, b) => a + b, 0) || 1;
      const st = el("div", "stage" + (i === r.stage && r.in_progress ? " current" : ""));
      st.style.flexGrow = String(total); st.style.flexBasis = "0";
      st.dataset.stage = i;
      const bar = el("div", "stage-bar");
      for (const [name] of SEGMENTS) {
        if (!g[name]) continue;
        const seg = el("span", "seg seg-" + name);
        seg.dataset.count = g[name];
        seg.style.width = (g[name] / total * 100) + "%";
        bar.appendChild(seg);
      }
      const label = i === 0 && r.plan && r.plan.canary ? "canary" : String(i + 1);
      st.title = (label === "canary" ? label : "stage " + label) + ": " + countsText(g);
      st.append(bar, el("span", "stage-label", label));
      stages.appendChild(st);
    }
    card.appendChild(stages);
    const legend = el("div", "legend"); const g = grouped(r.counts || {});
    for (const [name] of SEGMENTS) {
      if (!g[name]) continue;
      const item = el("span"); const sw = el("i", "seg-" + name);
      item.append(sw, document.createTextNode(`${fmtN(g[name])} ${name}`));
      legend.appendChild(item);
    }
    card.appendChild(legend);
    const actions = el("div", "ro-actions");
    const mk = (label, action, enabled, cls) => {
      const b = el("button", "btn" + (cls ? " " + cls : ""), label);
      b.dataset.action = action; b.disabled = !enabled;
      b.addEventListener("click", () => act(r, action, card));
      return b;
    };
    const busy = !!r.request;
    actions.append(
      mk("Pause", "pause", r.state === "running" && !busy),
      mk("Resume", "resume", r.state === "paused" && !busy),
      mk("Abort", "abort", (r.state === "running" || r.state === "paused") && r.request !== "abort", "btn-danger"));
    const more = el("button", "btn-link", "details"); more.addEventListener("click", () => openRollout(r.id));
    actions.appendChild(more);
    card.appendChild(actions);
    return card;
  }
  function renderRollouts() {
    const list = [...S.rollouts.values()].sort((a, b) => b.id - a.id);
    const active = list.filter((r) => r.in_progress), past = list.filter((r) => !r.in_progress);
    const box = $("rollouts");
    const cards = new Map([...box.children].map((c) => [Number(c.dataset.id), c]));
    box.replaceChildren(...active.map((r) => { const c = cards.get(r.id); return c && c._rev === r.rev ? c : rolloutCard(r); }));
    $("no-rollouts").hidden = active.length > 0;
    $("past-rollouts").hidden = past.length === 0;
    $("past-list").replaceChildren(...past.map((r) => {
      const li = el("li");
      const g = grouped(r.counts || {});
      li.append(el("span", "ver", `#${r.id} ${r.model} v${r.version}`), badge(r.state),
        el("span", "muted small", countsText(g)));
      const more = el("button", "btn-link", "details"); more.addEventListener("click", () => openRollout(r.id));
      li.appendChild(more);
      return li;
    }));
  }
  async function act(r, action, card) {
    if (action === "abort" && !window.confirm(`Abort rollout #${r.id} of ${r.model} v${r.version}?\n\n` +
      "Every device it updated goes back to the version it served before.")) return;
    for (const b of card.querySelectorAll("button[data-action]")) b.disabled = true;
    let message = null;
    try {
      const res = await api(`/api/rollouts/${r.id}/${action}`, { method: "POST", headers: { "X-Edgerun-Dashboard": "1" } });
      const body = await res.json().catch(() => ({}));
      if (res.status === 401) { showLogin("The token is no longer accepted."); return; }
      if (!res.ok) message = body.error || `HTTP ${res.status}`;
      else { body.rev = (S.rollouts.get(r.id) || r).rev + 0.5; applyRollout(body); }
    } catch (e) { message = "the hub did not answer: " + e.message; }
    renderRollouts();
    if (message) {
      const c = $("rollouts").querySelector(`.rollout[data-id="${Number(r.id)}"]`);
      if (c) c.appendChild(el("p", "ro-reason", message));
    }
  }
  async function openRollout(id) {
    const dlg = $("rollout-dialog");
    $("rd-title").textContent = "Rollout #" + id;
    $("rd-body").replaceChildren(el("p", "muted", "loading…"));
    if (!dlg.open) dlg.showModal();
    let d;
    try {
      const res = await api(`/api/rollouts/${Number(id)}`);
      d = await res.json();
      if (!res.ok) throw new Error(d.error || res.status);
    } catch (e) { $("rd-body").replaceChildren(el("p", "error-text", String(e.message || e))); return; }
    const r = d.rollout;
    $("rd-title").textContent = `Rollout #${r.id}: ${r.model} v${r.version}`;
    const body = [];
    const p = r.plan || {};
    body.push(el("p", null, `${r.state} · stage ${Math.min(r.stage + 1, r.stages)} of ${r.stages} · canary ${p.canary}, ` +
      `steps of ${p.step}, bake ${p.bake}s, abort above ${p.max_failures} ` +
      (String(p.max_failures).endsWith("%") ? "of the finished devices" : "failures") +
      ` · started ${when(r.created_at)} by ${r.created_by}`));
    if (r.reason) body.push(el("p", "ro-reason", r.reason));
    body.push(el("h3", null, `devices (${d.devices.length})`));
    const t = el("table", "mini");
    const hr = el("tr"); for (const h of ["device", "stage", "state", "before", "detail"]) hr.appendChild(el("th", null, h));
    t.appendChild(hr);
    const shown = d.devices.slice().sort((a, b) => (a.state === "pending") - (b.state === "pending")).slice(0, 200);
    for (const dv of shown) {
      const tr = el("tr");
      const st = el("td"); st.appendChild(badge(dv.state));
      tr.append(el("td", "ver", dv.device), el("td", null, dv.stage + 1), st,
        el("td", null, dv.before_version ? "v" + dv.before_version : "–"), el("td", "wrap", dv.detail || ""));
      t.appendChild(tr);
    }
    body.push(t);
    if (d.devices.length > shown.length) body.push(el("p", "muted small", `and ${d.devices.length - shown.length} more`));
    body.push(el("h3", null, "log"));
    const log = el("ol", "log");
    for (const line of d.log.slice(-50)) {
      const li = el("li"); li.append(el("time", null, when(line.ts)), document.createTextNode(line.message)); log.appendChild(li);
    }
    body.push(log);
    $("rd-body").replaceChildren(...body);
  }

  // --- snapshot and stream -------------------------------------------------------------------
  function setLive(kind, text) {
    const live = $("live");
    live.className = "live live-" + kind;
    $("live-text").textContent = text;
  }
  function setHub(h) {
    const box = $("hub-status");
    const parts = [];
    if (h.broker) parts.push(`broker ${h.broker} ${h.connected ? "connected" : "unreachable"}`);
    if (h.registry_error) parts.push("registry: " + h.registry_error);
    box.textContent = parts.join(" · ");
    box.classList.toggle("bad", !h.connected || !!h.registry_error);
  }
  async function loadSnapshot(gen) {
    const res = await api("/api/fleet");
    if (gen !== S.gen) return;
    if (res.status === 401) { showLogin(sessionStorage.getItem(TOKEN_KEY) ? "That token was not accepted." : null); return; }
    if (!res.ok) throw new Error("HTTP " + res.status);
    const snap = await res.json();
    if (gen !== S.gen) return;
    if (snap.instance !== S.instance) {  // a restarted hub counts revisions afresh: start over from its snapshot
      S.instance = snap.instance; S.rows = new Map(); S.rollouts = new Map(); S.events = [];
      S.maxRev = 0; S.maxSeq = 0; S.mounted = new Map();
    }
    $("fleet-name").textContent = snap.fleet;
    document.title = `edgerun · ${snap.fleet}`;
    S.releases = snap.releases || [];
    for (const r of snap.devices) applyRow(r);
    const ids = new Set(snap.rollouts.map((r) => r.id));
    for (const id of [...S.rollouts.keys()]) if (!ids.has(id)) S.rollouts.delete(id);
    for (const r of snap.rollouts) applyRollout(r);
    const newer = S.events.filter((e) => e.seq > snap.event_seq);
    S.events = newer.concat(snap.events.slice().reverse()).slice(0, MAX_EVENTS);
    S.maxSeq = Math.max(S.maxSeq, snap.event_seq);
    S.maxRev = Math.max(S.maxRev, snap.rev);
    setHub(snap.hub || {});
    S.loaded = true;
    renderSummary(); computeOrder(); renderWindow(); renderRollouts();
    if (S.painted && !S.eventsShown) requestAnimationFrame(() => setTimeout(showEvents, 0));  // after the table's frame
    else showEvents();
    resyncIfBehind(gen);
  }
  function resyncIfBehind(gen) {
    const h = S.hello;
    if (!S.loaded || !h || S.syncing) return;
    if (h.instance !== S.instance || h.rev > S.maxRev || h.event_seq > S.maxSeq) {  // a gap in what we saw
      S.syncing = true;
      loadSnapshot(gen).catch(() => {}).finally(() => { S.syncing = false; });
    }
  }
  function handle(event, data, gen) {
    if (event === "hello") {
      setLive("on", "live");
      S.hello = data;
      resyncIfBehind(gen);
    } else if (S.hello && S.hello.instance !== S.instance) {
      return;  // from a hub restarted since the snapshot: its snapshot, being loaded, has it
    } else if (event === "device") {
      let changed = false;
      for (const r of data) changed = applyRow(r) || changed;
      if (changed) schedule({ order: true, summary: true });
    } else if (event === "event") {
      addEvents(data);
    } else if (event === "rollout") {
      let changed = false;
      for (const r of data) changed = applyRollout(r) || changed;
      if (changed) schedule({ rollouts: true });
    } else if (event === "hub") {
      setHub(data);
    }
  }
  function parseBlock(block, gen) {
    let event = "message"; const data = [];
    for (const line of block.split("\n")) {
      if (!line || line[0] === ":") continue;
      const i = line.indexOf(":");
      const field = i < 0 ? line : line.slice(0, i);
      let value = i < 0 ? "" : line.slice(i + 1);
      if (value[0] === " ") value = value.slice(1);
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
    }
    if (!data.length) return;
    let parsed;
    try { parsed = JSON.parse(data.join("\n")); } catch (e) { return; }
    handle(event, parsed, gen);
  }
  async function streamLoop(gen) {
    let attempt = 0;
    while (gen === S.gen) {
      const ctrl = new AbortController();
      let stall = 0;
      const kick = () => { clearTimeout(stall); stall = setTimeout(() => ctrl.abort(), STALL_MS); };
      try {
        const res = await fetch("/api/stream", { headers: headers(), cache: "no-store", signal: ctrl.signal });
        if (res.status === 401) { showLogin("The token is no longer accepted."); return; }
        if (!res.ok || !res.body) throw new Error("HTTP " + res.status);
        const reader = res.body.getReader(); const dec = new TextDecoder();
        let buf = "";
        kick();
        for (;;) {
          const { value, done } = await reader.read();
          if (done || gen !== S.gen) break;
          kick(); attempt = 0;
          buf = (buf + dec.decode(value, { stream: true })).replace(/\r\n/g, "\n");
          let i;
          while ((i = buf.indexOf("\n\n")) >= 0) { parseBlock(buf.slice(0, i), gen); buf = buf.slice(i + 2); }
        }
      } catch (e) { /* the network failed or the stall timer fired: reconnect */ }
      clearTimeout(stall);
      if (gen !== S.gen) return;
      attempt++;
      const wait = Math.min(10000, 500 * 2 ** Math.min(attempt - 1, 5));
      setLive("down", `disconnected · retrying in ${Math.ceil(wait / 1000)}s`);
      await sleep(wait);
      setLive("connecting", "reconnecting");
    }
  }
  function start() {
    const gen = ++S.gen;
    $("login").hidden = true; $("main").hidden = false;
    setLive("connecting", "connecting");
    streamLoop(gen);
    loadSnapshot(gen).catch((e) => { if (gen === S.gen) setLive("down", "the hub did not answer: " + e.message); });
  }

  // --- wiring --------------------------------------------------------------------------------
  function wire() {
    const search = $("search");
    let typing = 0;
    search.addEventListener("input", () => {
      clearTimeout(typing);
      typing = setTimeout(() => setQuery(search.value), 80);
    });
    search.addEventListener("keydown", (e) => {
      if (e.key === "Escape") { search.value = ""; setQuery(""); }
    });
    document.addEventListener("keydown", (e) => {
      if (e.key === "/" && document.activeElement !== search && !$("rollout-dialog").open) {
        e.preventDefault();
        search.focus();
      }
    });
    for (const b of document.querySelectorAll(".qf, .stat")) b.addEventListener("click", () => setFilter(b.dataset.filter));
    for (const th of document.querySelectorAll("thead th")) {
      th.querySelector("button").addEventListener("click", () => setSort(th.dataset.key));
    }
    let scrolling = 0;
    $("table-wrap").addEventListener("scroll", () => {
      if (!scrolling) scrolling = requestAnimationFrame(() => { scrolling = 0; renderWindow(); });
    }, { passive: true });
    window.addEventListener("resize", () => schedule({}));
    $("rd-close").addEventListener("click", () => $("rollout-dialog").close());
    $("login-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const v = $("login-token").value.trim();
      if (!v) return;
      sessionStorage.setItem(TOKEN_KEY, v);
      $("login-token").value = "";
      start();
    });
    setInterval(refreshAgo, 5000);
  }

  takeTokenFromUrl();
  loadHash();
  wire();
  start();
})();
