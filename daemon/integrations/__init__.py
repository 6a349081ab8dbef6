"""What the daemon talks to outside itself: OBS (websocket), global hotkeys, the login service."""
