// mq-worker dashboard: live updates over server-sent events, and confirmation of actions.
// The pages work without this script; it only adds what changes while they are open.
"use strict";
(function () {
  const TERMINAL = ["completed", "crashed", "cancelled", "rejected"];
  const page = document.body.dataset.page;
  const live = document.getElementById("live");

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function stateBadge(state) { return el("span", { class: "state state-" + state, "data-state": "" }, state); }
  function utc(seconds) { return new Date(seconds * 1000).toISOString().replace("T", " ").slice(0, 19); }
  function ago(seconds) {
    if (seconds === null || seconds === undefined) return "-";
    if (seconds < 60) return Math.round(seconds) + " s ago";
    if (seconds < 3600) return Math.round(seconds / 60) + " min ago";
    return (seconds / 3600).toFixed(1) + " h ago";
  }
  function setLive(on) {
    if (!live) return;
    live.textContent = on ? "live" : "reconnecting…";
    live.className = "live " + (on ? "on" : "off");
  }

  // Every form with data-confirm asks first: actions cancel runs and change queues.
  document.addEventListener("submit", (event) => {
    const form = event.target;
    if (form.dataset && form.dataset.confirm && !window.confirm(form.dataset.confirm)) event.preventDefault();
  });

  function follow(url, handle) {
    const source = new EventSource(url);
    source.onopen = () => setLive(true);
    source.onerror = () => setLive(false);
    source.onmessage = (message) => handle(JSON.parse(message.data));
    return source;
  }

  function upsertRun(tbody, run) {
    let row = tbody.querySelector('tr[data-run="' + CSS.escape(run.id) + '"]');
    if (!row) {
      row = el("tr", { "data-run": run.id, class: "flash" });
      const link = el("a", { class: "mono", href: "/runs/" + encodeURIComponent(run.id), title: run.id }, run.id);
      const first = el("td", { class: "run-id" }); first.appendChild(link); row.appendChild(first);
      for (const col of ["state", "name", "where", "worker", "time", "duration"]) row.appendChild(el("td", { "data-col": col }));
      row.querySelector('[data-col="time"]').textContent = utc(run.time);
      row.querySelector('[data-col="duration"]').textContent = "-";
      const empty = tbody.querySelector("tr.empty"); if (empty) empty.remove();
      tbody.insertBefore(row, tbody.firstChild);
      while (tbody.rows.length > 50) tbody.deleteRow(-1);
    }
    if (run.name) row.querySelector('[data-col="name"]').textContent = run.name;
    row.querySelector('[data-col="where"]').textContent = (run.pool || "-") + "/" + (run.queue || "-");
    if (run.worker) row.querySelector('[data-col="worker"]').textContent = run.worker;
    const cell = row.querySelector('[data-col="state"]');
    const current = cell.textContent.trim();
    // Events of a run can overtake each other between workers: never step back from an end.
    if (!TERMINAL.includes(current) || TERMINAL.includes(run.state)) { cell.replaceChildren(stateBadge(run.state)); }
    if (run.event && run.event.data && typeof run.event.data.duration_seconds === "number") {
      row.querySelector('[data-col="duration"]').textContent = run.event.data.duration_seconds.toFixed(3) + " s";
    }
  }

  function renderWorkers(workers) {
    const tbody = document.querySelector("#workers tbody");
    if (!tbody) return;
    const rows = workers.map((w) => {
      const row = el("tr", { "data-worker": w.name });
      row.appendChild(el("td", {}, w.name));
      row.appendChild(el("td", {}, w.pool));
      row.appendChild(el("td", {}, w.host || "-"));
      const state = el("td"); state.appendChild(el("span", { class: "state state-" + w.state }, w.state)); row.appendChild(state);
      row.appendChild(el("td", {}, w.in_flight + " / " + (w.limit === null ? "-" : w.limit)));
      row.appendChild(el("td", {}, ago(w.last_seen_age)));
      row.appendChild(el("td", {}, w.version || "-"));
      return row;
    });
    if (rows.length) tbody.replaceChildren(...rows);
  }

  function refreshStats() {
    const stats = document.getElementById("stats");
    if (!stats || document.hidden) return;
    fetch(stats.dataset.refresh, { credentials: "same-origin" })
      .then((response) => (response.ok ? response.text() : null))
      .then((html) => { if (html !== null) stats.innerHTML = html; })  // our own escaped HTML
      .catch(() => {});
  }

  if (page === "overview") {
    const tbody = document.querySelector("#recent-runs tbody");
    follow("/api/stream", (message) => {
      if (message.kind === "run" && message.id) upsertRun(tbody, message);
      else if (message.kind === "workers" || message.kind === "hello") renderWorkers(message.workers);
    });
    setInterval(refreshStats, 10000);
  }

  if (page === "run") {
    const box = document.getElementById("run");
    const runId = box.dataset.run;
    const output = document.getElementById("output");
    const timeline = document.getElementById("timeline");
    let shown = parseInt(box.dataset.lines, 10) || 0;
    function showState(message) {
      const state = document.getElementById("run-state");
      const current = state.querySelector("[data-state]");
      if (current && TERMINAL.includes(current.textContent.trim()) && !TERMINAL.includes(message.state)) return;
      state.replaceChildren(stateBadge(message.state));
      if (message.status_code !== null && message.status_code !== undefined) {
        state.appendChild(document.createTextNode(" (exit " + message.status_code + ")"));
      }
      if (TERMINAL.includes(message.state)) document.getElementById("cancel").hidden = true;
    }
    follow("/api/runs/" + encodeURIComponent(runId) + "/stream", (message) => {
      if (message.kind === "lines") {
        const atBottom = output.scrollTop + output.clientHeight >= output.scrollHeight - 4;
        message.lines.forEach((line, offset) => {
          if (message.from + offset < shown) return;  // already on the page
          output.appendChild(el("span", { class: "line " + line.stream }, line.text));
          output.appendChild(document.createTextNode("\n"));
          shown = message.from + offset + 1;
        });
        if (atBottom) output.scrollTop = output.scrollHeight;
      } else if (message.kind === "state") {
        showState(message);
      } else if (message.kind === "run" && message.id === runId) {
        showState(message);
        const item = el("li");
        item.appendChild(el("time", {}, message.event.time));
        item.appendChild(document.createTextNode(" "));
        item.appendChild(el("strong", {}, message.state));
        const details = el("details"); details.appendChild(el("summary", {}, "data"));
        details.appendChild(el("pre", {}, JSON.stringify(message.event.data, null, 2)));
        item.appendChild(details);
        timeline.appendChild(item);
      }
    });
  }
})();
