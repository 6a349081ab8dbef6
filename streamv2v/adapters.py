"""Style LoRAs switched in place: low-rank factors on the device, base copies, in-place rewrites.

A LoRA file (diffusers/peft or kohya/CivitAI safetensors, read through diffusers' own
``lora_state_dict`` and key conversion) becomes :class:`LoraWeights`: per layer of the UNet (and
of the text encoder, when it has such weights) the factors ``down`` (A) and ``up`` (B) and the
scale ``alpha / rank``, on the model's device and dtype. :class:`AdapterLibrary` keeps a copy of
the base weight of every layer a loaded LoRA touches and rewrites those weights **in place**:

    W = W_base + sum_i scale_i * alpha_i / rank_i * B_i @ A_i

computed in float32 and cast to the model's dtype, copied into the parameter's own storage: a
compiled graph or a captured CUDA graph reads the new values with no recompile and no
re-capture, and a frame costs what it costs with the weights fused (no extra matmuls). Only the
layers whose effective set of (LoRA, scale) changed are rewritten; restoring a layer copies its
base back (never a subtraction), so the base comes back bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from streamv2v.errors import ModelLoadError

_PARTS = ("unet", "text_encoder", "text_encoder_2")  # (the second: SDXL's)


class LoraError(ModelLoadError):
    """A LoRA file that cannot be used with this model (the message says which and why)."""


@dataclass(frozen=True)
class LowRank:
    """One layer's LoRA: ``delta = scale * up @ down`` (conv factors flattened)."""

    down: torch.Tensor  #: A: [rank, in] (Linear) or [rank, in, kh, kw] (Conv2d)
    up: torch.Tensor  #: B: [out, rank] or [out, rank, 1, 1]
    scale: float  #: alpha / rank

    @property
    def nbytes(self) -> int:
        return self.down.nbytes + self.up.nbytes


@dataclass
class LoraWeights:
    """A loaded LoRA: its factors per layer name, for the UNet and the text encoder."""

    source: str
    unet: dict[str, LowRank] = field(default_factory=dict)
    text_encoder: dict[str, LowRank] = field(default_factory=dict)
    text_encoder_2: dict[str, LowRank] = field(default_factory=dict)  #: SDXL's second encoder

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for part in _PARTS for f in getattr(self, part).values())

    @property
    def has_text(self) -> bool:
        """Weights for a text encoder (either of SDXL's two)."""
        return bool(self.text_encoder or self.text_encoder_2)


# --------------------------------------------------------------------------- reading files
def read_lora_state(
    source: str | os.PathLike,
    *,
    weight_name: str | None = None,
    allow_pickle: bool = False,
    unet_config: Mapping | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float], dict]:
    """The LoRA's tensors with ``unet.``/``text_encoder.`` keys (kohya files converted by
    diffusers), its network alphas and its adapter metadata, on the CPU."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    name = str(source)
    path = Path(name).expanduser()
    kwargs: dict = {"use_safetensors": None if allow_pickle else True}
    if path.is_file():
        path, weight_name = path.parent, path.name
    elif not path.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise LoraError(f"LoRA file not found: {name} (no such file or directory)")
    if weight_name:
        kwargs["weight_name"] = weight_name
    if unet_config is not None:  # (maps SDXL's SGM block names, input_blocks_4_1..., too)
        kwargs["unet_config"] = unet_config
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        kwargs["local_files_only"] = True
    target = str(path) if path.exists() else name
    try:
        state, alphas, meta = StableDiffusionLoraLoaderMixin.lora_state_dict(
            target, return_lora_metadata=True, **kwargs
        )
    except Exception as exc:  # any reader's error (safetensors, hub, conversion): one message
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise LoraError(f"could not read LoRA {name!r}: {first.rstrip('.')}") from exc
    return dict(state), dict(alphas or {}), dict(meta or {})


def _to_peft(part: str, state: dict) -> dict:
    """Keys of one part (prefix removed) in peft naming (``<layer>.lora_A.weight``), through
    diffusers' own key mappings (old diffusers and kohya-converted names)."""
    from diffusers.utils.state_dict_utils import (
        PEFT_STATE_DICT_MAPPINGS,
        StateDictType,
        convert_state_dict,
        convert_unet_state_dict_to_peft,
    )

    if not state or all(".lora_A." in k or ".lora_B." in k for k in state):
        return state
    if part == "unet":
        return convert_unet_state_dict_to_peft(state)
    out = {}  # (kohya's text-encoder attention keys are old-style, its MLP keys new-style)
    for key, value in state.items():
        kind = (
            StateDictType.DIFFUSERS if "lora_linear_layer" in key else StateDictType.DIFFUSERS_OLD
        )
        out.update(convert_state_dict({key: value}, PEFT_STATE_DICT_MAPPINGS[kind]))
    return out


