// The streamv2v control page: live figures from /events (Server-Sent Events), preset buttons
// that POST /preset with the session cookie, and a canvas chart of the last minute's latency.
// Plain DOM, no framework, no build step; text goes in with textContent only.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  session: null, presetsKey: "", active: null, lastStyle: null, connected: false, switchedAt: 0,
};
// An event sampled just before a switch may arrive just after it: for this long the page
// trusts the switch's own answer over the events' idea of the active preset.
const SWITCH_GRACE_MS = 1500;

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

const fmt = {
  fps: (v) => (v === null || v === undefined ? "-" : v.toFixed(1)),
  ms: (v) => (v === null || v === undefined ? "-" : `${Math.round(v)} ms`),
  bytes: (v) => (v >= 2 ** 20 ? `${(v / 2 ** 20).toFixed(1)} MiB` : `${Math.round(v / 1024)} KiB`),
};

function notice(text, isError) {
  const box = $("notice");
  box.hidden = !text;
  box.textContent = text || "";
  box.classList.toggle("error", Boolean(isError));
}

// ------------------------------------------------------------------ changes
async function selectPreset(name) {
  let response;
  try {
    response = await fetch("/preset", {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ name }),
    });
  } catch (err) {
    notice(`The daemon did not answer (${err.message}).`, true);
    return;
  }
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) {
    notice(`Switch refused (${response.status}): ${answer.error || response.statusText}`, true);
    return;
  }
  notice(state.session && state.session.authenticated ? "" : readOnlyText(), false);
  state.active = answer.active;
  state.switchedAt = Date.now();
  markActive();
}

function readOnlyText() {
  return "Read-only: run `streamv2v open` in a terminal to control the daemon from this page.";
}

// ------------------------------------------------------------------ presets
function renderPresets(listing) {
  const key = JSON.stringify([listing.presets, listing.errors]);
  if (key !== state.presetsKey) {
    state.presetsKey = key;
    const box = $("presets");
    box.replaceChildren();
    for (const preset of listing.presets) {
      if (preset.passthrough) continue;  // the toggle below
      const button = el("button");
      button.type = "button";
      button.dataset.name = preset.name;
      button.append(el("span", "name", preset.name));
      if (preset.description) button.append(el("span", "desc", preset.description));
      if (preset.mask && preset.mask !== "none") {
        button.append(el("span", "mask", `styles only the ${preset.mask}`));
      }
      for (const lora of preset.loras || []) {  // each style LoRA and its factors' memory
        const file = (lora.weight_name || lora.id).split("/").pop();
        const size = lora.bytes == null ? "size unknown" : fmt.bytes(lora.bytes);
        button.append(el("span", "lora", `LoRA ${file}: ${size}`));
      }
      if (preset.hotkey) button.append(el("span", "key", preset.hotkey));
      button.addEventListener("click", () => selectPreset(preset.name));
      box.append(button);
    }
    const errors = $("preset-errors");
    errors.replaceChildren();
    for (const [file, error] of Object.entries(listing.errors || {})) {
      errors.append(el("li", "", error.includes(file) ? error : `${file}: ${error}`));
    }
  }
  state.passthroughName = (listing.presets.find((p) => p.passthrough) || {}).name || null;
  if (Date.now() - state.switchedAt > SWITCH_GRACE_MS) state.active = listing.active;
  markActive();
}

function markActive() {
  for (const button of $("presets").children) {
    button.classList.toggle("active", button.dataset.name === state.active);
  }
  const toggle = $("passthrough");
  toggle.disabled = !state.passthroughName;
  toggle.checked = state.active !== null && state.active === state.passthroughName;
  if (state.active && state.active !== state.passthroughName) state.lastStyle = state.active;
}

function togglePassthrough(event) {
  const on = event.target.checked;
  const fallback = ($("presets").firstElementChild || {}).dataset;
  const target = on ? state.passthroughName : state.lastStyle || (fallback && fallback.name);
  event.target.checked = !on;  // until the daemon confirms
  if (target) selectPreset(target);
}

// ------------------------------------------------------------------ live figures
const GOOD = new Set(["live", "running", "connected", "listening"]);
const BAD = new Set(["lost", "failed", "stopped", "unavailable"]);

function renderStates(parts) {
  const list = $("states");
  list.replaceChildren();
  for (const [part, value] of Object.entries(parts)) {
    const cls = GOOD.has(value) ? "good" : BAD.has(value) ? "bad" : value === "disabled" ? "" : "warn";
    list.append(el("li", cls, `${part}: ${value}`));
  }
}

