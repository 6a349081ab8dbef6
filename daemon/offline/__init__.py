"""Offline work: the registry of built-in models, the offline pipeline (a video file in, a video
file out) shared by translate, the benches and the demo, and the demo itself."""