def _alpha_of(part: str, alphas: Mapping[str, float]) -> dict[str, float]:
    """Network alphas (kohya) by layer name: the converter names them after the down key."""
    out = {}
    for key, value in alphas.items():
        if not key.startswith(f"{part}.") or not key.endswith(".alpha"):
            continue
        stem = key[len(part) + 1 : -len(".alpha")]
        down = stem if stem.endswith(".down.weight") else f"{stem}.lora.down.weight"
        (converted,) = _to_peft(part, {down: None})
        out[converted.removesuffix(".lora_A.weight")] = float(value)
    return out


def _metadata_alpha(part: str, meta: Mapping) -> tuple[float | None, dict[str, float], bool]:
    """lora_alpha, alpha_pattern and use_rslora of a peft adapter config saved with the file."""
    cfg = {k.removeprefix(f"{part}."): v for k, v in meta.items() if k.startswith(f"{part}.")}
    if not cfg and "lora_alpha" in meta:
        cfg = dict(meta)
    pattern = cfg.get("alpha_pattern") or {}
    if isinstance(pattern, str):
        pattern = json.loads(pattern)
    alpha = cfg.get("lora_alpha")
    return (None if alpha is None else float(alpha)), dict(pattern), bool(cfg.get("use_rslora"))


def _layer_alpha(layer: str, pattern: Mapping[str, float]) -> float | None:
    for key, value in pattern.items():
        regex = key[1:] if key.startswith("^") else rf"(.*\.)?{key}"
        if re.fullmatch(regex, layer):
            return float(value)
    return None