function renderBanner(status) {
  const banner = $("banner");
  const camera = status.state.camera;
  const engine = status.state.engine;
  let text = "";
  let info = false;
  if (!state.connected) {
    text = "Lost contact with the daemon: retrying...";
  } else if (camera !== "live") {
    text = `Camera ${camera}: the output shows a placeholder while the daemon reconnects.`;
  } else if (status.remote && status.remote.state === "failing") {
    text = `${status.remote.problem}: the camera passes through until it styles again.`;
    text = text.charAt(0).toUpperCase() + text.slice(1);
  } else if (status.remote && status.remote.state !== "connected") {
    text = `Remote engine ${status.remote.state}` +
      (status.remote.error ? ` (${status.remote.error})` : "") +
      ": the camera passes through while the daemon reconnects.";
  } else if (engine === "failed") {
    text = "Engine down: the output is the camera unchanged while the daemon retries.";
  } else if (status.degraded) {
    text = `Engine degraded: ${status.degraded.reason}. Restart the daemon to try the full settings again.`;
  } else if (engine === "loading" || engine === "warming") {
    text = `Engine ${engine}: the camera passes through until the model is ready.`;
    info = true;
  }
  banner.hidden = !text;
  banner.textContent = text;
  banner.classList.toggle("info", info);
}

// The first run's long work: the download (file, bytes, rate, ETA), then "compiling k of n".
function renderReady(ready) {
  const box = $("ready");
  box.hidden = !ready;
  if (!ready) return;
  const left = (s) => (s === null || s === undefined ? "" :
    `, about ${s >= 60 ? `${Math.floor(s / 60)} min ${Math.round(s % 60)} s` : `${Math.round(s)} s`} left`);
  let text = "";
  let part = null;
  if (ready.phase === "download") {
    text = `Downloading the model: ${fmt.bytes(ready.bytes_done)} of ${fmt.bytes(ready.bytes_total)}` +
      ` (file ${ready.file_index} of ${ready.files}: ${ready.file || "-"})` +
      (ready.rate_bps ? `, ${fmt.bytes(ready.rate_bps)}/s` : "") + left(ready.eta_s);
    part = ready.bytes_total ? ready.bytes_done / ready.bytes_total : null;
  } else if (ready.phase === "compiling") {
    text = `Compiling ${Math.min(ready.done + 1, ready.total)} of ${ready.total}` + left(ready.eta_s);
    part = ready.total ? ready.done / ready.total : null;
  } else {
    text = `Loading ${ready.what || "the model"}...`;
  }
  $("ready-text").textContent = text;
  const bar = $("ready-bar");
  if (part === null) bar.removeAttribute("value"); else bar.value = part;
}

function renderFigures(s) {
  const c = s.controller || {};
  const bank = s.bank || {};
  const loras = s.loras || {};
  const dev = s.device || {};
  const steps = s.steps === null ? "-" : `${s.steps}${s.stream_batch ? " (stream batch)" : ""}`;
  const rows = [
    ["Preset", `${s.preset}${s.switching ? " (switching)" : ""}`],
    ["fps in / engine / out", `${fmt.fps(s.fps.input)} / ${fmt.fps(s.fps.engine)} / ${fmt.fps(s.fps.output)}`],
    ["Latency p50 / p95", `${fmt.ms(s.latency_ms.p50)} / ${fmt.ms(s.latency_ms.p95)}` +
      (s.latency_budget_ms ? ` (budget ${fmt.ms(s.latency_budget_ms)})` : "")],
    ["Steps", steps],
    ["Controller", c.active ? (c.calibrating ? "calibrating" : c.reason || "holding") : "off (fixed steps)"],
    ["Feature bank", bank.enabled ? `${bank.tokens} tokens, ${fmt.bytes(bank.bytes)}` : "off"],
    ["Style LoRAs", loras.loaded ? `${loras.loaded} loaded, ${fmt.bytes(loras.bytes)} + base copies ${fmt.bytes(loras.base_bytes)}` : "none"],
    ["Device", dev.name ? `${dev.name} ${dev.dtype}` +
      (dev.memory_bytes ? `, ${fmt.bytes(dev.memory_bytes)}` : "") : "-"],
    ["Size", s.size ? s.size.join(" x ") : "-"],
  ];
  const r = s.remote;
  if (r) {
    rows.push(["Remote engine", `${r.url}: ${r.state}` +
      (r.rtt_ms_p50 != null ? `, round trip ${fmt.ms(r.rtt_ms_p50)}` : "") +
      (r.server_ms_p50 != null ? `, server ${fmt.ms(r.server_ms_p50)}/frame` : "")]);
  }
  const body = $("figures");
  body.replaceChildren();
  for (const [name, value] of rows) {
    const tr = el("tr");
    tr.append(el("th", "", name), el("td", "", value));
    body.append(tr);
  }
  const fps = s.output_fps || (s.fps.output && Math.round(s.fps.output));
  if (fps) $("obs-fps").textContent = String(fps);
}

