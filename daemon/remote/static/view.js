// The styled stream only, by WHEP (receive-only): the page to put in an OBS Browser Source.
// Waits for a session to publish and reconnects when it goes away.
"use strict";

const video = document.getElementById("styled");
const status = document.getElementById("status");
const wanted = new URLSearchParams(location.search).get("session");
const endpoint = wanted ? `/whep/${encodeURIComponent(wanted)}` : "/whep";

async function watch() {
  const pc = new RTCPeerConnection();
  pc.addTransceiver("video", { direction: "recvonly" });
  pc.ontrack = (event) => { video.srcObject = new MediaStream([event.track]); };
  const ended = new Promise((resolve) => {
    pc.onconnectionstatechange = () => {
      if (["failed", "closed", "disconnected"].includes(pc.connectionState)) resolve();
    };
  });
  try {
    const resource = await negotiate(pc, endpoint);
    status.textContent = "";
    window.addEventListener("pagehide", () => fetch(resource, { method: "DELETE", keepalive: true }));
    await ended;
  } catch (err) {
    status.textContent = `waiting for the stream (${err.message})`;
  }
  pc.close();
  setTimeout(watch, 2000);
}

sessionState().then((state) => {
  if (!state.authenticated) {
    status.textContent = "log this browser in first (POST /login-code with the token gives a view_url)";
    return;
  }
  watch();
});