def lora_weights(
    state: Mapping[str, torch.Tensor],
    alphas: Mapping[str, float],
    meta: Mapping,
    models: Mapping[str, nn.Module | None],
    source: str,
) -> LoraWeights:
    """Group a LoRA state dict into per-layer factors, checked against ``models`` ("unet",
    "text_encoder") and moved to each model's device and dtype."""
    parts: dict[str, dict[str, torch.Tensor]] = {p: {} for p in _PARTS}
    for key, value in state.items():
        part = next((p for p in _PARTS if key.startswith(f"{p}.")), None)
        if part is None:  # a bare peft file (save_lora_adapter): the UNet's
            part, key = "unet", f"unet.{key}"
        parts[part][key[len(part) + 1 :]] = value
    out = LoraWeights(source)
    for part, tensors in parts.items():
        tensors = _to_peft(part, tensors)
        if not tensors:
            continue
        model = models.get(part)
        if model is None:
            sdxl = " (an SDXL LoRA: use it with an SDXL model)" if part == "text_encoder_2" else ""
            raise LoraError(
                f"LoRA {source!r} has {part} weights but the engine has no {part}{sdxl}"
            )
        odd = [k for k in tensors if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
        if odd:
            raise LoraError(
                f"LoRA {source!r}: unsupported tensor {odd[0]!r} (only plain LoRA factors are "
                "supported: no DoRA, LoHa/LoKr or LoRA biases)"
            )
        net_alpha = _alpha_of(part, alphas)
        meta_alpha, pattern, rslora = _metadata_alpha(part, meta)
        param = next(model.parameters())
        factors = getattr(out, part)
        for key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
            named = key.removesuffix(".lora_A.weight")
            down, up = tensors[key], tensors.get(f"{named}.lora_B.weight")
            if up is None:
                raise LoraError(f"LoRA {source!r}: {part}.{named} has lora_A but no lora_B")
            layer = _resolve(model, named)
            module = _layer(model, part, layer, source)
            rank = down.shape[0]
            if up.shape[1] != rank or up.numel() != module.weight.shape[0] * rank:
                raise LoraError(f"LoRA {source!r}: {part}.{layer} factor shapes do not match")
            if down[0].numel() != module.weight[0].numel():
                raise LoraError(
                    f"LoRA {source!r} does not fit this model: {part}.{layer} expects "
                    f"{tuple(module.weight.shape)}, the LoRA has input {tuple(down.shape[1:])} "
                    "(a LoRA for another base model?)"
                )
            alpha = net_alpha.get(named, _layer_alpha(named, pattern) or meta_alpha)
            alpha = float(rank) if alpha is None else alpha
            scale = alpha / math.sqrt(rank) if rslora else alpha / rank
            factors[layer] = LowRank(
                down.to(device=param.device, dtype=param.dtype).contiguous(),
                up.to(device=param.device, dtype=param.dtype).contiguous(),
                scale,
            )
    if not out.unet and not out.has_text:
        raise LoraError(f"LoRA {source!r} holds no LoRA weights")
    return out


def _resolve(model: nn.Module, layer: str) -> str:
    """The layer's name in ``model``: kohya and older files name the text encoder's layers
    ``text_model.*`` as transformers 4 did; transformers 5's CLIPTextModel has no such level."""
    if layer.startswith("text_model.") and not hasattr(model, "text_model"):
        return layer.removeprefix("text_model.")
    return layer


def _layer(model: nn.Module, part: str, layer: str, source: str) -> nn.Module:
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        raise LoraError(
            f"LoRA {source!r} does not fit this model: it has no layer {part}.{layer} "
            "(a LoRA for another base model, e.g. SDXL?)"
        ) from None
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise LoraError(
            f"LoRA {source!r}: {part}.{layer} is a {type(module).__name__}, not a layer"
        )
    return module


def load_lora(
    source: str | os.PathLike,
    models: Mapping[str, nn.Module | None],
    *,
    weight_name: str | None = None,
    allow_pickle: bool = False,
) -> LoraWeights:
    """Read a LoRA (file, folder or hub id) into factors on the models' device and dtype."""
    unet = models.get("unet")
    sgm = getattr(unet, "config", {}).get("addition_embed_type") == "text_time"
    state, alphas, meta = read_lora_state(
        source,
        weight_name=weight_name,
        allow_pickle=allow_pickle,
        unet_config=unet.config if sgm else None,  # SDXL kohya files name SGM blocks
    )
    return lora_weights(state, alphas, meta, models, str(source))


# --------------------------------------------------------------------------- in-place rewrites
class _Patcher:
    """The touched layers of one model: their base copies and the LoRA set each one holds."""

    def __init__(self, model: nn.Module | None) -> None:
        self.model = model
        self.base: dict[str, torch.Tensor] = {}
        self.params: dict[str, torch.Tensor] = {}
        self.held: dict[str, tuple[tuple[str, float], ...]] = {}  # layer -> applied set

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.base.values())

    def track(self, layer: str) -> None:
        if layer in self.base or self.model is None:
            return
        weight = self.model.get_submodule(layer).weight
        self.params[layer] = weight
        self.base[layer] = weight.detach().clone()
        self.held[layer] = ()

    def forget(self, layer: str) -> None:
        """No loaded LoRA touches ``layer`` any more: restore it and free its base copy."""
        if self.held.get(layer):
            self.params[layer].data.copy_(self.base[layer])
        for d in (self.base, self.params, self.held):
            d.pop(layer, None)

    @torch.no_grad()
    def apply(self, wanted: Mapping[str, list[tuple[str, float, LowRank]]]) -> int:
        """Give every tracked layer the set in ``wanted`` (absent: the base); returns how many
        layers were rewritten."""
        rewritten = 0
        for layer, base in self.base.items():
            terms = wanted.get(layer, [])
            key = tuple((name, scale) for name, scale, _ in terms)
            if key == self.held[layer]:
                continue
            weight = self.params[layer]
            if not terms:
                weight.data.copy_(base)  # exact: the base comes back bit for bit
            else:
                acc = base.to(torch.float32, copy=True)
                flat = acc.view(acc.shape[0], -1)
                for _, scale, f in terms:
                    up, down = f.up.flatten(1).float(), f.down.flatten(1).float()
                    flat.addmm_(up, down, alpha=scale * f.scale)
                weight.data.copy_(acc)
            self.held[layer] = key
            rewritten += 1
        return rewritten