// ------------------------------------------------------------------ the chart
function drawChart(points, budget) {
  const canvas = $("chart");
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || canvas.width;
  const height = canvas.clientHeight || canvas.height;
  if (canvas.width !== Math.round(width * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const g = canvas.getContext("2d");
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  g.clearRect(0, 0, width, height);
  const left = 56, right = 8, top = 10, bottom = 20;
  const plotW = width - left - right, plotH = height - top - bottom;
  let peak = budget || 0;
  for (const [, p50, p95] of points) peak = Math.max(peak, p50 || 0, p95 || 0);
  const step = [25, 50, 100, 200, 250, 500, 1000, 2000, 5000].find((s) => s * 4 >= peak * 1.1)
    || Math.ceil(peak / 4000) * 1000;
  const max = step * 4;
  const x = (age) => left + plotW * (1 + age / 60);
  const y = (ms) => top + plotH * (1 - ms / max);
  g.strokeStyle = "#2c323a";
  g.fillStyle = "#8a949f";
  g.font = "11px system-ui, sans-serif";
  g.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const ms = (max * i) / 4;
    g.beginPath();
    g.moveTo(left, y(ms));
    g.lineTo(left + plotW, y(ms));
    g.stroke();
    g.fillText(i === 4 ? `${ms} ms` : `${ms}`, 4, y(ms) + 4);
  }
  for (const age of [-60, -45, -30, -15, 0]) g.fillText(`${age}s`, x(age) - 10, height - 4);
  if (budget) line(g, [[-60, budget], [0, budget]], x, y, "#e5484d", [5, 4]);
  line(g, points.map(([age, p50]) => [age, p50]), x, y, "#4ea1ff", []);
  line(g, points.map(([age, , p95]) => [age, p95]), x, y, "#ff9f43", []);
}

function line(g, points, x, y, colour, dash) {
  g.strokeStyle = colour;
  g.lineWidth = 2;
  g.setLineDash(dash);
  g.beginPath();
  let drawing = false;
  for (const [age, ms] of points) {
    if (ms === null || ms === undefined) { drawing = false; continue; }
    if (drawing) g.lineTo(x(age), y(ms)); else g.moveTo(x(age), y(ms));
    drawing = true;
  }
  g.stroke();
  g.setLineDash([]);
}

// ------------------------------------------------------------------ wiring
function onEvent(message) {
  const data = JSON.parse(message.data);
  state.connected = true;
  const s = data.status;
  renderStates(s.state || {});
  renderBanner(s);
  renderReady(s.getting_ready);
  renderFigures(s);
  renderPresets(data.presets);
  drawChart(data.latency_history || [], s.latency_budget_ms);
}

async function start() {
  $("stream-url").textContent = `${location.origin}/stream.mjpg`;
  $("passthrough").addEventListener("change", togglePassthrough);
  try {
    state.session = await (await fetch("/session", { credentials: "same-origin" })).json();
  } catch (err) {
    notice(`The daemon did not answer (${err.message}).`, true);
    return;
  }
  if (!state.session.control) {
    $("controls").hidden = true;
    $("latency").hidden = true;
    notice("Preview only: this daemon's control API is off.", false);
    return;
  }
  if (!state.session.authenticated) notice(readOnlyText(), false);
  drawChart([], null);
  const events = new EventSource("/events");
  events.onmessage = onEvent;
  events.onerror = () => {
    state.connected = false;
    const banner = $("banner");
    banner.hidden = false;
    banner.classList.remove("info");
    banner.textContent = "Lost contact with the daemon: retrying...";
  };
}

document.addEventListener("DOMContentLoaded", start);
