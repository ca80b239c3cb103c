// raftkv live dashboard.
//
// The server pushes a whole cluster snapshot about four times a second over
// server-sent events (see docs/dashboard.md). The page keeps almost no state of
// its own: every snapshot is drawn from scratch, except for the few things a
// snapshot cannot carry (sparkline history) and the DOM we keep on purpose so
// that clicks are not lost (member cards, the network drawing, the scenario
// list are built once and then only updated in place).
"use strict";

(function () {
  const HISTORY = 120; // sparkline points kept in the page (~30 s at 4 updates/s)
  const LOG_COLS = 60; // log strip width in entries; the server sends <= 60 per member
  const API = "/dashboard/api/";

  // The controls obey only a page that holds this run's token: `raftkv cluster` prints
  // it in the URL's fragment (never sent to a server). Kept for the tab's life, so a
  // reload still works, and taken out of the address bar so it is not shared by a
  // screenshot or a copied link.
  const TOKEN_KEY = "raftkv-dashboard-token";
  const TOKEN = (function () {
    const m = /(?:^#|&)token=([0-9A-Za-z]+)/.exec(location.hash);
    let t = "";
    try {
      if (m) sessionStorage.setItem(TOKEN_KEY, m[1]);
      t = sessionStorage.getItem(TOKEN_KEY) || "";
    } catch (e) {
      // storage refused (private mode): keep the one from the URL, if any
    }
    if (m) {
      t = t || m[1];
      window.history.replaceState(null, "", location.pathname + location.search);
    }
    return t;
  })();

  const $ = (id) => document.getElementById(id);

  // Everything that comes from the JSON and goes into innerHTML passes here.
  function esc(v) {
    return String(v == null ? "" : v)
      .replace(/&/g, "&amp;")
      .replace(/</g, "&lt;")
      .replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;")
      .replace(/'/g, "&#39;");
  }

  // ---------------------------------------------------------------- formatting

  function fmtRate(x) {
    if (x == null || !isFinite(x)) return "–";
    if (x >= 10000) return (x / 1000).toFixed(0) + "k";
    if (x >= 1000) return (x / 1000).toFixed(1) + "k";
    if (x >= 10) return Math.round(x).toString();
    return x.toFixed(1);
  }

  function fmtMs(x) {
    if (x == null || !isFinite(x)) return "–";
    if (x < 1) return x.toFixed(2);
    if (x < 10) return x.toFixed(1);
    return Math.round(x).toString();
  }

  function fmtBytes(n) {
    if (n == null || !isFinite(n)) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) {
      n /= 1024;
      i++;
    }
    return (i === 0 ? n.toFixed(0) : n < 10 ? n.toFixed(1) : n.toFixed(0)) + " " + units[i];
  }

  function pad(n, w) {
    return String(n).padStart(w, "0");
  }

  // HH:MM:SS.mmm in the viewer's local time.
  function fmtClock(ms) {
    const d = new Date(ms);
    return pad(d.getHours(), 2) + ":" + pad(d.getMinutes(), 2) + ":" + pad(d.getSeconds(), 2) + "." + pad(d.getMilliseconds(), 3);
  }

  function latText(p50, p99) {
    if (p50 == null && p99 == null) return "";
    return "p50 " + fmtMs(p50) + " · p99 " + fmtMs(p99) + " ms";
  }

  // A stable colour per term number: the golden angle spreads consecutive terms
  // far apart on the hue wheel, so term 4 and term 5 never look alike.
  function termColour(term) {
    const hue = (term * 137.508 + 205) % 360;
    return "hsl(" + hue.toFixed(1) + ",62%,47%)";
  }

  // The contract's data-role: the Raft role, unless the member is killed or
  // could not be polled, which matters more to whoever is looking.
  function displayRole(m) {
    if (m.process === "killed") return "killed";
    if (!m.reachable) return "unreachable";
    return m.role;
  }

  // ------------------------------------------------------------------ controls

  let snap = null; // the latest snapshot
  let controls = false;
  const inFlight = new Set();

  let toastTimer = 0;
  function toast(text, kind) {
    const el = $("toast");
    el.textContent = text;
    el.className = "toast " + (kind || "error");
    el.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => {
      el.hidden = true;
    }, 4500);
  }

  async function post(path, label, btn) {
    if (!controls) return;
    if (inFlight.has(path)) return; // a double click should not kill twice
    inFlight.add(path);
    if (btn) btn.classList.add("busy");
    try {
      const resp = await fetch(API + path, {
        method: "POST",
        headers: { "X-Raftkv-Token": TOKEN },
      });
      if (!resp.ok) {
        const text = (await resp.text()).trim();
        toast(label + " failed (" + resp.status + "): " + (text || resp.statusText));
      }
    } catch (err) {
      toast(label + " failed: " + (err && err.message ? err.message : err));
    } finally {
      inFlight.delete(path);
      if (btn) btn.classList.remove("busy");
    }
  }

  const enc = encodeURIComponent;

  // One listener for the whole page: the parts that are re-rendered keep
  // working because nothing is bound to the elements themselves.
  document.addEventListener("click", (ev) => {
    const t = ev.target;
    if (!(t instanceof Element)) return;

    const link = t.closest("[data-link]");
    if (link) {
      const a = link.getAttribute("data-a");
      const b = link.getAttribute("data-b");
      // There is no per-link heal endpoint: healing a cut link heals every cut.
      if (link.classList.contains("cut")) post("heal", "heal", null);
      else post("cut/" + enc(a) + "/" + enc(b), "cut " + a + "–" + b, null);
      return;
    }

    const btn = t.closest("button");
    if (!btn || btn.disabled) return;

    if (btn.id === "load-toggle") {
      const running = !!(snap && snap.load && snap.load.running);
      post(running ? "load/stop" : "load/start", running ? "stop load" : "start load", btn);
    } else if (btn.id === "heal-all") {
      post("heal", "heal", btn);
    } else if (btn.id === "scenario-next") {
      post("scenario/next", "next step", btn);
    } else if (btn.id === "scenario-stop") {
      post("scenario/stop", "stop scenario", btn);
    } else if (btn.hasAttribute("data-scenario")) {
      const id = btn.getAttribute("data-scenario");
      post("scenario/" + enc(id) + "/start", "start " + id, btn);
    } else if (btn.hasAttribute("data-action") && btn.hasAttribute("data-target")) {
      const action = btn.getAttribute("data-action");
      const name = btn.getAttribute("data-target");
      post("member/" + enc(name) + "/" + enc(action), action + " " + name, btn);
    }
  });

  // -------------------------------------------------------------------- header

  function renderHeader(s) {
    const c = s.cluster || {};
    const leader = $("leader");
    leader.textContent = c.leader || "none";
    leader.parentElement.classList.toggle("no-leader", !c.leader);
    $("term").textContent = c.term != null ? c.term : "–";
    $("leader-changes").textContent = c.leader_changes != null ? c.leader_changes : "–";
    $("writes").textContent = fmtRate(c.writes_per_s);
    $("reads").textContent = fmtRate(c.reads_per_s);
    $("write-lat").textContent = latText(c.write_p50_ms, c.write_p99_ms);
    $("read-lat").textContent = latText(c.read_p50_ms, c.read_p99_ms);

    const load = s.load;
    const running = !!(load && load.running);
    const lt = $("load-toggle");
    lt.hidden = !controls;
    lt.textContent = running ? "Stop load" : "Start load";
    lt.classList.toggle("on", running);
    const ls = $("load-stats");
    if (running) {
      // Two short lines so the header never wraps at 1280 px.
      ls.innerHTML =
        "<span>load <b>on</b> · ok " + esc(fmtRate(load.ok_per_s)) + "/s · " +
        '<span class="' + (load.errors_per_s > 0 ? "err" : "") + '">err ' + esc(fmtRate(load.errors_per_s)) + "/s</span></span>" +
        (load.p50_ms != null || load.p99_ms != null ? "<span>" + esc(latText(load.p50_ms, load.p99_ms)) + "</span>" : "");
    } else {
      ls.textContent = "load off";
    }
  }

  // -------------------------------------------------------------- member cards

  const ACTIONS = ["kill", "restart", "pause", "resume", "isolate"];
  let cardsKey = "";
  const cards = new Map(); // name -> {root, fields}

  // Cards are built once per member set so buttons are never replaced under
  // the pointer (a click is lost if mousedown and mouseup hit different nodes).
  function buildCards(members) {
    const html = members
      .map((m) => {
        const n = esc(m.name);
        const buttons = controls
          ? '<div class="m-actions">' +
            ACTIONS.map((a) => '<button type="button" class="btn small act-' + a + '" data-action="' + a + '" data-target="' + n + '">' + a + "</button>").join("") +
            "</div>"
          : "";
        return (
          '<article class="card" data-member="' + n + '" data-role="">' +
          '<header class="card-head"><span class="m-name">' + n + "</span>" +
          '<span class="badge role" data-f="role"></span>' +
          '<span class="badge proc" data-f="proc" hidden></span></header>' +
          '<div class="m-id" data-f="id"></div>' +
          '<dl class="kv">' +
          '<div><dt>term</dt><dd data-f="term"></dd></div>' +
          '<div><dt>leader</dt><dd data-f="leader"></dd></div>' +
          '<div><dt>revision</dt><dd data-f="rev"></dd></div>' +
          '<div><dt>last</dt><dd data-f="last"></dd></div>' +
          '<div><dt>commit</dt><dd data-f="commit"></dd></div>' +
          '<div><dt>applied</dt><dd data-f="applied"></dd></div>' +
          '<div><dt>snapshot</dt><dd data-f="snap"></dd></div>' +
          '<div><dt>WAL</dt><dd data-f="wal"></dd></div>' +
          '<div><dt>w/s · r/s</dt><dd data-f="rates"></dd></div>' +
          "</dl>" +
          '<div class="m-flags" data-f="flags"></div>' +
          buttons +
          "</article>"
        );
      })
      .join("");
    const box = $("members");
    box.innerHTML = html;
    cards.clear();
    box.querySelectorAll(".card").forEach((root) => {
      const fields = {};
      root.querySelectorAll("[data-f]").forEach((el) => {
        fields[el.getAttribute("data-f")] = el;
      });
      cards.set(root.getAttribute("data-member"), { root, fields, last: {} });
    });
  }

  // Only touch the DOM when a value actually changed.
  function setText(card, key, text) {
    if (card.last[key] !== text) {
      card.last[key] = text;
      card.fields[key].textContent = text;
    }
  }
  function setHTML(card, key, html) {
    if (card.last[key] !== html) {
      card.last[key] = html;
      card.fields[key].innerHTML = html;
    }
  }

  function renderMembers(s) {
    const members = s.members || [];
    const key = (controls ? "c|" : "r|") + members.map((m) => m.name).join("\u0000");
    if (key !== cardsKey) {
      cardsKey = key;
      buildCards(members);
    }
    const c = s.cluster || {};
    const leaderM = members.find((m) => m.name === c.leader && m.reachable);
    const leaderCommit = leaderM ? leaderM.commit : null;

    for (const m of members) {
      const card = cards.get(m.name);
      if (!card) continue;
      const root = card.root;
      const dr = displayRole(m);
      if (root.getAttribute("data-role") !== dr) root.setAttribute("data-role", dr);
      root.classList.toggle("is-leader", m.role === "leader" && m.reachable && m.process !== "killed");
      root.classList.toggle("is-killed", m.process === "killed" || m.process === "exited");
      root.classList.toggle("is-paused", m.process === "paused");
      root.classList.toggle("is-unreachable", !m.reachable);
      root.classList.toggle("is-candidate", m.reachable && (m.role === "candidate" || m.role === "pre-candidate"));

      // A member we cannot reach shows its last known role, greyed: a killed
      // leader must not still look like the leader.
      const stale = !m.reachable || m.process === "killed" || m.process === "exited";
      setText(card, "role", m.role);
      card.fields.role.className = "badge role " + (stale ? "r-stale" : "r-" + m.role);
      card.fields.role.title = stale ? "last known role" : "";

      let proc = "";
      if (m.process === "killed") proc = "killed";
      else if (m.process === "paused") proc = "paused";
      else if (m.process === "exited") proc = "exited";
      else if (!m.reachable) proc = "unreachable";
      setText(card, "proc", proc);
      card.fields.proc.hidden = !proc;
      card.fields.proc.className = "badge proc p-" + proc;

      setText(card, "id", m.id || "");
      setText(card, "term", String(m.term));
      card.fields.term.classList.toggle("hot", c.term != null && m.term > c.term);
      setText(card, "leader", m.leader || "none");
      setText(card, "rev", String(m.revision));
      setText(card, "last", String(m.last_index));
      const lag = leaderCommit != null && m.commit < leaderCommit ? leaderCommit - m.commit : 0;
      setHTML(card, "commit", esc(m.commit) + (lag > 0 ? ' <span class="lag" title="behind the leader\'s commit">−' + esc(lag) + "</span>" : ""));
      setText(card, "applied", String(m.applied));
      setText(card, "snap", String(m.snapshot_index));
      setText(card, "wal", fmtBytes(m.wal_bytes));
      setText(card, "rates", fmtRate(m.writes_per_s) + " · " + fmtRate(m.reads_per_s));

      let flags = '<span class="chip ' + (m.learner ? "learner" : "voter") + '">' + (m.learner ? "learner" : "voter") + "</span>";
      flags += m.healthy ? '<span class="chip ok">healthy</span>' : '<span class="chip bad">unhealthy</span>';
      for (const a of m.alarms || []) flags += '<span class="chip bad">alarm ' + esc(a) + "</span>";
      if (m.cut_from && m.cut_from.length) {
        flags += '<span class="chip cutchip" title="this member drops messages from these members">drops ' + m.cut_from.map(esc).join(", ") + "</span>";
      }
      setHTML(card, "flags", flags);

      // Emphasise the button that undoes the current fault; all stay enabled
      // so the server, not the page, decides what is allowed.
      if (controls) {
        const down = m.process === "killed" || m.process === "exited";
        root.querySelector(".act-restart").classList.toggle("suggest", down);
        root.querySelector(".act-resume").classList.toggle("suggest", m.process === "paused");
      }
    }
  }

  // ----------------------------------------------------------------- log strips

  const CELL = 12; // viewBox units per column
  const GAP = 2;

  let lastLogsHTML = "";

  function renderLogs(s) {
    const members = s.members || [];
    // Window: the last LOG_COLS indices up to the newest entry any member has,
    // so index i is the same column in every row.
    let maxIdx = 0;
    for (const m of members) {
      const log = m.log || [];
      const last = log.length ? log[log.length - 1].index : 0;
      maxIdx = Math.max(maxIdx, last, m.last_index || 0);
    }
    const start = Math.max(1, maxIdx - LOG_COLS + 1);
    const end = start + LOG_COLS - 1;
    const W = LOG_COLS * CELL;

    // Term per index per member, to flag columns where members disagree.
    const byIdx = new Map();
    const terms = new Set();
    for (const m of members) {
      for (const e of m.log || []) {
        if (e.index < start || e.index > end) continue;
        terms.add(e.term);
        let set = byIdx.get(e.index);
        if (!set) byIdx.set(e.index, (set = new Set()));
        set.add(e.term);
      }
    }

    // Ruler: an index label every 10 and a red mark where terms diverge.
    let ruler = "";
    for (let i = start; i <= end; i++) {
      const x = (i - start) * CELL;
      if (i % 10 === 0 || (i === start && 10 - (i % 10) >= 3)) {
        ruler += '<text x="' + (x + 1) + '" y="9" class="tick">' + i + "</text>";
      }
      const set = byIdx.get(i);
      if (set && set.size > 1) {
        ruler += '<path class="diverge" d="M' + (x + 1) + " 11 L" + (x + CELL - GAP - 1) + " 11 L" + (x + (CELL - GAP) / 2) + ' 16 Z"><title>index ' + i + ": members disagree (terms " + [...set].join(", ") + ")</title></path>";
      }
    }

    let rows = '<div class="log-row ruler"><div class="log-label"><span class="muted">index</span></div>' +
      '<svg class="strip" viewBox="0 0 ' + W + ' 17" preserveAspectRatio="xMinYMid meet">' + ruler + "</svg></div>";

    const leader = s.cluster ? s.cluster.leader : null;
    for (const m of members) {
      const log = m.log || [];
      const first = log.length ? log[0].index : m.last_index + 1;
      let cells = "";
      // Indices this member has but whose terms were not sent (older than its
      // last 60 entries, or compacted into a snapshot) are drawn as grey ticks.
      for (let i = Math.max(start, 1); i < Math.min(first, end + 1) && i <= m.last_index; i++) {
        const x = (i - start) * CELL;
        cells += '<rect class="unknown" x="' + x + '" y="4" width="' + (CELL - GAP) + '" height="' + (CELL - GAP - 4) + '" rx="1"></rect>';
      }
      for (const e of log) {
        if (e.index < start || e.index > end) continue;
        const x = (e.index - start) * CELL;
        const col = termColour(e.term);
        const committed = e.index <= m.commit;
        const tip = "<title>" + esc(m.name) + " · index " + e.index + " · term " + e.term + (committed ? " · committed" : " · not committed") + "</title>";
        if (committed) {
          cells += '<rect x="' + x + '" y="0" width="' + (CELL - GAP) + '" height="' + (CELL - GAP) + '" rx="1.5" fill="' + col + '">' + tip + "</rect>";
        } else {
          // Hollow: not yet known to be safe, may still be overwritten.
          cells += '<rect class="uncommitted" x="' + (x + 0.75) + '" y="0.75" width="' + (CELL - GAP - 1.5) + '" height="' + (CELL - GAP - 1.5) + '" rx="1.5" stroke="' + col + '" fill="' + col + '">' + tip + "</rect>";
        }
      }
      // The commit point: a thin bar just after the last committed column.
      if (m.commit >= start && m.commit <= end) {
        const cx = (m.commit - start + 1) * CELL - GAP / 2;
        cells += '<line class="commit-mark" x1="' + cx + '" x2="' + cx + '" y1="-1" y2="' + (CELL - GAP + 1) + '"></line>';
      }
      let note = "";
      if (m.last_index < start) note = '<text class="behind" x="2" y="8">' + (start - m.last_index) + " entries behind this window (last " + m.last_index + ")</text>";
      const cls = ["log-row"];
      if (!m.reachable || m.process === "killed") cls.push("down");
      const star = m.name === leader && m.role === "leader" ? '<span class="star" title="leader">★</span>' : "";
      rows +=
        '<div class="' + cls.join(" ") + '"><div class="log-label"><b>' + esc(m.name) + "</b>" + star +
        '<span class="muted">' + esc(m.commit) + "/" + esc(m.last_index) + "</span></div>" +
        '<svg class="strip" viewBox="0 -1 ' + W + " " + (CELL - GAP + 2) + '" preserveAspectRatio="xMinYMid meet">' + cells + note + "</svg></div>";
    }

    const termList = [...terms].sort((a, b) => a - b);
    const legend = termList.length
      ? '<div class="term-legend">terms ' + termList.map((t) => '<span class="tchip"><i style="background:' + termColour(t) + '"></i>' + t + "</span>").join("") + '<span class="muted"> · label = commit/last</span></div>'
      : '<div class="term-legend muted">no entries yet</div>';

    // Skip identical redraws so a hover tooltip on a square survives.
    const html = rows + legend;
    if (html !== lastLogsHTML) {
      lastLogsHTML = html;
      $("logs").innerHTML = html;
    }
  }

  // --------------------------------------------------------------------- charts

  const history = { writes: [], reads: [], p99: [] };

  function pushHistory(s) {
    const c = s.cluster || {};
    const add = (k, v) => {
      const a = history[k];
      a.push(v == null || !isFinite(v) ? null : v);
      if (a.length > HISTORY) a.shift();
    };
    add("writes", c.writes_per_s);
    add("reads", c.reads_per_s);
    add("p99", c.write_p99_ms);
  }

  // A sparkline: a polyline per run of non-null points (a null is a gap, not a
  // zero, e.g. no writes means no p99), plus a light area under it.
  function sparkline(values, fmt) {
    const W = 240, H = 48, top = 4;
    let max = 0;
    for (const v of values) if (v != null && v > max) max = v;
    const scale = max > 0 ? max * 1.1 : 1;
    const step = W / (HISTORY - 1);
    const off = HISTORY - values.length; // keep the newest point on the right edge
    let out = "";
    let run = [];
    const flush = () => {
      if (!run.length) return;
      if (run.length === 1) run.push([run[0][0] + 0.01, run[0][1]]);
      const pts = run.map((p) => p[0].toFixed(1) + "," + p[1].toFixed(1)).join(" ");
      out += '<polygon class="area" points="' + run[0][0].toFixed(1) + "," + H + " " + pts + " " + run[run.length - 1][0].toFixed(1) + "," + H + '"></polygon>';
      out += '<polyline class="line" points="' + pts + '"></polyline>';
      run = [];
    };
    values.forEach((v, i) => {
      if (v == null) return flush();
      run.push([(i + off) * step, H - (v / scale) * (H - top)]);
    });
    flush();
    if (max > 0) out = '<text class="max" x="2" y="10">max ' + fmt(max) + "</text>" + out;
    return out;
  }

  function renderCharts() {
    const spec = { writes: fmtRate, reads: fmtRate, p99: fmtMs };
    for (const k of Object.keys(spec)) {
      const fig = document.querySelector('[data-chart="' + k + '"]');
      const vals = history[k];
      const now = vals.length ? vals[vals.length - 1] : null;
      fig.querySelector("[data-value]").textContent = spec[k](now);
      fig.querySelector("svg").innerHTML = sparkline(vals, spec[k]);
    }
  }

  // -------------------------------------------------------------------- network

  let netKey = "";
  let netParts = null; // {nodes: Map(name -> {g}), pairs: [{a, b, g, wire, label}]}

  // A band around a link as its click target: a bare line is too thin to hit
  // and, when horizontal, has an empty bounding box that automation skips.
  function hitBand(x1, y1, x2, y2, half) {
    const len = Math.hypot(x2 - x1, y2 - y1) || 1;
    const nx = (-(y2 - y1) / len) * half, ny = ((x2 - x1) / len) * half;
    return [[x1 + nx, y1 + ny], [x2 + nx, y2 + ny], [x2 - nx, y2 - ny], [x1 - nx, y1 - ny]]
      .map((p) => p[0].toFixed(1) + "," + p[1].toFixed(1)).join(" ");
  }

  // Built once per member set; each snapshot only changes attributes, so the
  // clickable links stay the same elements.
  function buildNetwork(members) {
    const W = 320, H = 250, cx = W / 2, cy = H / 2 + 2, R = 80;
    const pos = new Map();
    members.forEach((m, i) => {
      const ang = -Math.PI / 2 + (2 * Math.PI * i) / Math.max(1, members.length);
      pos.set(m.name, [cx + R * Math.cos(ang), cy + R * Math.sin(ang)]);
    });
    let links = "";
    const pairList = [];
    for (let i = 0; i < members.length; i++) {
      for (let j = i + 1; j < members.length; j++) {
        const a = members[i].name, b = members[j].name;
        const [x1, y1] = pos.get(a), [x2, y2] = pos.get(b);
        // Label sits at the midpoint, pushed outward from the centre so the
        // labels of different links do not pile up in the middle.
        let mx = (x1 + x2) / 2, my = (y1 + y2) / 2;
        let dx = mx - cx, dy = my - cy;
        const d = Math.hypot(dx, dy);
        if (d < 1) { dx = 0; dy = -1; } else { dx /= d; dy /= d; }
        mx += dx * 14; my += dy * 14;
        links +=
          '<g class="link" data-link data-a="' + esc(a) + '" data-b="' + esc(b) + '">' +
          '<line class="wire" x1="' + x1 + '" y1="' + y1 + '" x2="' + x2 + '" y2="' + y2 + '"></line>' +
          '<text class="link-label" x="' + mx.toFixed(1) + '" y="' + my.toFixed(1) + '"></text>' +
          '<polygon class="hit" points="' + hitBand(x1, y1, x2, y2, 9) + '"></polygon>' +
          "<title></title></g>";
        pairList.push({ a, b });
      }
    }
    let nodes = "";
    for (const m of members) {
      const [x, y] = pos.get(m.name);
      // The role label goes on the outer side of the node, away from the links.
      let ux = x - cx, uy = y - cy;
      const ul = Math.hypot(ux, uy) || 1;
      ux /= ul; uy /= ul;
      nodes +=
        '<g class="node" data-node="' + esc(m.name) + '" transform="translate(' + x.toFixed(1) + "," + y.toFixed(1) + ')">' +
        '<circle class="halo" r="27"></circle><circle class="disc" r="21"></circle>' +
        '<text class="nname" y="1">' + esc(m.name) + "</text>" +
        '<text class="nrole" x="' + (ux * 36).toFixed(1) + '" y="' + (uy * 38 + 1).toFixed(1) + '"></text>' +
        '<path class="xmark" d="M-11,-11 L11,11 M11,-11 L-11,11"></path></g>';
    }
    const box = $("network");
    box.innerHTML = '<svg viewBox="0 0 ' + W + " " + H + '" class="net-svg">' + links + nodes + "</svg>";
    const linkEls = box.querySelectorAll(".link");
    netParts = { nodes: new Map(), pairs: [] };
    linkEls.forEach((g, i) => {
      netParts.pairs.push({ a: pairList[i].a, b: pairList[i].b, g, wire: g.querySelector(".wire"), label: g.querySelector(".link-label"), title: g.querySelector("title") });
    });
    box.querySelectorAll(".node").forEach((g) => netParts.nodes.set(g.getAttribute("data-node"), { g, role: g.querySelector(".nrole") }));
  }

  function renderNetwork(s) {
    const members = s.members || [];
    const key = members.map((m) => m.name).join("\u0000");
    if (key !== netKey) {
      netKey = key;
      buildNetwork(members);
    }
    $("heal-all").hidden = !controls;
    const byName = new Map(members.map((m) => [m.name, m]));
    const dir = new Map();
    for (const l of s.links || []) dir.set(l.from + "\u0000" + l.to, l);

    let anyCut = false;
    for (const p of netParts.pairs) {
      const ab = dir.get(p.a + "\u0000" + p.b), ba = dir.get(p.b + "\u0000" + p.a);
      const ma = byName.get(p.a), mb = byName.get(p.b);
      // A pair counts as cut if either direction is: a one-way cut still
      // breaks Raft's request/response pattern.
      const cut = !!((ab && ab.cut) || (ba && ba.cut) ||
        (ma && (ma.cut_from || []).includes(p.b)) || (mb && (mb.cut_from || []).includes(p.a)));
      anyCut = anyCut || cut;
      const msgs = (ab ? ab.msgs_per_s || 0 : 0) + (ba ? ba.msgs_per_s || 0 : 0);
      const bytes = (ab ? ab.bytes_per_s || 0 : 0) + (ba ? ba.bytes_per_s || 0 : 0);
      const rtts = [ab && ab.rtt_ms, ba && ba.rtt_ms].filter((v) => v != null);
      const rtt = rtts.length ? rtts.reduce((x, y) => x + y, 0) / rtts.length : null;
      const idle = !cut && msgs <= 0;
      p.g.classList.toggle("cut", cut);
      p.g.classList.toggle("idle", idle);
      p.g.classList.toggle("clickable", controls);
      // Thickness grows with the log of the message rate: a heartbeat link
      // and a busy replication link both stay readable.
      const w = cut ? 2 : idle ? 1 : Math.min(7, 1.2 + Math.log2(1 + msgs) * 0.7);
      p.wire.setAttribute("stroke-width", w.toFixed(2));
      p.label.textContent = cut ? "cut" : idle ? "idle" : fmtRate(msgs) + " msg/s" + (rtt != null ? " · " + fmtMs(rtt) + " ms" : "");
      p.title.textContent =
        p.a + " ↔ " + p.b + ": " + (cut ? "cut" : fmtRate(msgs) + " msg/s, " + fmtBytes(bytes) + "/s" + (rtt != null ? ", rtt " + fmtMs(rtt) + " ms" : "")) +
        (controls ? (cut ? " — click to heal all cuts" : " — click to cut") : "");
    }
    $("heal-all").disabled = !anyCut;

    for (const m of members) {
      const n = netParts.nodes.get(m.name);
      if (!n) continue;
      const dr = displayRole(m);
      const cls = "node r-" + m.role + (dr === "killed" || m.process === "exited" ? " killed" : "") + (m.process === "paused" ? " paused" : "") + (!m.reachable ? " unreachable" : "") + (m.learner ? " learner" : "");
      if (n.g.getAttribute("class") !== cls) n.g.setAttribute("class", cls);
      const label = m.process === "killed" || m.process === "exited" || m.process === "paused" ? m.process : !m.reachable ? "unreachable" : m.role + (m.learner ? " (learner)" : "");
      if (n.role.textContent !== label) n.role.textContent = label;
    }
  }

  // ------------------------------------------------------------------- timeline

  let timelineKey = "";

  function renderTimeline(s) {
    const tl = s.timeline || [];
    const lastEv = tl.length ? tl[tl.length - 1] : null;
    // The list is capped at 200, so its length alone does not tell new events apart.
    const key = tl.length + "|" + (lastEv ? lastEv.at_ms + "|" + lastEv.kind + "|" + lastEv.text : "") + "|" + (tl.length ? tl[0].at_ms : "");
    if (key === timelineKey) return;
    timelineKey = key;
    let html = "";
    for (let i = tl.length - 1; i >= 0; i--) {
      const e = tl[i];
      const kind = esc(e.kind);
      html +=
        '<li class="event k-' + kind + '" data-kind="' + kind + '">' +
        "<time>" + (isFinite(e.at_ms) ? esc(fmtClock(e.at_ms)) : "–") + "</time>" +
        '<span class="ev-member">' + esc(e.member || "—") + "</span>" +
        '<span class="ev-kind">' + kind + "</span>" +
        '<span class="ev-text">' + esc(e.text) + "</span></li>";
    }
    $("timeline").innerHTML = html || '<li class="empty muted">no events yet</li>';
  }

  // ------------------------------------------------------------------- scenario

  let scenarioListKey = "";
  let stepsKey = "";

  function renderScenario(s) {
    const list = s.scenarios || [];
    const sc = s.scenario;

    // The list only changes when the set of scenarios does; rebuilding it on
    // every snapshot would swallow clicks on its Start buttons.
    const lkey = (controls ? "c|" : "r|") + list.map((x) => x.id + "\u0000" + x.title).join("\u0001");
    if (lkey !== scenarioListKey) {
      scenarioListKey = lkey;
      $("scenario-list").innerHTML = list.length
        ? '<ul class="sc-list">' +
          list.map((x) =>
            '<li><span class="sc-title">' + esc(x.title) + "</span>" +
            (controls ? '<button type="button" class="btn small primary control" data-scenario="' + esc(x.id) + '">Start</button>' : "") +
            "</li>").join("") + "</ul>"
        : '<p class="muted">No scenarios.</p>';
    }

    const run = $("scenario-run");
    $("scenario-list").hidden = !!sc;
    run.hidden = !sc;
    const next = $("scenario-next"), stop = $("scenario-stop");
    next.hidden = !controls;
    stop.hidden = !controls;
    if (!sc) {
      $("scenario-status").textContent = list.length ? list.length + " available" : "";
      stepsKey = "";
      return;
    }
    const steps = sc.steps || [];
    $("scenario-title").textContent = sc.title || sc.id;
    const running = steps.findIndex((x) => x.state === "running");
    const failed = steps.findIndex((x) => x.state === "failed");
    let lastDone = -1;
    steps.forEach((x, i) => { if (x.state === "done") lastDone = i; });
    // "Current": the running step, else a failed one, else the step that
    // just finished and waits for Next.
    const cur = running >= 0 ? running : failed >= 0 ? failed : sc.done ? -1 : lastDone;
    const skey = JSON.stringify(steps) + "|" + cur;
    if (skey !== stepsKey) {
      stepsKey = skey;
      $("scenario-steps").innerHTML = steps
        .map((x, i) =>
          '<li class="step s-' + esc(x.state) + (i === cur ? " current" : "") + '" data-state="' + esc(x.state) + '">' +
          '<span class="step-icon" aria-hidden="true"></span><span class="step-text">' + esc(x.text) + "</span></li>")
        .join("");
    }
    const doneCount = steps.filter((x) => x.state === "done").length;
    $("scenario-status").textContent = sc.done
      ? "finished"
      : failed >= 0 ? "step " + (failed + 1) + " failed"
      : running >= 0 ? "step " + (running + 1) + " of " + steps.length + " running"
      : sc.can_next ? "step " + doneCount + " of " + steps.length + " done · press Next"
      : doneCount + " of " + steps.length + " done";
    next.disabled = !sc.can_next || !!sc.done;
    next.classList.toggle("ready", !!sc.can_next && !sc.done);
    stop.textContent = sc.done ? "Close" : "Stop";
  }

  // ----------------------------------------------------------------- the stream

  function setConnection(live) {
    const el = $("connection");
    const text = live ? "live" : "reconnecting";
    if (el.textContent !== text) el.textContent = text;
    el.className = "conn " + text;
    document.body.classList.toggle("offline", !live);
  }

  function onState(ev) {
    let s;
    try {
      s = JSON.parse(ev.data);
    } catch (err) {
      console.error("dashboard: bad snapshot", err);
      return;
    }
    setConnection(true);
    snap = s;
    controls = !!s.controls;
    document.body.classList.toggle("no-controls", !controls);
    pushHistory(s);
    // Each part is drawn on its own so one surprise in the data does not
    // freeze the rest of the page.
    for (const f of [renderHeader, renderMembers, renderLogs, renderCharts, renderNetwork, renderTimeline, renderScenario]) {
      try {
        f(s);
      } catch (err) {
        console.error("dashboard: " + f.name, err);
      }
    }
  }

  function connect() {
    const es = new EventSource("/dashboard/events");
    es.addEventListener("open", () => setConnection(true));
    es.addEventListener("state", onState);
    es.addEventListener("error", () => {
      setConnection(false);
      // EventSource retries by itself while CONNECTING; once CLOSED (e.g. the
      // server answered with an error status) it gives up, so start afresh.
      if (es.readyState === EventSource.CLOSED) {
        es.close();
        setTimeout(connect, 2000);
      }
    });
  }

  connect();
})();
