"""The engine on another machine: ``streamv2v serve`` (the GPU side, server.py and session.py)
and the daemon's remote engine worker (client.py), joined by WebRTC (aiortc): camera frames up,
styled frames back, control messages on a data channel (protocol.py)."""
