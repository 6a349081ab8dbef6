"""The control plane: the one aiohttp server (guard, auth, routes, MJPEG, events, the page), the
control API's client, metrics and the latency-budget controller. Presets and switching live in
daemon/styles/."""
