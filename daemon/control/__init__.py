"""The control plane: the control API and its client, the preview server, metrics, the latency
budget controller, presets and their switching (many voices, one PresetManager)."""
