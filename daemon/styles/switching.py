"""Applying presets to a running engine between frames, without a glitch.

Every preset's prompt embeddings are encoded (with its text-encoder LoRAs) and its style LoRAs
loaded when the preset library changes, never at a switch, so a switch costs no text-encoder
call and no file read. A switch blends the embeddings, and the LoRA scales (old -> 0, new -> its
scale, one in-place weight rewrite per frame), over the preset's transition frames while the
stream keeps running; what else the preset changes (schedule, seed,
guidance, bank settings) is applied when the blend ends, and the engine's warm-up contract
(``None`` until its buffer is full) keeps the restarted stream's warm-up frames unpublished.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from daemon.styles.loras import StyleLoras
from daemon.styles.presets import Preset
from streamv2v import EngineConfig, StreamV2V
from streamv2v.adapters import LoraSwitchError

log = logging.getLogger("streamv2v.presets")

Embeds = tuple[torch.Tensor, torch.Tensor]
#: Prompt, negative prompt and the text-encoder LoRAs they are encoded with.
PromptKey = tuple[str, str, tuple[tuple[str, float], ...]]


@dataclass
class _Blend:
    """Embeddings and LoRA scales moving from ``start`` to ``target`` over ``frames`` frames."""

    start: Embeds
    target: Embeds
    out: Embeds  #: preallocated buffers the engine reads
    frames: int
    loras_start: dict[str, float]
    loras_target: dict[str, float]
    scales: tuple[list[float], list[float]] | None = None  #: ControlNet scales, from and to
    done: int = 0

    def loras_at(self, weight: float) -> dict[str, float]:
        names = self.loras_start.keys() | self.loras_target.keys()
        a, b = self.loras_start, self.loras_target
        return {n: (1 - weight) * a.get(n, 0.0) + weight * b.get(n, 0.0) for n in sorted(names)}


class StyleSwitcher:
    """The presets' embeddings, and the transition in flight, for one engine."""

    def __init__(
        self,
        engine: StreamV2V,
        base: EngineConfig,
        embeds: dict[PromptKey, Embeds] | None = None,
        loras: StyleLoras | None = None,
    ) -> None:
        self.engine = engine
        self.base = base
        #: Applied to every configuration this switcher sets (the daemon's memory limits).
        self.limit: Callable[[EngineConfig], EngineConfig] = lambda config: config
        # ``embeds``/``loras``: shared with other engines on the same weights (``serve``), filled
        # by their owner; encode() is then not called, as it forgets what this engine does not use.
        self._embeds: dict[PromptKey, Embeds] = {} if embeds is None else embeds
        self.loras = loras if loras is not None else StyleLoras(engine, base.loras)
        #: The LoRA scales this engine's frames are made with now (blended during a switch).
        self.lora_scales: dict[str, float] = {}
        self._blend: _Blend | None = None
        self._after: Preset | None = None  # what to apply once the blend ends
        self._flush = 0  # frames until no output carries the previous prompt
        #: The preset whose switch failed (its LoRA rewrite; the previous style kept), until
        #: the owner reads it and sets it back to None.
        self.failed: str | None = None

    @property
    def switching(self) -> bool:
        """True until every output is made with the new preset only."""
        return self._blend is not None or self._flush > 0

    def encode(self, presets: Iterable[Preset], *, allow_pickle: bool = False) -> int:
        """Load the presets' LoRAs, encode the prompts not encoded yet and forget the ones no
        preset uses; returns how many were encoded. Called when the library changes, never on
        a switch. A preset whose LoRA failed is listed in ``self.loras.errors``."""
        presets = list(presets)
        self.loras.allow_pickle = allow_pickle
        self.loras.sync(presets)
        wanted = {self._key(p) for p in presets if not p.passthrough}
        for key in list(self._embeds):
            if key not in wanted:
                del self._embeds[key]
        new = [key for key in wanted if key not in self._embeds]
        for key in new:
            self._embeds[key] = self._encode(key)
        if self.lora_scales:  # a LoRA freed or failed while in use: off at once
            self._set_loras(self.lora_scales)
        return len(new)

    def _key(self, preset: Preset) -> PromptKey:
        te = self.loras.text_encoder_key(self.loras.scales(preset))
        return (preset.prompt, preset.negative_prompt, te)

    def _encode(self, key: PromptKey) -> Embeds:
        prompt, negative, te = key
        loras = dict(te)
        encode = self.engine.encode_prompt
        return (encode(prompt, loras), encode(negative, loras))

    def _embeds_of(self, preset: Preset) -> Embeds:
        key = self._key(preset)
        if key not in self._embeds:  # only when encode() was not given this preset
            log.warning("preset %s was not pre-encoded; encoding it now", preset.name)
            self._embeds[key] = self._encode(key)
        return self._embeds[key]

    def _set_loras(self, scales: dict[str, float]) -> None:
        loaded = self.engine.adapters  # (a LoRA freed by a library change mid-blend: left out)
        scales = {n: s for n, s in scales.items() if n in loaded}
        self.engine.set_loras(scales)  # (LoraSwitchError: the previous set is back)
        self.lora_scales = scales

    def _switch_failed(self, preset: Preset, err: LoraSwitchError) -> None:
        """A LoRA rewrite of the switch to ``preset`` failed and the library put the previous
        set back: keep the previous style (embeddings, LoRAs) and mark the preset."""
        blend, self._blend, self._after = self._blend, None, None
        if blend is not None:
            self.engine.set_prompt_embeds(*blend.start)
            if err.restored == "previous" and self.lora_scales != blend.loras_start:
                with contextlib.suppress(LoraSwitchError):  # (else the last good step stays)
                    self._set_loras(dict(blend.loras_start))
        if err.restored == "base":
            self.lora_scales = {}
        self.loras.switch_failed(preset.name, err)
        self.failed = preset.name

    def config_for(self, preset: Preset) -> EngineConfig:
        """The engine configuration of ``preset`` at the engine's current step count and stream
        batching (the latency controller's choice survives a switch, clamped into the preset's
        range), on the weights loaded now (``[engine] loras`` fused into them; the preset's
        own LoRAs are switched in place, not part of the configuration)."""
        running = self.engine.config
        config = preset.engine_config(self.base, running.steps)
        return self.limit(
            config.model_copy(update={"loras": running.loras, "stream_batch": running.stream_batch})
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
        self._set_loras(self.loras.scales(preset))
        self.engine.set_prompt_embeds(*self._embeds_of(preset))
        self._flush = self.engine.latency_frames

    def switch(self, preset: Preset) -> None:
        """Begin the transition to ``preset``; :meth:`before_frame` carries it on."""
        target = self._embeds_of(preset)
        loras = self.loras.scales(preset)
        self._after = preset
        scales = self._control_scales(preset)
        if preset.transition_frames == 0:
            self._blend = None
            try:
                self._set_loras(loras)  # one rewrite
            except LoraSwitchError as err:
                self._switch_failed(preset, err)
                return
            self.engine.set_prompt_embeds(*target)
            if scales is not None:
                self.engine.set_control_scales(scales[1])
            self._finish()
            return
        # From wherever the embeddings and LoRA scales are now (maybe mid-way through a blend).
        start = tuple(t.clone() for t in self.engine.prompt_embeds)
        out = tuple(torch.empty_like(t) for t in start)
        self._blend = _Blend(
            start,  # type: ignore[arg-type]
            target,
            out,  # type: ignore[arg-type]
            preset.transition_frames,
            dict(self.lora_scales),
            loras,
            scales=scales,
        )

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
        if blend.loras_start or blend.loras_target:  # one in-place rewrite of the touched layers
            try:
                self._set_loras({n: s for n, s in blend.loras_at(weight).items() if s != 0.0})
            except LoraSwitchError as err:
                assert self._after is not None
                self._switch_failed(self._after, err)
                return
        if blend.scales is not None:  # a tensor write: the ControlNets fade with the prompt
            a, b = blend.scales
            last = blend.done >= blend.frames  # exactly the target: no config mismatch after
            self.engine.set_control_scales(
                b if last else [x + (y - x) * weight for x, y in zip(a, b)]
            )
        if blend.done >= blend.frames:
            try:
                self._set_loras(dict(blend.loras_target))
            except LoraSwitchError as err:
                assert self._after is not None
                self._switch_failed(self._after, err)
                return
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
