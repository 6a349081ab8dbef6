// Publish the camera by WHIP (sendrecv: the styled stream comes back on the same connection),
// switch presets with PUT /whip/ID/preset, show the round trip (data channel ping + engine ms).
"use strict";

const page = { pc: null, resource: null, rtt: [], engine: [], preset: null };
const $ = (id) => document.getElementById(id);

function median(values) {
  if (!values.length) return null;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)];
}

function keep(list, value) {
  list.push(value);
  if (list.length > 30) list.shift();
}

function showRoundTrip() {
  const rtt = median(page.rtt), engine = median(page.engine);
  if (rtt === null) return;
  $("roundtrip").textContent = `${Math.round(rtt + (engine || 0))} ms`;
  $("roundtrip").dataset.ms = String(rtt + (engine || 0));
}

async function loadPresets() {
  const reply = await fetch("/presets");
  if (!reply.ok) return;
  const listing = await reply.json();
  const box = $("presets");
  box.textContent = "";
  page.preset = page.preset || listing.default;
  for (const preset of listing.presets) {
    const button = document.createElement("button");
    button.textContent = preset.name;
    button.title = preset.description;
    button.dataset.preset = preset.name;
    button.className = preset.name === page.preset ? "active" : "";
    button.addEventListener("click", () => choose(preset.name));
    box.appendChild(button);
  }
}

async function choose(name) {
  page.preset = name;
  for (const b of document.querySelectorAll("#presets button")) {
    b.className = b.dataset.preset === name ? "active" : "";
  }
  if (!page.resource) return;
  const reply = await fetch(`${page.resource}/preset`, {
    method: "PUT",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ name }),
  });
  $("status").textContent = reply.ok ? `preset ${name}` : `switch refused (${reply.status})`;
}

async function start() {
  $("start").disabled = true;
  try {
    const camera = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 } });
    $("camera").srcObject = camera;
    const pc = new RTCPeerConnection();
    page.pc = pc;
    const channel = pc.createDataChannel("control");
    let sentAt = new Map(), id = 0;
    channel.onopen = () => {
      setInterval(() => {
        if (channel.readyState !== "open") return;
        id += 1;
        sentAt.set(id, performance.now());
        channel.send(JSON.stringify({ t: "ping", id }));
      }, 1000);
    };
    channel.onmessage = (event) => {
      const message = JSON.parse(event.data);
      if (message.t === "pong" && sentAt.has(message.id)) {
        keep(page.rtt, performance.now() - sentAt.get(message.id));
        sentAt.delete(message.id);
      } else if (message.t === "done" && message.out) {
        keep(page.engine, message.ms);
      }
      showRoundTrip();
    };
    pc.addTransceiver(camera.getVideoTracks()[0], { direction: "sendrecv" });
    pc.ontrack = (event) => { $("styled").srcObject = new MediaStream([event.track]); };
    pc.onconnectionstatechange = () => { $("status").textContent = pc.connectionState; };
    const query = page.preset ? `?preset=${encodeURIComponent(page.preset)}` : "";
    page.resource = await negotiate(pc, `/whip${query}`);
    $("viewlink").href = `/view?session=${encodeURIComponent(page.resource.split("/").pop())}`;
    $("stop").disabled = false;
  } catch (err) {
    $("status").textContent = `could not start: ${err.message}`;
    $("start").disabled = false;
  }
}

async function stop() {
  if (page.resource) await fetch(page.resource, { method: "DELETE" });
  if (page.pc) page.pc.close();
  page.resource = null;
  page.pc = null;
  $("stop").disabled = true;
  $("start").disabled = false;
  $("status").textContent = "stopped";
}

async function main() {
  const state = await sessionState();
  $("login").hidden = state.authenticated;
  $("start").addEventListener("click", start);
  $("stop").addEventListener("click", stop);
  if (state.authenticated) await loadPresets();
}

main();