class AdapterLibrary:
    """The style LoRAs of one engine: loaded once, switched in place by :meth:`set_loras`."""

    def __init__(
        self,
        unet: nn.Module,
        text_encoder: nn.Module | None = None,
        text_encoder_2: nn.Module | None = None,
    ) -> None:
        self.models = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
        self._loras: dict[str, LoraWeights] = {}
        self._patch = {part: _Patcher(model) for part, model in self.models.items()}
        self.active: dict[str, float] = {}  #: the UNet's LoRA set now (name -> scale)
        self.rewrites = 0  #: layer rewrites since the start

    # ------------------------------------------------------------------ the set of LoRAs
    def __contains__(self, name: str) -> bool:
        return name in self._loras

    @property
    def names(self) -> list[str]:
        return list(self._loras)

    def get(self, name: str) -> LoraWeights:
        return self._loras[name]

    def load(
        self,
        name: str,
        source: str | os.PathLike,
        *,
        weight_name: str | None = None,
        allow_pickle: bool = False,
    ) -> LoraWeights:
        """Read a LoRA file and add it as ``name`` (LoraError when it does not fit)."""
        weights = load_lora(source, self.models, weight_name=weight_name, allow_pickle=allow_pickle)
        self.add(name, weights)
        return weights

    def add(self, name: str, weights: LoraWeights) -> None:
        """Add (or replace) a LoRA; its layers' base weights are copied now."""
        if name in self._loras:
            self.remove(name)
        self._loras[name] = weights
        for part in _PARTS:
            for layer in getattr(weights, part):
                self._patch[part].track(layer)

    def remove(self, name: str) -> None:
        """Drop a LoRA: its layers are rewritten without it, and freed when none is left."""
        weights = self._loras.pop(name, None)
        if weights is None:
            return
        self.active.pop(name, None)
        self._apply("unet", self.active)
        for part in _PARTS:
            still = {layer for w in self._loras.values() for layer in getattr(w, part)}
            for layer in getattr(weights, part):
                if layer not in still:
                    self._patch[part].forget(layer)

    def retain(self, names: set[str]) -> list[str]:
        """Free every LoRA not in ``names``; returns the ones freed."""
        gone = [n for n in self._loras if n not in names]
        for name in gone:
            self.remove(name)
        return gone

    # ------------------------------------------------------------------ switching
    def set_loras(self, scales: Mapping[str, float]) -> int:
        """Make the UNet's weights ``base + sum(scale * LoRA)`` for ``scales`` (name -> scale;
        0 or absent: off), rewriting only the layers whose set changed. Returns that count."""
        unknown = [n for n in scales if n not in self._loras]
        if unknown:
            raise KeyError(f"no LoRA named {unknown[0]!r} is loaded; loaded: {self.names}")
        self.active = {n: float(s) for n, s in scales.items() if s != 0.0}
        return self._apply("unet", self.active)

    def _apply(self, part: str, scales: Mapping[str, float]) -> int:
        wanted: dict[str, list[tuple[str, float, LowRank]]] = {}
        for name in sorted(scales):
            for layer, f in getattr(self._loras[name], part).items():
                wanted.setdefault(layer, []).append((name, scales[name], f))
        n = self._patch[part].apply(wanted)
        self.rewrites += n
        return n

    @contextmanager
    def text_encoder_loras(self, scales: Mapping[str, float]) -> Iterator[None]:
        """The text encoder with these LoRAs' text-encoder weights applied (for encoding a
        preset's prompt), restored to its base afterwards."""
        active = {n: s for n, s in scales.items() if s and self._loras[n].has_text}
        try:
            if active:
                for part in _PARTS[1:]:  # (both of SDXL's encoders)
                    self._apply(part, active)
            yield
        finally:
            if active:
                for part in _PARTS[1:]:
                    self._apply(part, {})

    def has_text_encoder_weights(self, name: str) -> bool:
        return self._loras[name].has_text

    # ------------------------------------------------------------------ memory
    def memory(self) -> dict[str, int]:
        """Bytes held: the LoRAs' factors and the base copies of the layers they touch."""
        return {
            "lora_bytes": sum(w.nbytes for w in self._loras.values()),
            "lora_base_bytes": sum(p.nbytes for p in self._patch.values()),
            "loras_loaded": len(self._loras),
        }
