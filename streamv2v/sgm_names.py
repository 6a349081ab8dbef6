"""The original (SGM / ldm) names of a diffusers UNet's layers, as kohya's sd-scripts writes
SDXL LoRAs: ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`` is
``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``.

The original UNet numbers its blocks in one run: ``input_blocks.0`` is ``conv_in``, then each
down block's layers (resnet ``.0``, its transformer ``.1``) and its downsampler (``.0.op``) one
index each; ``middle_block`` is resnet, transformer, resnet; ``output_blocks`` number each up
block's layers, the upsampler riding on the block's last one (``.1.conv``, or ``.2.conv`` after a
transformer). Inside a resnet, ``in_layers.2`` is ``conv1``, ``out_layers.3`` ``conv2``,
``emb_layers.1`` ``time_emb_proj`` and ``skip_connection`` ``conv_shortcut``. The numbering is
read from the layers the model has (how many resnets each block holds, which have
transformers), so it holds for SD 1.x/2.x, SDXL and their tiny test models alike, from a live
model's module names or from a weight file's header. Pure Python: the preflight prices LoRA
files with it before torch loads anything.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

#: Layers outside the numbered blocks.
_FIXED = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
#: A resnet's layers, diffusers -> original.
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_BLOCK = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)")


def _shape(names: Iterable[str]) -> dict[tuple[str, int], dict[str, int]]:
    """(down/up, block) -> {"resnets": count, "attentions": count, "downsamplers"/"upsamplers"}."""
    blocks: dict[tuple[str, int], dict[str, int]] = {}
    for name in names:
        found = _BLOCK.match(name)
        if found:
            kind, block, inner, index = found.groups()
            counts = blocks.setdefault((kind, int(block)), {})
            counts[inner] = max(counts.get(inner, 0), int(index) + 1)
    return blocks


def sgm_prefixes(names: Iterable[str]) -> dict[str, str]:
    """Diffusers module prefix -> its original name, for a UNet with the layers ``names``
    (dotted module or weight names). Empty when ``names`` are not a UNet's."""
    names = list(names)
    blocks = _shape(names)
    if not blocks:
        return {}
    out = dict(_FIXED)
    index = 1
    for block in range(1 + max((b for k, b in blocks if k == "down"), default=-1)):
        counts = blocks.get(("down", block), {})
        for layer in range(counts.get("resnets", 0)):
            out[f"down_blocks.{block}.resnets.{layer}"] = f"input_blocks.{index}.0"
            out[f"down_blocks.{block}.attentions.{layer}"] = f"input_blocks.{index}.1"
            index += 1
        if counts.get("downsamplers"):
            out[f"down_blocks.{block}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1
    out["mid_block.resnets.0"] = "middle_block.0"
    out["mid_block.attentions.0"] = "middle_block.1"
    out["mid_block.resnets.1"] = "middle_block.2"
    index = 0
    for block in range(1 + max((b for k, b in blocks if k == "up"), default=-1)):
        counts = blocks.get(("up", block), {})
        layers = counts.get("resnets", 0)
        for layer in range(layers):
            out[f"up_blocks.{block}.resnets.{layer}"] = f"output_blocks.{index}.0"
            out[f"up_blocks.{block}.attentions.{layer}"] = f"output_blocks.{index}.1"
            if layer == layers - 1 and counts.get("upsamplers"):
                slot = 2 if counts.get("attentions") else 1
                out[f"up_blocks.{block}.upsamplers.0.conv"] = f"output_blocks.{index}.{slot}.conv"
            index += 1
    return out


def sgm_name(name: str, prefixes: dict[str, str]) -> str | None:
    """The original name of diffusers layer ``name`` (None: it has none)."""
    head = name
    while head:
        if head in prefixes:
            rest = name[len(head) :].lstrip(".")
            if ".resnets." in head or head.startswith("mid_block.resnets"):
                first, _, tail = rest.partition(".")
                rest = ".".join(p for p in (_RESNET.get(first, first), tail) if p)
            return ".".join(p for p in (prefixes[head], rest) if p)
        head = head.rpartition(".")[0]
    return None


def sgm_flat_aliases(names: Iterable[str]) -> dict[str, str]:
    """Each UNet layer's original name flattened as kohya writes it (dots to underscores) ->
    its diffusers name; empty when ``names`` are not a UNet's (a text encoder's)."""
    names = list(names)
    prefixes = sgm_prefixes(names)
    if not prefixes:
        return {}
    aliases = {}
    for name in names:
        original = sgm_name(name, prefixes)
        if original is not None:
            aliases[original.replace(".", "_")] = name
    return aliases
