// WHIP/WHEP from the browser: one POST of the complete offer (no trickle ICE), the answer back.
// The page's session cookie authenticates (same origin); nothing here holds a secret.
"use strict";

function iceGathered(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      if (pc.iceGatheringState === "complete") {
        pc.removeEventListener("icegatheringstatechange", done);
        resolve();
      }
    };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, 2000); // host candidates are enough on a LAN
  });
}

async function negotiate(pc, url) {
  await pc.setLocalDescription(await pc.createOffer());
  await iceGathered(pc);
  const answer = await fetch(url, {
    method: "POST",
    headers: { "Content-Type": "application/sdp" },
    body: pc.localDescription.sdp,
  });
  if (answer.status !== 201) {
    let reason = answer.statusText;
    try { reason = (await answer.json()).error; } catch (e) { /* not JSON */ }
    const err = new Error(`${answer.status}: ${reason}`);
    err.status = answer.status;
    throw err;
  }
  const location = answer.headers.get("Location");
  await pc.setRemoteDescription({ type: "answer", sdp: await answer.text() });
  return location;
}

async function sessionState() {
  const reply = await fetch("/session");
  return reply.json();
}
