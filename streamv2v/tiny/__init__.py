"""Training scripts of the tiny models trained here on the tiny world (shipped in streamv2v/models):
``styles`` (the style model), ``control`` (its canny ControlNet), ``lora`` (the demo style LoRA).
Each runs as ``python -m streamv2v.tiny.NAME --out DIR``."""
