"""The streamv2v application: CLI, video files, and (later) camera, virtual camera and control.

This package is the only place with OpenCV and threads; the engine (``streamv2v``) stays a pure
frames-in, frames-out library. Note: the name shadows PyPI's python-daemon, which we never use.
"""
