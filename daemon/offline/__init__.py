"""Offline work: the offline pipeline (a video file in, a video file out) shared by translate, the
benches and the demo, eval and its report, and the demo itself. The model registry and
``engine_config`` are below the rooms, in daemon/models/."""
