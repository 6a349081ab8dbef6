"""The streamv2v application: dataplane/ (where a frame goes), control/ (the control plane),
integrations/ (OBS, hotkeys, service), offline/ (models, the file pipeline, the demo), cli/ (parsing
and dispatch); app.py wires the daemon together.

This package is the only place with OpenCV and threads; the engine (``streamv2v``) stays a pure
frames-in, frames-out library. Note: the name shadows PyPI's python-daemon, which we never use.
"""
