// MoLo Hubs operations dashboard. Plain JavaScript and SVG, no libraries, nothing from the internet.
//
// Data: the public API of this origin, with the operator's key in the X-API-Key header.
//   GET /api/v1/boxes, /api/v1/boxes/{id}   boxes, their status and compartments
//   GET /api/v1/alerts                       open alerts (panel says so when the server has none)
//   GET /api/v1/kpis?group_by=day            avoided trips and CO2 (panel says "no KPI data" without it)
//   GET /api/v1/stream                       server-sent events, read with fetch() so the key header
//                                            can be sent; without it the page polls.
// The key comes from the URL fragment (#key=...), which is removed from the address bar at once, or
// from a prompt; it is kept in sessionStorage (this tab only). #poll=<seconds> sets the polling interval.
"use strict";

(() => {
  const API = "/api/v1";
  const KEY_STORE = "molo.apiKey";
  const SVG_NS = "http://www.w3.org/2000/svg";
  const STATUSES = ["online", "alerting", "maintenance", "offline"];
  const STATUS_TEXT = {
    online: "online",
    offline: "offline",
    maintenance: "maintenance",
    alerting: "alerting",
  };
  const REASON_TEXT = {
    birth: "came online",
    shutdown: "shut down",
    connection_lost: "connection lost (Last Will)",
    heartbeat_timeout: "silent (missed heartbeats)",
    never_seen: "never heard from",
  };

  const fragment = new URLSearchParams(location.hash.replace(/^#/, ""));
  const pollSeconds = Math.max(1, Number(fragment.get("poll")) || 5);

  const state = {
    key: null,
    plan: null,
    boxes: new Map(), // box_id -> summary from /api/v1/boxes
    alerts: null, // list of open alerts, or null when the server has no alerts endpoint
    alertsNote: "loading…",
    selected: null,
    detail: null,
    stream: "off", // off | connecting | live | unavailable
    kpi: null,
    kpiNote: "loading…",
    geometry: null,
    timer: null,
    refreshDue: 0, // when the scheduled refresh (state.timer) runs, ms since the epoch
    refreshing: false,
    refreshAgain: false,
    authProblem: null,
  };

  // ------------------------------------------------------------------ small DOM helpers

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    setAttrs(node, attrs);
    node.append(...nodes(children));
    return node;
  }

  /** Children as DOM nodes: nested lists flattened, null/undefined/false left out, the rest as text. */
  const nodes = (children) => children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false).map(asNode);

  function svg(tag, attrs = {}, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    setAttrs(node, attrs);
    node.append(...nodes(children));
    return node;
  }

  function setAttrs(node, attrs) {
    for (const [name, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.setAttribute("class", value);
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
  }

  const asNode = (c) => (c instanceof Node ? c : document.createTextNode(String(c)));

  function fmtTime(iso) {
    if (!iso) return "–";
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return String(iso);
    return d.toISOString().slice(0, 16).replace("T", " ") + " UTC";
  }

  function fmtNumber(x, digits = 0) {
    if (x === null || x === undefined || Number.isNaN(Number(x))) return "–";
    return Number(x).toLocaleString("en-GB", { minimumFractionDigits: digits, maximumFractionDigits: digits });
  }

  function fmtKg(kg) {
    if (kg === null || kg === undefined) return "–";
    return Math.abs(kg) >= 1000 ? `${fmtNumber(kg / 1000, 2)} t` : `${fmtNumber(kg, 1)} kg`;
  }

  // ------------------------------------------------------------------ the API key and requests

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

  function headers(extra = {}) {
    return state.key ? { "X-API-Key": state.key, ...extra } : { ...extra };
  }

  class HttpError extends Error {
    constructor(status, body) {
      super(body?.error?.message || `HTTP ${status}`);
      this.status = status;
      this.code = body?.error?.code || null;
    }
  }

  async function api(path, method = "GET", payload = undefined) {
    const request = { method, headers: headers({ Accept: "application/json" }), cache: "no-store" };
    if (payload !== undefined) {
      request.headers["Content-Type"] = "application/json";
      request.body = JSON.stringify(payload);
    }
    const response = await fetch(API + path, request);
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = null;
    }
    if (response.status === 401) askForKey(body?.error?.message || "The API refused the key.");
    if (!response.ok) throw new HttpError(response.status, body);
    return body;
  }

  function askForKey(reason) {
    state.authProblem = reason;
    setConnection("auth", "API key needed");
    const dialog = $("key-dialog");
    $("key-reason").textContent = `${reason} Paste your API key (it stays in this browser tab only).`;
    if (!dialog.open) dialog.showModal();
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
      restartStream();
      refreshSoon(0);
    });
    $("forget-key").addEventListener("click", () => {
      sessionStorage.removeItem(KEY_STORE);
      state.key = null;
      $("forget-key").hidden = true;
      askForKey("Key forgotten.");
    });
  }

  // ------------------------------------------------------------------ status of a box

  function openAlertsOf(boxId) {
    return (state.alerts || []).filter((a) => a.box_id === boxId);
  }

  function inMaintenance(box) {
    return box.status === "maintenance" || box.maintenance === true || box.in_maintenance === true;
  }

  /** Alerts that colour a box: critical and warning (docs/operations.md, "Severity"). Info (a parcel
   * near the end of its pickup window, a door taken out of service on purpose) is listed, never coloured. */
  const colours = (a) => a.severity !== "info";

  /** One of online | alerting | maintenance | offline. Maintenance (an operator's decision) wins over
   * offline, offline over alerting (an offline box usually has its offline alert open too). A box is
   * alerting when the API gives it an alert_level, or an open alert of it that colours is listed. */
  function statusOf(box) {
    if (inMaintenance(box)) return "maintenance";
    if (!box.online) return "offline";
    if (box.alert_level || box.status === "alerting" || openAlertsOf(box.box_id).some(colours)) return "alerting";
    return "online";
  }

  // ------------------------------------------------------------------ the plan of Aalborg

  async function loadPlan() {
    try {
      const response = await fetch("/dashboard/static/plan.json", { cache: "no-store" });
      state.plan = await response.json();
    } catch {
      state.plan = { fjord_line: [], labels: [], fjord_width_m: 450 };
    }
  }

  const M_PER_DEG_LAT = 111195;

  function computeGeometry(placed) {
    const fjord = state.plan?.fjord_line || [];
    const lats = placed.map((b) => b.latitude);
    const lons = placed.map((b) => b.longitude);
    if (lats.length) {
      for (const label of state.plan?.labels || []) {
        if (label.kind === "town") {
          lats.push(label.lat);
          lons.push(label.lon);
        }
      }
    } else {
      for (const [lon, lat] of fjord) {
        lats.push(lat);
        lons.push(lon);
      }
    }
    if (!lats.length) {
      lats.push(57.048);
      lons.push(9.92);
    }
    let [latMin, latMax] = [Math.min(...lats), Math.max(...lats)];
    let [lonMin, lonMax] = [Math.min(...lons), Math.max(...lons)];
    const latPad = Math.max((latMax - latMin) * 0.1, 0.006);
    const lonPad = Math.max((lonMax - lonMin) * 0.08, 0.01);
    latMin -= latPad;
    latMax += latPad;
    lonMin -= lonPad;
    lonMax += lonPad;
    const kx = Math.cos((((latMin + latMax) / 2) * Math.PI) / 180);
    const spanX = (lonMax - lonMin) * kx;
    const spanY = latMax - latMin;
    const width = 1000;
    const height = Math.round(Math.min(Math.max((width * spanY) / spanX, 420), 820));
    const scale = Math.min(width / spanX, height / spanY); // px per degree of latitude
    const offX = (width - spanX * scale) / 2;
    const offY = (height - spanY * scale) / 2;
    return {
      width,
      height,
      scale,
      key: placed.map((b) => `${b.box_id}:${b.latitude}:${b.longitude}`).join("|"),
      project: (lon, lat) => [offX + (lon - lonMin) * kx * scale, offY + (latMax - lat) * scale],
    };
  }

  /** The y of the projected fjord line at x (linear between its points), or null outside it. */
  function fjordYAt(points, x) {
    for (let i = 1; i < points.length; i += 1) {
      const [x0, y0] = points[i - 1];
      const [x1, y1] = points[i];
      if (x >= x0 && x <= x1 && x1 > x0) return y0 + ((y1 - y0) * (x - x0)) / (x1 - x0);
    }
    return null;
  }

  function drawBase(geo) {
    const plan = $("plan");
    plan.setAttribute("viewBox", `0 0 ${geo.width} ${geo.height}`);
    plan.replaceChildren();
    const fjord = (state.plan?.fjord_line || []).map(([lon, lat]) => geo.project(lon, lat));
    if (fjord.length > 1) {
      const points = fjord.map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`).join(" ");
      const widthPx = Math.max(((state.plan.fjord_width_m || 450) / M_PER_DEG_LAT) * geo.scale, 6);
      plan.append(svg("polyline", { class: "fjord", points, "stroke-width": widthPx.toFixed(1) }));
      plan.append(svg("polyline", { class: "fjord-centre", points }));
    }
    // Labels stay inside the plan; the water's name sits just above the fjord wherever it ends up.
    const widthPx = Math.max(((state.plan?.fjord_width_m || 450) / M_PER_DEG_LAT) * geo.scale, 6);
    for (const label of state.plan?.labels || []) {
      let [x, y] = geo.project(label.lon, label.lat);
      x = Math.min(Math.max(x, 90), geo.width - 90);
      y = Math.min(Math.max(y, 30), geo.height - 40);
      const onLine = label.kind === "water" ? fjordYAt(fjord, x) : null;
      if (onLine !== null) y = onLine - widthPx / 2 - 8;
      plan.append(svg("text", { class: `label ${label.kind}`, x, y, "text-anchor": "middle" }, label.text));
    }
    // Scale bar: 1 km.
    const km = (1000 / M_PER_DEG_LAT) * geo.scale;
    const sx = 24;
    const sy = geo.height - 24;
    plan.append(
      svg(
        "g",
        { class: "scale" },
        svg("line", { x1: sx, y1: sy, x2: sx + km, y2: sy }),
        svg("line", { x1: sx, y1: sy - 5, x2: sx, y2: sy + 5 }),
        svg("line", { x1: sx + km, y1: sy - 5, x2: sx + km, y2: sy + 5 }),
        svg("text", { x: sx + km / 2, y: sy - 8, "text-anchor": "middle" }, "1 km"),
      ),
    );
    plan.append(
      svg(
        "g",
        { class: "north", transform: `translate(${geo.width - 30}, 34)` },
        svg("path", { d: "M0,-18 L7,4 L0,-1 L-7,4 Z" }),
        svg("text", { x: 0, y: 20, "text-anchor": "middle" }, "N"),
      ),
    );
    plan.append(svg("g", { id: "markers" }));
  }

  function shortLabel(boxId) {
    const parts = boxId.split("-");
    return parts.length > 1 ? parts[parts.length - 1] : boxId;
  }

  function markerTitle(box, status) {
    const reason = box.online ? "" : ` (${REASON_TEXT[box.status_reason] || box.status_reason})`;
    const kinds = (box.open_alert_kinds || []).map((k) => k.replaceAll("_", " "));
    const alerts = kinds.length ? `\nopen alerts: ${kinds.join(", ")}` : "";
    const level = status === "alerting" && box.alert_level ? ` (${box.alert_level})` : "";
    return `${box.name || box.box_id} · ${box.box_id}\n${STATUS_TEXT[status]}${level}${reason}${alerts}`;
  }

  function renderBoxes() {
    const boxes = [...state.boxes.values()];
    const placed = boxes.filter((b) => Number.isFinite(b.latitude) && Number.isFinite(b.longitude));
    const unplaced = boxes.filter((b) => !placed.includes(b));
    const geo = computeGeometry(placed);
    if (!state.geometry || state.geometry.key !== geo.key) {
      state.geometry = geo;
      drawBase(geo);
    }
    const layer = $("markers");
    const seen = new Set();
    for (const box of placed) {
      seen.add(box.box_id);
      const status = statusOf(box);
      let g = layer.querySelector(`[data-box-id="${CSS.escape(box.box_id)}"]`);
      if (!g) {
        const [x, y] = state.geometry.project(box.longitude, box.latitude);
        g = svg(
          "g",
          {
            class: "box",
            "data-box-id": box.box_id,
            transform: `translate(${x.toFixed(1)},${y.toFixed(1)})`,
            tabindex: 0,
            role: "button",
            onclick: () => select(box.box_id),
            onkeydown: (e) => (e.key === "Enter" || e.key === " ") && select(box.box_id),
          },
          svg("title"),
          svg("circle", { r: 9 }),
          svg("text", { x: 12, y: 4 }, shortLabel(box.box_id)),
        );
        layer.append(g);
      }
      g.setAttribute("data-status", status);
      g.setAttribute("aria-label", `${box.box_id} ${status}`);
      g.querySelector("title").textContent = markerTitle(box, status);
      g.classList.toggle("selected", state.selected === box.box_id);
    }
    for (const g of [...layer.querySelectorAll(".box")]) {
      if (!seen.has(g.getAttribute("data-box-id"))) g.remove();
    }
    // Boxes without a registered position: chips below the plan.
    $("unplaced").hidden = unplaced.length === 0;
    $("unplaced-boxes").replaceChildren(
      ...unplaced.map((box) => {
        const status = statusOf(box);
        return el(
          "button",
          {
            type: "button",
            class: `box-chip${state.selected === box.box_id ? " selected" : ""}`,
            "data-box-id": box.box_id,
            "data-status": status,
            title: markerTitle(box, status),
            onclick: () => select(box.box_id),
          },
          box.box_id,
        );
      }),
    );
    // Legend with counts.
    const counts = Object.fromEntries(STATUSES.map((s) => [s, 0]));
    for (const box of boxes) counts[statusOf(box)] += 1;
    $("legend").replaceChildren(
      ...STATUSES.map((s) => el("li", { "data-status": s, "data-count": counts[s] }, `${STATUS_TEXT[s]} ${counts[s]}`)),
    );
    $("plan-title").textContent = `Boxes (${boxes.length})`;
    // The newest device time of any box: simulated time when the simulator drives the boxes.
    const newest = boxes.map((b) => b.last_seen_at).filter(Boolean).sort().pop();
    state.boxTime = newest || null;
    $("clock").textContent = newest ? `box time ${fmtTime(newest)}` : "";
  }

  // ------------------------------------------------------------------ box detail

  function select(boxId) {
    if (state.selected !== boxId) {
      state.history = null;
      state.commands = null;
      $("command-message").textContent = "";
      loadCommands(boxId);
    }
    state.selected = boxId;
    state.detail = null;
    renderBoxes();
    renderDetail();
    loadDetail();
  }

  async function loadDetail() {
    const boxId = state.selected;
    if (!boxId) return;
    try {
      const detail = await api(`/boxes/${encodeURIComponent(boxId)}`);
      if (state.selected === boxId) state.detail = detail;
    } catch (err) {
      if (state.selected === boxId) state.detail = { error: err.message, box_id: boxId };
    }
    renderDetail();
  }

  function compartmentState(c) {
    if (c.in_service === false) return "out_of_service";
    if (c.door_open) return "door_open";
    if (c.occupied === null || c.occupied === undefined) return c.kind === "red_box" ? "red_box" : "unknown";
    return c.occupied ? "occupied" : "free";
  }

  const COMPARTMENT_TEXT = {
    free: "free",
    occupied: "occupied",
    out_of_service: "out of service",
    door_open: "door open",
    unknown: "no reading",
    red_box: "",
  };

  function renderCompartment(c) {
    const st = compartmentState(c);
    const what = c.kind === "red_box" ? "red box" : `size ${c.size_class ?? "?"}`;
    const children = [el("div", { class: "cid" }, `#${c.id}`), el("div", {}, what)];
    if (c.kind === "red_box") {
      const ratio = c.weight_kg !== null && c.capacity_kg ? c.weight_kg / c.capacity_kg : null;
      children.push(el("div", {}, c.weight_kg === null ? "– kg" : `${fmtNumber(c.weight_kg, 1)}/${fmtNumber(c.capacity_kg)} kg`));
      const bar = el("div", { class: "fill" }, el("span"));
      bar.firstChild.style.width = `${Math.min(100, Math.round((ratio || 0) * 100))}%`;
      children.push(bar);
    }
    if (COMPARTMENT_TEXT[st]) children.push(el("div", {}, COMPARTMENT_TEXT[st]));
    return el(
      "div",
      {
        class: `compartment ${c.kind}`,
        "data-compartment": c.id,
        "data-state": st,
        title: `compartment ${c.id}: ${what}, ${COMPARTMENT_TEXT[st] || "red box"}`,
      },
      children,
    );
  }

  function renderDetail() {
    const target = $("detail");
    const boxId = state.selected;
    if (!boxId) {
      target.replaceChildren(el("p", { class: "hint" }, "Click a box on the plan."));
      return;
    }
    const summary = state.boxes.get(boxId);
    const d = state.detail && state.detail.box_id === boxId ? state.detail : null;
    if (!d) {
      target.replaceChildren(el("p", { class: "hint" }, `loading ${boxId}…`));
      return;
    }
    if (d.error) {
      target.replaceChildren(el("p", { class: "hint" }, `${boxId}: ${d.error}`));
      return;
    }
    const merged = { ...d, ...(summary || {}) }; // the list may be newer than the detail
    const status = statusOf(merged);
    const occupancy = Object.entries(d.occupancy || {}).map(
      ([size, o]) => `${size}: ${o.free} free of ${o.total}${o.out_of_service ? `, ${o.out_of_service} out of service` : ""}`,
    );
    const facts = [
      ["status", `${STATUS_TEXT[status]}${merged.online ? "" : ` – ${REASON_TEXT[merged.status_reason] || merged.status_reason}`}`],
      ["status since", `${fmtTime(merged.status_since)}${receivedNote(merged.status_since, merged.status_received_at)}`],
      ["last message", fmtTime(merged.last_seen_at)],
      ["parcel doors", occupancy.join(" · ") || "–"],
      ["temperature", d.temperature_c === null ? "–" : `${fmtNumber(d.temperature_c, 1)} °C`],
      ["power", [d.power, d.battery_pct === null ? null : `battery ${fmtNumber(d.battery_pct)} %`].filter(Boolean).join(", ") || "–"],
      ["firmware", d.firmware || "–"],
    ];
    const alerts = Array.isArray(d.alerts) && d.alerts.length ? d.alerts.filter(isOpen) : openAlertsOf(boxId);
    const redBoxes = (merged.red_boxes || []).map((r) => {
      const mix = Object.entries(r.fractions_kg || {})
        .filter(([, kg]) => kg > 0)
        .map(([fraction, kg]) => `${fraction.replaceAll("_", " ")} ${fmtNumber(kg, 1)} kg`);
      const fill = r.fill_ratio === null || r.fill_ratio === undefined ? "" : ` (${fmtNumber(r.fill_ratio * 100)} %)`;
      return `#${r.compartment}: ${r.weight_kg === null ? "–" : fmtNumber(r.weight_kg, 1)} of ${fmtNumber(r.capacity_kg)} kg${fill}${mix.length ? ` – ${mix.join(", ")}` : ""}`;
    });
    if (redBoxes.length) facts.splice(4, 0, ["red boxes", redBoxes.join(" · ")]);
    if (merged.maintenance) facts.splice(2, 0, ["maintenance", `since ${fmtTime(merged.maintenance_since)}`]);
    target.replaceChildren(
      ...nodes([
      el(
        "h3",
        { class: "detail-name" },
        `${d.name || boxId} `,
        el("span", { class: "count" }, boxId),
        " ",
        el("span", { class: "status-badge", "data-status": status }, STATUS_TEXT[status]),
      ),
      el("dl", { class: "facts" }, facts.map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)])),
      el("h3", {}, `Compartments (${(d.compartments || []).length})`),
      (d.compartments || []).length
        ? el("div", { class: "compartments" }, d.compartments.map(renderCompartment))
        : el("p", { class: "hint" }, "No layout announced yet."),
      alerts.length ? el("h3", {}, `Open alerts (${alerts.length})`) : null,
      alerts.length ? el("ul", {}, alerts.map((a) => el("li", {}, `${alertKind(a)}: ${alertMessage(a)}`))) : null,
      renderHistory(boxId, merged.last_seen_at),
      ]),
    );
  }

  // ------------------------------------------------------------------ commands to the selected box

  /** Which fields each command takes (the API's CommandIn). */
  const COMMAND_FIELDS = {
    ping: [],
    open_compartment: ["compartment"],
    set_compartment_service: ["compartment", "enabled"],
    set_maintenance: ["enabled"],
  };
  const FINAL = new Set(["succeeded", "failed", "rejected", "timed_out"]);

  function setupCommandForm() {
    const form = $("command-form");
    const showFields = () => {
      const fields = COMMAND_FIELDS[$("command-action").value];
      $("command-compartment").hidden = !fields.includes("compartment");
      $("command-enabled").hidden = !fields.includes("enabled");
    };
    $("command-action").addEventListener("change", showFields);
    showFields();
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const boxId = state.selected;
      const action = $("command-action").value;
      const body = { action };
      if (COMMAND_FIELDS[action].includes("compartment")) body.compartment = Number($("command-compartment").value);
      if (COMMAND_FIELDS[action].includes("enabled")) body.enabled = $("command-enabled").value === "true";
      const message = $("command-message");
      try {
        const sent = await api(`/boxes/${encodeURIComponent(boxId)}/commands`, "POST", body);
        message.textContent = `sent ${action} (${sent.status})`;
        message.dataset.kind = "ok";
        followCommand(boxId, sent.command_id);
      } catch (err) {
        message.textContent = `not sent: ${err.code ? `${err.code}: ` : ""}${err.message}`;
        message.dataset.kind = "error";
      }
      loadCommands(boxId);
    });
  }

  /** Poll one command until it reaches a final state (or a minute passes), showing its progress. */
  async function followCommand(boxId, commandId) {
    const until = Date.now() + 60_000;
    while (Date.now() < until && state.selected === boxId) {
      try {
        const command = await api(`/commands/${commandId}`);
        await loadCommands(boxId);
        if (FINAL.has(command.status)) {
          refreshSoon(200); // the box's state may have changed (maintenance, a door)
          return;
        }
      } catch {
        return;
      }
      await new Promise((resolve) => setTimeout(resolve, 700));
    }
  }

  async function loadCommands(boxId) {
    try {
      const list = await api(`/boxes/${encodeURIComponent(boxId)}/commands?limit=5`);
      if (state.selected === boxId) state.commands = list;
    } catch {
      if (state.selected === boxId) state.commands = null;
    }
    renderCommands();
  }

  function renderCommands() {
    const form = $("command-form");
    form.hidden = !state.selected;
    const list = state.commands || [];
    $("commands").replaceChildren(
      ...list.map((c) =>
        el(
          "li",
          { "data-command-id": c.command_id, "data-status": c.status },
          `${c.action}${c.compartment ? ` #${c.compartment}` : ""}${c.enabled === null || c.enabled === undefined ? "" : c.enabled ? " on" : " off"}: `,
          el("span", { class: "status", "data-status": c.status }, c.status.replaceAll("_", " ")),
          c.detail ? ` (${c.detail})` : "",
          ` · ${fmtTime(c.created_at)}`,
        ),
      ),
    );
  }

  // ------------------------------------------------------------------ a box's history

  /** Ranges the history offers, back from the box's newest message (its clock), and their buckets. */
  const HISTORY_RANGES = { "24 h": [24, "15m"], "7 days": [24 * 7, "1h"], "30 days": [24 * 30, "6h"] };
  const HISTORY_SERIES = [
    ["occupied_mean", "doors occupied", (v) => fmtNumber(v, 1)],
    ["red_box_max_kg", "fullest red box", (v) => `${fmtNumber(v, 2)} kg`],
    ["temperature_mean_c", "temperature", (v) => `${fmtNumber(v, 1)} °C`],
  ];

  async function loadHistory(boxId, lastSeen, range) {
    const [hours, bucket] = HISTORY_RANGES[range];
    const until = new Date(Date.parse(lastSeen) + 60_000);
    const since = new Date(until.getTime() - hours * 3_600_000);
    state.history = { boxId, range, loading: true };
    renderDetail();
    try {
      const query = new URLSearchParams({ since: since.toISOString(), until: until.toISOString(), bucket });
      const body = await api(`/boxes/${encodeURIComponent(boxId)}/history?${query}`);
      if (state.history?.boxId === boxId) state.history = { boxId, range, items: body.items || [] };
    } catch (err) {
      if (state.history?.boxId === boxId) state.history = { boxId, range, error: err.message };
    }
    renderDetail();
  }

  function sparkline(key, label, format, items) {
    const points = items.filter((b) => b[key] !== null && b[key] !== undefined);
    const width = 360;
    const height = 48;
    const values = points.map((b) => b[key]);
    const lo = Math.min(...values);
    const hi = Math.max(...values);
    const t0 = Date.parse(items[0].start);
    const t1 = Math.max(Date.parse(items[items.length - 1].start), t0 + 1);
    const x = (b) => 4 + ((Date.parse(b.start) - t0) / (t1 - t0)) * (width - 8);
    const y = (v) => height - 4 - (hi > lo ? ((v - lo) / (hi - lo)) * (height - 8) : (height - 8) / 2);
    return el(
      "div",
      { class: "history-series" },
      el("div", { class: "hint" }, points.length ? `${label}: ${format(lo)} – ${format(hi)}` : `${label}: no readings`),
      points.length
        ? svg(
            "svg",
            { class: "series", "data-series": key, viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none" },
            svg("polyline", { points: points.map((b) => `${x(b).toFixed(1)},${y(b[key]).toFixed(1)}`).join(" ") }),
          )
        : null,
    );
  }

  /** The history section of a box's detail: range buttons, then a line per series, by the box's clock. */
  function renderHistory(boxId, lastSeen) {
    const h = state.history?.boxId === boxId ? state.history : null;
    const buttons = Object.keys(HISTORY_RANGES).map((range) =>
      el(
        "button",
        { type: "button", class: "history-range", "data-range": range, "aria-pressed": String(h?.range === range),
          onclick: () => lastSeen && loadHistory(boxId, lastSeen, range) },
        range,
      ),
    );
    let body = el("p", { class: "hint" }, lastSeen ? "Choose a range (by the box's clock)." : "No messages from this box yet.");
    if (h?.loading) body = el("p", { class: "hint" }, "loading…");
    else if (h?.error) body = el("p", { class: "hint" }, `History unavailable: ${h.error}`);
    else if (h?.items && !h.items.length) body = el("p", { class: "hint" }, "No telemetry in this range.");
    else if (h?.items) body = el("div", { id: "history-series" }, HISTORY_SERIES.map(([k, l, f]) => sparkline(k, l, f, h.items)));
    return el("div", { id: "history" }, el("h3", {}, "History"), el("div", { class: "history-ranges" }, buttons), body);
  }

  // ------------------------------------------------------------------ alerts

  const alertKind = (a) => a.kind ?? a.type ?? a.code ?? "alert";
  const alertMessage = (a) => a.message ?? a.detail ?? a.description ?? "";
  /** When it happened, by the box's clock (raised_ts); the backend's clock only if the box gave none. */
  const alertSince = (a) => a.raised_ts ?? a.raised_at ?? a.opened_at ?? a.since ?? a.created_at ?? null;

  /** " (received …)" when the backend saw it more than a minute from the box's time (simulation, late
   * messages); every time on the page is the box's clock, this says when it arrived. */
  function receivedNote(boxTime, receivedTime) {
    const a = Date.parse(boxTime);
    const b = Date.parse(receivedTime);
    if (!boxTime || !receivedTime || Number.isNaN(a) || Number.isNaN(b) || Math.abs(a - b) < 60_000) return "";
    return ` (received ${fmtTime(receivedTime)})`;
  }

  function isOpen(a) {
    const st = String(a.state ?? a.status ?? "open").toLowerCase();
    return !a.cleared_at && !a.resolved_at && !["cleared", "closed", "resolved"].includes(st);
  }

  async function loadAlerts() {
    try {
      const body = await api("/alerts?state=open&limit=500");
      const items = Array.isArray(body) ? body : body?.items ?? body?.alerts ?? [];
      state.alerts = items.filter(isOpen);
      state.alertsNote = null;
    } catch (err) {
      state.alerts = null;
      if (err.status === 404 && err.code !== "box_not_found") state.alertsNote = "No alerts on this server (yet).";
      else if (err.status === 403) state.alertsNote = "This key may not see alerts.";
      else state.alertsNote = `Alerts unavailable: ${err.message}`;
    }
  }

  const SEVERITY_RANK = { critical: 0, warning: 1, info: 2 };
  const newestFirst = (a, b) => String(alertSince(b)).localeCompare(String(alertSince(a)));
  const ALERT_ORDER = {
    severity: (a, b) => (SEVERITY_RANK[a.severity] ?? 1) - (SEVERITY_RANK[b.severity] ?? 1) || newestFirst(a, b),
    since: newestFirst,
    box: (a, b) => String(a.box_id).localeCompare(String(b.box_id)) || newestFirst(a, b),
  };

  const ackErrors = new Map(); // alert id -> why acknowledging it failed

  /** Acknowledge an alert (operators): the API records who and when; the condition still clears it. */
  async function acknowledge(alert, button) {
    button.disabled = true;
    try {
      await api(`/alerts/${alert.id}/ack`, "POST");
      alert.acknowledged_at = new Date().toISOString();
      refreshSoon(200);
    } catch (err) {
      button.disabled = false;
      ackErrors.set(alert.id, err.status === 403 ? "this key may not acknowledge (operators only)" : err.message);
    }
    renderAlerts();
  }

  function setupAlertControls() {
    for (const id of ["alert-severity", "alert-sort"]) $(id).addEventListener("change", () => renderAlerts());
  }

  function renderAlerts() {
    const target = $("alerts");
    $("alert-count").textContent = state.alerts ? `(${state.alerts.length})` : "";
    if (!state.alerts) {
      target.replaceChildren(el("p", { class: "hint" }, state.alertsNote || "–"));
      return;
    }
    if (!state.alerts.length) {
      target.replaceChildren(el("p", { class: "hint" }, "No open alerts."));
      return;
    }
    const shown = $("alert-severity").value;
    const chosen = state.alerts.filter((a) => shown === "all" || (a.severity || "warning") === shown);
    if (!chosen.length) {
      target.replaceChildren(el("p", { class: "hint" }, `No open ${shown} alerts.`));
      return;
    }
    const rows = chosen
      .sort(ALERT_ORDER[$("alert-sort").value] || ALERT_ORDER.severity)
      .map((a) =>
        el(
          "tr",
          {
            class: "alert-row",
            "data-box-id": a.box_id,
            "data-alert-id": a.id,
            "data-severity": a.severity || "warning",
            onclick: () => a.box_id && select(a.box_id),
          },
          el("td", {}, el("span", { class: "sev", "data-severity": a.severity || "warning" }, a.severity || "warning")),
          el("td", {}, a.box_id || "–"),
          el("td", {}, alertKind(a), alertMessage(a) ? el("div", { class: "hint" }, alertMessage(a)) : null),
          el(
            "td",
            { class: "since" },
            fmtTime(alertSince(a)),
            receivedNote(a.raised_ts, a.raised_at) ? el("div", { class: "hint" }, receivedNote(a.raised_ts, a.raised_at).trim()) : null,
            a.acknowledged_at
              ? el("div", { class: "hint acknowledged" }, "acknowledged")
              : el("button", {
                  type: "button",
                  class: "ack",
                  onclick: (event) => {
                    event.stopPropagation(); // not a click on the row (which opens the box)
                    acknowledge(a, event.currentTarget);
                  },
                }, "acknowledge"),
            ackErrors.has(a.id) ? el("div", { class: "hint ack-error" }, `not acknowledged: ${ackErrors.get(a.id)}`) : null,
          ),
        ),
      );
    target.replaceChildren(
      el(
        "table",
        {},
        el("thead", {}, el("tr", {}, el("th", {}, "severity"), el("th", {}, "box"), el("th", {}, "alert"), el("th", {}, "since"))),
        el("tbody", {}, rows),
      ),
    );
  }

  // ------------------------------------------------------------------ KPIs

  /** KPIs on their own clock: every 15 s, every 5 s while there are none yet. */
  async function kpiLoop() {
    try {
      await loadKpis();
      renderKpis();
    } finally {
      setTimeout(kpiLoop, state.kpi ? 15000 : 5000);
    }
  }

  async function loadKpis() {
    try {
      // No range: the server takes every day with activity (the simulated days in the demo).
      const body = await api("/kpis?group_by=day");
      const empty = !body?.groups?.length; // nothing stored yet: the server answers an empty day
      state.kpi = body?.totals && !empty ? body : null;
      state.kpiNote = state.kpi ? null : empty ? "no KPI data yet (no activity stored)" : "no KPI data";
    } catch (err) {
      state.kpi = null;
      if (err.status === 404 || err.status === 405) state.kpiNote = "no KPI data (this server has no KPI endpoint)";
      else if (err.status === 400 && err.code === "invalid_range") state.kpiNote = "no KPI data yet (no activity stored)";
      else if (err.status === 403) state.kpiNote = "no KPI data: this key may not see KPIs";
      else state.kpiNote = `no KPI data: ${err.message}`;
    }
  }

  function renderKpis() {
    const target = $("kpis");
    const chart = $("kpi-chart");
    const totals = state.kpi?.totals;
    if (!totals) {
      target.replaceChildren(el("p", { class: "hint", id: "kpi-empty" }, state.kpiNote || "no KPI data"));
      chart.toggleAttribute("hidden", true);
      $("kpi-method").textContent = "";
      return;
    }
    const avoided = totals.avoided || {};
    const baseline = totals.baseline || {};
    const project = totals.project || {};
    // The headline is the API's whole number of motorised vehicle trips (vans, trucks, residents'
    // cars); walking and cycling are in the table by actor and mode beside it.
    const trips = state.kpi.headline?.motorised_trips_avoided ?? Math.round(avoided.trips);
    const tripsNote =
      trips < 0
        ? `${fmtNumber(-trips)} more than without the boxes (baseline ${fmtNumber(baseline.trips)}, with the boxes ${fmtNumber(project.trips)})`
        : `baseline ${fmtNumber(baseline.trips)}, with the boxes ${fmtNumber(project.trips)}`;
    const items = [
      [fmtNumber(trips), "motorised vehicle trips avoided", tripsNote, "kpi-trips"],
      [fmtKg(avoided.kg_co2e_wtw), "CO₂e avoided (well-to-wheel)", `tank-to-wheel ${fmtKg(avoided.kg_co2e_ttw)}`, "kpi-co2"],
      [`${fmtNumber(avoided.vkm)} km`, "vehicle-km avoided", `baseline ${fmtNumber(baseline.vkm)} km`, "kpi-vkm"],
    ];
    target.replaceChildren(
      el(
        "div",
        { class: "kpi-totals" },
        items.map(([value, what, note, id]) =>
          el("div", { class: "kpi", id }, el("div", { class: "value" }, value), el("div", { class: "what" }, what), el("div", { class: "what" }, note)),
        ),
      ),
      modesTable(state.kpi.modes || {}),
    );
    const method = state.kpi.method;
    const period = state.kpi.period;
    $("kpi-method").textContent = [
      period ? `Days ${period.since} to ${period.until} (exclusive), UTC days of the boxes' own timestamps` : "",
      method?.standard ? `Method: ${method.standard}` : "",
      method?.allocation ? `allocation ${method.allocation}` : "",
      method?.waste_baseline ? `waste baseline ${method.waste_baseline}` : "",
      method?.parcel_baseline ? `parcel baseline ${method.parcel_baseline}` : "",
    ]
      .filter(Boolean)
      .join("; ");
    renderChart(state.kpi.groups || []);
  }

  const MODE_NAMES = {
    van: ["carriers", "van"],
    truck: ["waste company", "truck"],
    car: ["residents", "car"],
    walk_cycle: ["residents", "on foot, bike or bus"],
  };

  /** Trips by actor and mode, without and with the boxes; stops for the vehicles that make them. */
  function modesTable(modes) {
    const rows = Object.entries(modes).map(([mode, m]) => {
      const [actor, how] = MODE_NAMES[mode] || [m.actor || "", mode];
      const stops = mode === "van" || mode === "truck";
      return el(
        "tr",
        { "data-mode": mode },
        el("td", {}, actor),
        el("td", {}, how),
        el("td", { class: "num" }, fmtNumber(m.baseline?.trips)),
        el("td", { class: "num" }, fmtNumber(m.project?.trips)),
        el("td", { class: "num" }, fmtNumber(m.avoided?.trips)),
        el("td", { class: "num" }, stops ? fmtNumber(m.avoided?.stops) : "–"),
        el("td", { class: "num" }, fmtNumber(m.avoided?.vkm)),
      );
    });
    return el(
      "table",
      { class: "kpi-modes", id: "kpi-modes" },
      el("caption", {}, "Trips by actor and mode (km on foot or by bike are a person's; only vehicles emit CO₂)"),
      el(
        "thead",
        {},
        el(
          "tr",
          {},
          ["who", "how", "trips without boxes", "with boxes", "trips avoided", "stops avoided", "km avoided"].map((h) =>
            el("th", {}, h),
          ),
        ),
      ),
      el("tbody", {}, rows),
    );
  }

  /** About ``count`` round tick values (1, 2 or 5 times a power of ten) from at most ``lo`` to at
   * least ``hi``: the first tick is at or below every value, the last at or above. */
  function niceTicks(lo, hi, count = 4) {
    const span = hi - lo || Math.abs(hi) || 1;
    const raw = span / count;
    const power = 10 ** Math.floor(Math.log10(raw));
    const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw);
    const first = Math.floor(lo / step);
    const last = Math.max(Math.ceil(hi / step), first + 1);
    const ticks = [];
    for (let i = first; i <= last; i += 1) ticks.push(Number((i * step).toPrecision(12)));
    return ticks;
  }

  function renderChart(groups) {
    const chart = $("kpi-chart");
    const days = groups
      .map((g) => ({ day: g.key?.day ?? Object.values(g.key || {})[0], kg: Number(g.avoided?.kg_co2e_wtw) || 0 }))
      .filter((g) => g.day)
      .sort((a, b) => String(a.day).localeCompare(String(b.day)));
    if (!days.length) {
      chart.toggleAttribute("hidden", true);
      return;
    }
    chart.toggleAttribute("hidden", false);
    // The boxes' current day is not over: its figure is what has happened so far (it can be negative
    // while the day's van km are counted and its pickups are still to come), so it is drawn apart.
    const clock = state.boxTime ? new Date(state.boxTime) : null;
    const today = clock && !Number.isNaN(clock.getTime()) ? clock.toISOString().slice(0, 10) : null;
    days.forEach((d) => (d.partial = today !== null && String(d.day) >= today));
    const width = Math.max(320, Math.round(chart.getBoundingClientRect().width || 640));
    const height = 220;
    chart.setAttribute("viewBox", `0 0 ${width} ${height}`);
    chart.setAttribute("preserveAspectRatio", "xMidYMid meet");
    const pad = { l: 64, r: 72, t: 14, b: 28 };
    const w = width - pad.l - pad.r;
    const h = height - pad.t - pad.b;
    let running = 0;
    const cumulative = days.map((d) => (running += d.kg));
    // The per-day axis (left) spans every bar and zero, in round ticks; the running total has its own (right).
    const dayTicks = niceTicks(Math.min(0, ...days.map((d) => d.kg)), Math.max(0, ...days.map((d) => d.kg)));
    const lo = dayTicks[0];
    const hi = Math.max(dayTicks[dayTicks.length - 1], lo + 1e-9);
    const totalTicks = niceTicks(0, Math.max(...cumulative, 0));
    const maxTotal = Math.max(totalTicks[totalTicks.length - 1], 1e-9);
    const yDay = (v) => pad.t + h - ((v - lo) / (hi - lo)) * h;
    const yTotal = (v) => pad.t + h - (Math.max(v, 0) / maxTotal) * h;
    const step = w / days.length;
    const barWidth = Math.min(Math.max(step * 0.7, 1), 48);
    const bars = days.map((d, i) =>
      svg(
        "rect",
        {
          class: d.partial ? "bar partial" : "bar",
          "data-day": d.day,
          x: (pad.l + (i + 0.5) * step - barWidth / 2).toFixed(1),
          y: Math.min(yDay(d.kg), yDay(0)).toFixed(1),
          width: barWidth.toFixed(1),
          height: Math.abs(yDay(0) - yDay(d.kg)).toFixed(1),
        },
        svg("title", {}, `${d.day}${d.partial ? " (so far: the day is not over)" : ""}: ${fmtKg(d.kg)} CO₂e avoided`),
      ),
    );
    const line = cumulative.map((v, i) => `${(pad.l + (i + 0.5) * step).toFixed(1)},${yTotal(v).toFixed(1)}`).join(" ");
    const ticks = [];
    const every = Math.max(1, Math.ceil(days.length / 8));
    days.forEach((d, i) => {
      if (i % every === 0 || (d.partial && i === days.length - 1)) {
        const label = String(d.day).slice(5) + (d.partial ? " so far" : "");
        ticks.push(svg("text", { x: pad.l + (i + 0.5) * step, y: height - 8, "text-anchor": "middle" }, label));
      }
    });
    const grid = dayTicks.map((v) => svg("line", { class: v === 0 ? "axis" : "grid", x1: pad.l, y1: yDay(v), x2: width - pad.r, y2: yDay(v) }));
    const left = dayTicks.map((v) => svg("text", { class: "y-tick", x: pad.l - 6, y: yDay(v) + 4, "text-anchor": "end" }, fmtKg(v)));
    const right = totalTicks.map((v) => svg("text", { class: "y-tick total-tick", x: width - pad.r + 6, y: yTotal(v) + 4 }, fmtKg(v)));
    chart.replaceChildren(
      ...grid,
      ...bars,
      svg("polyline", { class: "total", points: line }),
      ...left,
      ...right,
      svg("text", { x: pad.l - 6, y: height - 8, "text-anchor": "end" }, "per day"),
      svg("text", { x: width - pad.r + 6, y: height - 8 }, "in total"),
      ...ticks,
    );
  }

  // ------------------------------------------------------------------ refresh loop and stream

  function setConnection(kind, text) {
    const node = $("connection");
    node.dataset.state = kind;
    node.textContent = text;
  }

  function connectionText() {
    if (state.authProblem) return ["auth", "API key needed"];
    if (state.stream === "live") return ["stream", "live (server-sent events)"];
    return ["polling", `polling every ${pollSeconds} s`];
  }

  async function refresh() {
    if (state.refreshing) {
      state.refreshAgain = true;
      return;
    }
    state.refreshing = true;
    try {
      const boxes = await api("/boxes");
      state.boxes = new Map(boxes.map((b) => [b.box_id, b]));
      await loadAlerts();
      if (state.selected) await loadDetail();
      renderBoxes();
      renderAlerts();
      renderDetail();
      setConnection(...connectionText());
      $("connection").title = `updated ${new Date().toLocaleTimeString()}`;
    } catch (err) {
      if (err.status !== 401) setConnection("error", `API unreachable: ${err.message}`);
    } finally {
      state.refreshing = false;
      if (state.refreshAgain) {
        state.refreshAgain = false;
        refreshSoon(50);
      } else {
        refreshSoon(state.stream === "live" ? 10000 : pollSeconds * 1000);
      }
    }
  }

  /** Schedule a refresh in ``ms`` unless one is due sooner: a busy stream (an event every few
   * milliseconds) must not keep pushing the refresh back, or alerts and details would never update. */
  function refreshSoon(ms) {
    const due = Date.now() + ms;
    if (state.timer !== null && state.refreshDue <= due) return;
    clearTimeout(state.timer);
    state.refreshDue = due;
    state.timer = setTimeout(() => {
      state.timer = null;
      refresh();
    }, ms);
  }

  let streamAbort = null;

  function restartStream() {
    if (streamAbort) streamAbort.abort();
    openStream();
  }

  /** Read the server-sent events of /api/v1/stream with fetch() (EventSource cannot send the key). */
  async function openStream(attempt = 0) {
    const controller = new AbortController();
    streamAbort = controller;
    state.stream = "connecting";
    try {
      const response = await fetch(`${API}/stream`, {
        headers: headers({ Accept: "text/event-stream" }),
        signal: controller.signal,
        cache: "no-store",
      });
      const type = response.headers.get("content-type") || "";
      if (response.status === 404 || response.status === 405 || (response.ok && !type.includes("text/event-stream"))) {
        state.stream = "unavailable"; // this server has no stream: polling only
        setConnection(...connectionText());
        return;
      }
      if (!response.ok || !response.body) throw new HttpError(response.status, null);
      state.stream = "live";
      attempt = 0;
      setConnection(...connectionText());
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
          handleStreamBlock(block);
        }
      }
    } catch (err) {
      if (controller.signal.aborted) return;
      if (err.status === 401) askForKey("The live stream refused the key.");
    }
    if (controller.signal.aborted) return;
    state.stream = "off";
    setConnection(...connectionText());
    refreshSoon(pollSeconds * 1000);
    setTimeout(() => openStream(attempt + 1), Math.min(30000, 1000 * 2 ** attempt));
  }

  function handleStreamBlock(block) {
    let event = "message";
    const data = [];
    for (const line of block.split(/\r?\n/)) {
      if (!line || line.startsWith(":")) continue; // comments keep the connection alive
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
    }
    if (!data.length) return;
    let payload = null;
    try {
      payload = JSON.parse(data.join("\n"));
    } catch {
      payload = null;
    }
    // A status change can be shown at once; everything else (alerts, details) comes with the refresh.
    if (payload && typeof payload === "object" && payload.box_id && typeof payload.online === "boolean") {
      const box = state.boxes.get(payload.box_id);
      if (box) {
        state.boxes.set(payload.box_id, { ...box, online: payload.online, status_reason: payload.reason ?? payload.status_reason ?? box.status_reason });
        renderBoxes();
      }
    }
    document.dispatchEvent(new CustomEvent("molo:stream", { detail: { event, payload } }));
    refreshSoon(200);
  }

  // ------------------------------------------------------------------ start

  async function main() {
    state.key = readKey();
    $("forget-key").hidden = !state.key;
    setupKeyDialog();
    setupAlertControls();
    setupCommandForm();
    await loadPlan();
    renderBoxes();
    openStream();
    await refresh();
    kpiLoop();
    let resizeTimer = null;
    window.addEventListener("resize", () => {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(renderKpis, 200);
    });
  }

  main();
})();
