"""The one place that turns configuration (the daemon's ``[engine]`` section, a preset, or the
options of an offline command) into an ``EngineConfig``: used by the data plane, the remote engine
and the offline commands alike, so it lives below those rooms."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from daemon.config import DEFAULT_LORA, DEFAULT_MODEL
from daemon.models.registry import (
    BUILTIN_MODELS,
    TINY_CANNY,
    TINY_SDXL,
    TINY_STYLES,
    TINY_STYLES_SIZE,
    control_location,
    model_family,
)

if TYPE_CHECKING:
    from streamv2v import EngineConfig, LoraSpec


def engine_config(
    model: str,
    settings: EngineConfig | None = None,
    *,
    loras: Sequence[LoraSpec] | None = None,
    size: tuple[int, int] | None = None,
    **options: Any,
) -> EngineConfig:
    """The EngineConfig that runs ``model``.

    It starts from ``settings`` (default: the engine's defaults, at the built-in style model's
    own size when that is the model), then applies ``size`` and every option that is not None
    (``steps``, ``strength``, ``seed``, ``stream_batch``, ``vae``...). The LoRAs are ``loras``
    (default: the LCM-LoRA for SD1.5, none for other models). The built-in models take no LoRA
    and their own small VAE unless a ``vae`` option says otherwise: a real VAE would not match
    their latents. A bad value raises pydantic's ValidationError naming the field.
    """
    from streamv2v import EngineConfig, LoraSpec

    fields = {name: value for name, value in options.items() if value is not None}
    if size is None and settings is None and model in (TINY_STYLES, TINY_SDXL):
        size = (TINY_STYLES_SIZE, TINY_STYLES_SIZE)  # the size it was trained at
    if size is not None:
        fields["width"], fields["height"] = size
    if model in BUILTIN_MODELS:
        fields.setdefault("vae", "model")
        loras = ()
    elif loras is None:
        loras = (LoraSpec(id=DEFAULT_LORA, scale=1.0),) if model == DEFAULT_MODEL else ()
    vae_set = "vae" in fields or (settings is not None and "vae" in settings.model_fields_set)
    if model not in BUILTIN_MODELS and not vae_set:
        family = model_family(model)
        if family.is_sdxl:  # the default tiny VAE is the family's own: named, so fetched
            fields["vae"] = family.tiny_vae
    fields["loras"] = tuple(LoraSpec.model_validate(spec) for spec in loras)
    base = {} if settings is None else settings.model_dump(exclude_unset=True)
    config = EngineConfig.model_validate({**base, **fields})
    return _located_control(config)


def _located_control(config: EngineConfig) -> EngineConfig:
    """The built-in ControlNet's name (``tiny-canny``) replaced by its folder in the package,
    as the built-in models' names are; other control models are hub ids or folders."""
    control = getattr(config, "control", ())
    if not any(spec.model == TINY_CANNY for spec in control):
        return config
    located = tuple(
        spec.model_copy(update={"model": control_location(spec.model)})
        if spec.model == TINY_CANNY
        else spec
        for spec in control
    )
    return config.model_copy(update={"control": located})
