"""What differs between the model families the engine runs, as one small object per family.

SD1.5 and SD2.1 (``SD``): one CLIP text encoder, its last hidden states condition the UNet.
SDXL: two text encoders (CLIP ViT-L and OpenCLIP bigG); the UNet's text condition is both
penultimate hidden states concatenated along the channels, and the UNet takes ``added_cond_kwargs``:
``text_embeds`` (the second encoder's pooled, projected embedding) and ``time_ids`` (original size,
crop top-left, target size), a fixed per-configuration tensor. Its default tiny VAE is TAESDXL.

The engine, the bank, the stream, ControlNets and LoRAs are one code path that asks the family.
A prompt's embedding stays ONE tensor ``[1, tokens, dim]`` everywhere outside this module (preset
caches, blends, the remote protocol): for SDXL it holds the 77 token rows followed by one row with
the pooled embedding (zero-padded to ``dim``), so a linear blend of two prompts blends their pooled
embeddings too, exactly as a blend of the separate tensors would.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from streamv2v.config import DEFAULT_VAE
from streamv2v.errors import ModelLoadError

#: The fp16-safe SDXL VAE (the original SDXL VAE overflows in float16).
SDXL_FP16_VAE = "madebyollin/sdxl-vae-fp16-fix"


@dataclass(frozen=True)
class Family:
    """One model family: its name for users, the parts it loads, its default VAE."""

    name: str  #: "sd" (SD1.5/SD2.1) or "sdxl"
    label: str  #: what messages call it
    text_parts: tuple[str, ...]  #: text encoder folders, in encoding order
    tokenizer_parts: tuple[str, ...]
    tiny_vae: str  #: the TAESD the default VAE setting means for this family
    fp16_vae: str | None = None  #: a full VAE that is safe in float16 (None: the model's own)

    @property
    def is_sdxl(self) -> bool:
        return self.name == "sdxl"

    def vae_for(self, requested: str) -> str:
        """The VAE to load for the configured ``vae`` setting: the default tiny VAE is the
        family's own TAESD (TAESD for SD1.5/2.1, TAESDXL for SDXL); anything else as given."""
        return self.tiny_vae if requested == DEFAULT_VAE else requested

    # ------------------------------------------------------------------ prompts
    @torch.inference_mode()
    def encode(
        self,
        prompt: str,
        encoders: Sequence[torch.nn.Module],
        tokenizers: Sequence[Any],
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """``prompt``'s embedding ``[1, tokens(+1), dim]`` in ``dtype`` (one call per encoder)."""
        if not self.is_sdxl:
            ids = _ids(tokenizers[0], prompt, encoders[0].device)
            return encoders[0](ids)[0].to(dtype)
        hidden, pooled = [], None
        for enc, tok in zip(encoders, tokenizers):
            out = enc(_ids(tok, prompt, enc.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # (diffusers' SDXL: the penultimate layer)
            if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds (the last one wins)
                pooled = out[0]
        if pooled is None:
            raise ModelLoadError("SDXL model without a projecting text_encoder_2: no pooled embed")
        return self.pack(torch.cat(hidden, dim=-1), pooled).to(dtype)

    def zeros_for_empty(self, prompt: str, embeds: torch.Tensor, force_zeros: bool) -> torch.Tensor:
        """SDXL's ``force_zeros_for_empty_prompt``: an empty negative prompt is all zeros."""
        if self.is_sdxl and force_zeros and prompt == "":
            return torch.zeros_like(embeds)
        return embeds

    @staticmethod
    def pack(hidden: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """``[B, T, D]`` hidden states and ``[B, P]`` pooled (P <= D) as one ``[B, T + 1, D]``."""
        b, _, d = hidden.shape
        if pooled.shape[-1] > d:
            raise ValueError(f"pooled width {pooled.shape[-1]} exceeds the text width {d}")
        row = hidden.new_zeros((b, 1, d))
        row[:, 0, : pooled.shape[-1]] = pooled
        return torch.cat([hidden, row], dim=1)

    def split(self, embeds: torch.Tensor, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed embedding's hidden states and pooled embedding (views, no copy)."""
        return embeds[:, :-1], embeds[:, -1, :pooled_dim]

    def text_tokens(self, embeds: torch.Tensor) -> int:
        """How many token rows of a packed embedding the UNet sees."""
        return embeds.shape[1] - (1 if self.is_sdxl else 0)


SD = Family("sd", "SD1.5/SD2.1", ("text_encoder",), ("tokenizer",), DEFAULT_VAE)
SDXL = Family(
    "sdxl",
    "SDXL",
    ("text_encoder", "text_encoder_2"),
    ("tokenizer", "tokenizer_2"),
    "madebyollin/taesdxl",
    SDXL_FP16_VAE,
)
FAMILIES = {f.name: f for f in (SD, SDXL)}


def family_of_unet(config: Mapping[str, Any]) -> Family:
    """The family of a UNet from its config (SDXL's has ``addition_embed_type`` "text_time")."""
    return SDXL if config.get("addition_embed_type") == "text_time" else SD


def family_of_index(model_index: Mapping[str, Any]) -> Family:
    """The family of a pipeline from its ``model_index.json`` (a second text encoder: SDXL)."""
    return SDXL if model_index.get("text_encoder_2") else SD


def _ids(tokenizer: Any, prompt: str, device: torch.device) -> torch.Tensor:
    return tokenizer(
        prompt,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)


class AddedConditions:
    """SDXL's ``added_cond_kwargs`` of one UNet call: ``text_embeds`` ``[rows, pooled]`` and
    ``time_ids`` ``[rows, 6]``, allocated once per configuration at fixed addresses; prompts are
    written into them in place (so a compiled graph reads them as static inputs)."""

    def __init__(
        self,
        unet_config: Mapping[str, Any],
        rows: int,
        height: int,
        width: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        step = unet_config["addition_time_embed_dim"]
        ids = (height, width, 0, 0, height, width)  # original size, crop top-left, target size
        self.pooled_dim = unet_config["projection_class_embeddings_input_dim"] - len(ids) * step
        if self.pooled_dim <= 0:
            raise ModelLoadError(
                "this SDXL UNet expects other added time ids (a refiner's aesthetic score?): "
                "only SDXL base-style models (original size, crop, target size) are supported"
            )
        time_ids = torch.tensor([ids], device=device, dtype=dtype).expand(rows, -1)
        self.kwargs = {
            "text_embeds": torch.zeros((rows, self.pooled_dim), device=device, dtype=dtype),
            "time_ids": time_ids.contiguous(),
        }

    def write(self, cond_pooled: torch.Tensor, uncond_pooled: torch.Tensor, n: int) -> None:
        """The first ``n`` rows take the prompt's pooled embedding, the rest the negative's."""
        te = self.kwargs["text_embeds"]
        te[:n].copy_(cond_pooled.expand(n, -1))
        te[n:].copy_(uncond_pooled.expand(te.shape[0] - n, -1))

    def tensors(self) -> list[torch.Tensor]:
        return list(self.kwargs.values())
