"""Applying presets to a running engine between frames, without a glitch.

Every preset's prompt embeddings are encoded when the preset library changes, never at a switch,
so a switch costs no text-encoder call. A switch blends the embeddings over the preset's
transition frames while the stream keeps running; what else the preset changes (schedule, seed,
guidance, bank settings) is applied when the blend ends, and the engine's warm-up contract
(``None`` until its buffer is full) keeps the restarted stream's warm-up frames unpublished.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from daemon.styles.presets import Preset
from streamv2v import EngineConfig, StreamV2V

log = logging.getLogger("streamv2v.presets")

Embeds = tuple[torch.Tensor, torch.Tensor]


@dataclass
class _Blend:
    """Embeddings moving from ``start`` to ``target`` over ``frames`` frames."""

    start: Embeds
    target: Embeds
    out: Embeds  #: preallocated buffers the engine reads
    frames: int
    scales: tuple[list[float], list[float]] | None = None  #: ControlNet scales, from and to
    done: int = 0


class StyleSwitcher:
    """The presets' embeddings, and the transition in flight, for one engine."""

    def __init__(
        self,
        engine: StreamV2V,
        base: EngineConfig,
        embeds: dict[tuple[str, str], Embeds] | None = None,
    ) -> None:
        self.engine = engine
        self.base = base
        # ``embeds``: a cache shared with other engines on the same weights (``serve``), filled
        # by its owner; encode() is then not called, as it forgets what this engine does not use.
        self._embeds: dict[tuple[str, str], Embeds] = {} if embeds is None else embeds
        self._blend: _Blend | None = None
        self._after: Preset | None = None  # what to apply once the blend ends
        self._flush = 0  # frames until no output carries the previous prompt

    @property
    def switching(self) -> bool:
        """True until every output is made with the new preset only."""
        return self._blend is not None or self._flush > 0

    def encode(self, presets: Iterable[Preset]) -> int:
        """Encode the prompts not encoded yet and forget the ones no preset uses; returns how
        many were encoded. Called when the library changes, never on a switch."""
        wanted = {(p.prompt, p.negative_prompt) for p in presets if not p.passthrough}
        for key in list(self._embeds):
            if key not in wanted:
                del self._embeds[key]
        new = [key for key in wanted if key not in self._embeds]
        for prompt, negative in new:
            self._embeds[(prompt, negative)] = (
                self.engine.encode_prompt(prompt),
                self.engine.encode_prompt(negative),
            )
        return len(new)

    def _embeds_of(self, preset: Preset) -> Embeds:
        key = (preset.prompt, preset.negative_prompt)
        if key not in self._embeds:  # only when encode() was not given this preset
            log.warning("preset %s was not pre-encoded; encoding it now", preset.name)
            self._embeds[key] = tuple(map(self.engine.encode_prompt, key))  # type: ignore[assignment]
        return self._embeds[key]

    def config_for(self, preset: Preset) -> EngineConfig:
        """The engine configuration of ``preset`` at the engine's current step count and stream
        batching (the latency controller's choice survives a switch, clamped into the preset's
        range), on
        the weights loaded now: LoRAs are fused into them, so other LoRAs need a new engine
        (the daemon loads one in the background)."""
        running = self.engine.config
        config = preset.engine_config(self.base, running.steps)
        return config.model_copy(
            update={"loras": running.loras, "stream_batch": running.stream_batch}
        )

    def start(self, preset: Preset) -> None:
        """Apply ``preset`` at once, restarting the stream (first load, or after passthrough,
        when the stream holds nothing worth blending from)."""
        self._blend, self._after = None, None
        config = self.config_for(preset)
        if config != self.engine.config:
            self.engine.set_config(config)
        else:
            self.engine.reset()
        self.engine.set_prompt_embeds(*self._embeds_of(preset))
        self._flush = self.engine.latency_frames

    def switch(self, preset: Preset) -> None:
        """Begin the transition to ``preset``; :meth:`before_frame` carries it on."""
        target = self._embeds_of(preset)
        self._after = preset
        scales = self._control_scales(preset)
        if preset.transition_frames == 0:
            self._blend = None
            self.engine.set_prompt_embeds(*target)
            if scales is not None:
                self.engine.set_control_scales(scales[1])
            self._finish()
            return
        # From wherever the embeddings are now (possibly mid-way through another blend).
        start = tuple(t.clone() for t in self.engine.prompt_embeds)
        out = tuple(torch.empty_like(t) for t in start)
        frames = preset.transition_frames
        self._blend = _Blend(start, target, out, frames, scales=scales)  # type: ignore[arg-type]

    def _control_scales(self, preset: Preset) -> tuple[list[float], list[float]] | None:
        """The engine's ControlNet scales now and under ``preset`` (None: nothing to blend)."""
        now = [c.scale for c in self.engine.config.control]
        if not now:
            return None
        want = [c.scale for c in self.config_for(preset).control]
        return (now, want) if want != now else None

    def before_frame(self) -> None:
        """Advance the transition by one frame (call before each engine call)."""
        blend = self._blend
        if blend is None:
            self._flush = max(0, self._flush - 1)
            return
        blend.done += 1
        weight = blend.done / blend.frames
        for a, b, out in zip(blend.start, blend.target, blend.out):
            torch.lerp(a, b, weight, out=out)
        self.engine.set_prompt_embeds(*blend.out)
        if blend.scales is not None:  # a tensor write: the ControlNets fade with the prompt
            a, b = blend.scales
            last = blend.done >= blend.frames  # exactly the target: no config mismatch after
            self.engine.set_control_scales(
                b if last else [x + (y - x) * weight for x, y in zip(a, b)]
            )
        if blend.done >= blend.frames:
            self._blend = None
            self.engine.set_prompt_embeds(*blend.target)
            self._finish()

    def _finish(self) -> None:
        """The prompt is fully the new one: apply the rest of the preset."""
        preset, self._after = self._after, None
        if preset is None:
            return
        config = self.config_for(preset)
        if config != self.engine.config:
            self.engine.set_config(config)  # a restart: the warm-up frames are never output
        elif preset.bank_on_switch == "reset":
            self.engine.reset_bank()
        # The outputs of the next latency_frames calls entered the stream before the switch.
        self._flush = self.engine.latency_frames
