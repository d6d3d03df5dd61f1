// MoLo Hubs experiments page. Plain JavaScript, no libraries, nothing from the internet.
//
// Data: the public API of this origin, with a researcher's or an operator's key in the X-API-Key header.
//   GET    /api/v1/experiments                 the jobs, newest first: status, replications done / target
//   POST   /api/v1/experiments                 submit an experiment file (TOML text)
//   DELETE /api/v1/experiments/{id}            cancel a job
//   GET    /api/v1/experiments/{id}/report     the runner's HTML report, shown in a sandboxed frame
//   GET    /api/v1/experiments/{id}/results.csv the tidy results, downloaded
// A report or a table is fetched with the key and handed to the frame or the download as a blob: URL,
// so the key never goes into a URL. The key comes from the URL fragment (#key=...) or a prompt and is
// kept in sessionStorage, as on the operations dashboard. #poll=<seconds> sets how often the list refreshes.
"use strict";

(() => {
  const API = "/api/v1/experiments";
  const KEY_STORE = "molo.apiKey";
  const ACTIVE = new Set(["queued", "running"]);

  const fragment = new URLSearchParams(location.hash.replace(/^#/, ""));
  const pollSeconds = Math.max(1, Number(fragment.get("poll")) || 2);
  const state = { key: null, jobs: [], timer: null, reportUrl: null, authProblem: null };

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function fmtTime(iso) {
    if (!iso) return "–";
    const d = new Date(iso);
    return Number.isNaN(d.getTime()) ? String(iso) : d.toISOString().slice(0, 19).replace("T", " ") + " UTC";
  }

  // ------------------------------------------------------------------ the key and requests

  function readKey() {
    const fromUrl = fragment.get("key");
    if (fromUrl) {
      sessionStorage.setItem(KEY_STORE, fromUrl);
      fragment.delete("key");
      const rest = fragment.toString();
      history.replaceState(null, "", location.pathname + location.search + (rest ? `#${rest}` : ""));
    }
    return sessionStorage.getItem(KEY_STORE);
  }

  class HttpError extends Error {
    constructor(status, body) {
      super(body?.error?.message || `HTTP ${status}`);
      this.status = status;
      this.code = body?.error?.code || null;
    }
  }

  async function request(path, options = {}) {
    const headers = { ...(options.headers || {}) };
    if (state.key) headers["X-API-Key"] = state.key;
    const response = await fetch(API + path, { ...options, headers, cache: "no-store" });
    if (response.status === 401) {
      let body = null;
      try {
        body = await response.json();
      } catch {
        body = null;
      }
      askForKey(body?.error?.message || "The API refused the key.");
      throw new HttpError(401, body);
    }
    if (!response.ok) {
      let body = null;
      try {
        body = await response.json();
      } catch {
        body = null;
      }
      throw new HttpError(response.status, body);
    }
    return response;
  }

  function setConnection(kind, text) {
    $("connection").dataset.state = kind;
    $("connection").textContent = text;
  }

  function askForKey(reason) {
    state.authProblem = reason;
    setConnection("auth", "API key needed");
    $("key-reason").textContent = `${reason} Paste a researcher's or an operator's API key (it stays in this browser tab only).`;
    if (!$("key-dialog").open) $("key-dialog").showModal();
  }

  function setupKeyDialog() {
    $("key-form").addEventListener("submit", () => {
      const value = $("key-input").value.trim();
      if (!value) return;
      state.key = value;
      state.authProblem = null;
      sessionStorage.setItem(KEY_STORE, value);
      $("key-input").value = "";
      $("forget-key").hidden = false;
      refreshSoon(0);
    });
    $("forget-key").addEventListener("click", () => {
      sessionStorage.removeItem(KEY_STORE);
      state.key = null;
      $("forget-key").hidden = true;
      askForKey("Key forgotten.");
    });
  }

  // ------------------------------------------------------------------ the list

  async function refresh() {
    try {
      const response = await request("?limit=100", { headers: { Accept: "application/json" } });
      state.jobs = await response.json();
      render();
      setConnection("polling", `updated every ${pollSeconds} s`);
      $("connection").title = `updated ${new Date().toLocaleTimeString()}`;
    } catch (err) {
      if (err.status === 403) setConnection("error", "this key may not see experiments");
      else if (err.status !== 401) setConnection("error", `API unreachable: ${err.message}`);
    } finally {
      refreshSoon(pollSeconds * 1000);
    }
  }

  function refreshSoon(ms) {
    clearTimeout(state.timer);
    state.timer = setTimeout(refresh, ms);
  }

  function progressCell(job) {
    const { done, target } = job.replications;
    return el(
      "div",
      { class: "progress" },
      el("progress", { max: Math.max(target, 1), value: Math.min(done, target) }),
      el("span", { class: "progress-text" }, `${done} / ${target}`),
    );
  }

  function render() {
    $("job-count").textContent = `(${state.jobs.length})`;
    const target = $("experiments");
    if (!state.jobs.length) {
      target.replaceChildren(el("p", { class: "hint" }, "No experiments yet: submit a file."));
      return;
    }
    const rows = state.jobs.map((job) =>
      el(
        "tr",
        { class: "job-row", "data-experiment-id": job.id, "data-status": job.status },
        el("td", {}, String(job.id)),
        el("td", {}, el("strong", {}, job.name), job.description ? el("div", { class: "hint" }, job.description) : null),
        el(
          "td",
          {},
          el("span", { class: "job-status", "data-status": job.status }, job.status),
          job.cancel_requested && ACTIVE.has(job.status) ? el("div", { class: "hint" }, "cancelling…") : null,
          job.attempts > 1 ? el("div", { class: "hint" }, `attempt ${job.attempts} (resumed)`) : null,
        ),
        el("td", {}, progressCell(job), el("div", { class: "hint" }, `${job.points} points, up to ${job.replications.max}`)),
        el(
          "td",
          { class: "hint" },
          `submitted ${fmtTime(job.created_at)}`,
          job.submitted_by ? ` by ${job.submitted_by}` : "",
          job.started_at ? el("div", {}, `started ${fmtTime(job.started_at)}`) : null,
          job.finished_at ? el("div", {}, `ended ${fmtTime(job.finished_at)}`) : null,
          job.error ? el("div", { class: "job-error" }, job.error) : null,
        ),
        el(
          "td",
          { class: "actions" },
          job.report_available
            ? el("button", { type: "button", class: "open-report", onclick: () => openReport(job) }, "Report")
            : null,
          job.status === "succeeded"
            ? el("button", { type: "button", class: "download-results", onclick: () => download(job, "results.csv") }, "results.csv")
            : null,
          ACTIVE.has(job.status) && !job.cancel_requested
            ? el("button", { type: "button", class: "cancel", onclick: () => cancel(job) }, "Cancel")
            : null,
        ),
      ),
    );
    target.replaceChildren(
      el(
        "table",
        {},
        el(
          "thead",
          {},
          el("tr", {}, ["id", "experiment", "status", "replications", "when", ""].map((h) => el("th", {}, h))),
        ),
        el("tbody", {}, rows),
      ),
    );
  }

  // ------------------------------------------------------------------ actions

  async function submit(event) {
    event.preventDefault();
    const message = $("submit-message");
    const source = $("experiment-source").value;
    message.dataset.kind = "";
    message.textContent = "submitting…";
    try {
      const response = await request("", {
        method: "POST",
        headers: { "Content-Type": "application/toml", Accept: "application/json" },
        body: source,
      });
      const job = await response.json();
      message.dataset.kind = "ok";
      message.textContent = `queued as experiment ${job.id} (${job.name})`;
      refreshSoon(0);
    } catch (err) {
      message.dataset.kind = "error";
      message.textContent = err.code ? `${err.code}: ${err.message}` : err.message;
    }
  }

  async function cancel(job) {
    try {
      await request(`/${job.id}`, { method: "DELETE" });
    } catch (err) {
      $("submit-message").dataset.kind = "error";
      $("submit-message").textContent = `cancel ${job.id}: ${err.message}`;
    }
    refreshSoon(0);
  }

  async function blobOf(job, path, type) {
    const response = await request(`/${job.id}/${path}`);
    return new Blob([await response.arrayBuffer()], { type });
  }

  async function openReport(job) {
    try {
      const blob = await blobOf(job, "report", "text/html");
      if (state.reportUrl) URL.revokeObjectURL(state.reportUrl);
      state.reportUrl = URL.createObjectURL(blob);
      $("report-title").textContent = `Report of experiment ${job.id} (${job.name})`;
      $("report-frame").dataset.experimentId = String(job.id);
      $("report-frame").src = state.reportUrl;
      $("report-open").href = state.reportUrl;
      $("report-panel").hidden = false;
      $("report-panel").scrollIntoView({ block: "start" });
    } catch (err) {
      $("submit-message").dataset.kind = "error";
      $("submit-message").textContent = `report of ${job.id}: ${err.message}`;
    }
  }

  async function download(job, name) {
    try {
      const url = URL.createObjectURL(await blobOf(job, name, "text/csv"));
      const link = el("a", { href: url, download: `experiment-${job.id}-${job.name}-${name}` });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    } catch (err) {
      $("submit-message").dataset.kind = "error";
      $("submit-message").textContent = `${name} of ${job.id}: ${err.message}`;
    }
  }

  function main() {
    state.key = readKey();
    $("forget-key").hidden = !state.key;
    setupKeyDialog();
    $("submit-form").addEventListener("submit", submit);
    $("report-close").addEventListener("click", () => {
      $("report-panel").hidden = true;
      $("report-frame").removeAttribute("src");
    });
    if (!state.key) askForKey("No API key yet.");
    refresh();
  }

  main();
})();
