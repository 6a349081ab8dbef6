"""A UNet's layers by their original SGM names (kohya's SDXL LoRA keys), checked against
diffusers' own converter: every Linear/Conv2d of the real SDXL UNet and of the tiny SDXL's
(built on the meta device: no weights, no memory) named the SGM way by
:mod:`streamv2v.sgm_names`, given a value of its own, read back through
``lora_state_dict(..., unet_config=...)`` (which maps ``input_blocks``/``middle_block``/
``output_blocks`` its own way) lands on the same layer; the kohya reader and the memory
estimate find each one by that name. SD 1.5's UNet against the original checkpoint's names.
The tiny SDXL end to end (a kohya file in SGM names switched in place, equal to diffusers'
merge) is in tests/test_sdxl.py.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from streamv2v.adapters import kohya
from streamv2v.lora_memory import layer_index
from streamv2v.sgm_names import sgm_name, sgm_prefixes

SDXL = dict(
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    transformer_layers_per_block=(1, 2, 10),
    projection_class_embeddings_input_dim=2816,
    cross_attention_dim=2048,
)
SD15 = dict(sample_size=64, cross_attention_dim=768)  # diffusers' defaults are SD 1.x's UNet
#: The tiny SDXL's shape (one resnet a block, 1/1/2 transformers): the numbering is read from
#: the layers, not assumed.
TINY = dict(
    SDXL,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    attention_head_dim=(2, 4, 4),
    transformer_layers_per_block=(1, 1, 2),
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80,
    cross_attention_dim=64,
    norm_num_groups=8,
)


def meta_unet(config: dict) -> nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def diffusers_layer(key: str) -> str:
    """A key of diffusers' converted (old-style) LoRA dict -> the layer it is for."""
    key = key.removeprefix("unet.")
    key = re.sub(
        r"\.processor\.(to_[a-z]+)_lora\..*$",
        lambda m: "." + ("to_out.0" if m[1] == "to_out" else m[1]),
        key,
    )
    return key.split(".lora")[0]


@pytest.mark.parametrize("config", [SDXL, TINY], ids=["sdxl", "tiny-sdxl"])
def test_every_unet_layer_by_its_sgm_name_lands_where_diffusers_puts_it(config):
    from diffusers import StableDiffusionXLPipeline

    unet = meta_unet(config)
    layers = [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    prefixes = sgm_prefixes(layers)
    state, original = {}, {}
    for i, layer in enumerate(layers):
        name = sgm_name(layer, prefixes)
        assert name is not None and name != layer, layer
        assert name.startswith(("input_blocks", "middle_block", "output_blocks", "time_embed",
                                "label_emb", "out.")), name  # fmt: skip
        key = "lora_unet_" + name.replace(".", "_")
        state[f"{key}.lora_down.weight"] = torch.full((1, 1), float(i))
        state[f"{key}.lora_up.weight"] = torch.full((1, 1), float(i))
        state[f"{key}.alpha"] = torch.tensor(1.0)
        original[key.removeprefix("lora_unet_")] = layer
    converted = StableDiffusionXLPipeline.lora_state_dict(state, unet_config=unet.config)[0]
    landed = {diffusers_layer(k): int(v.item()) for k, v in converted.items() if "down" in k}
    assert len(landed) == len(layers)
    for i, layer in enumerate(layers):
        assert landed.get(layer) == i, (layer, sgm_name(layer, prefixes))
    # The kohya reader and the memory estimate find each layer by its SGM name.
    index = layer_index({n: (1, 1) for n in layers})
    for flat, layer in original.items():
        assert kohya.layer_name(unet, flat) == layer
        assert index[flat] == layer


def test_sd15_layers_get_the_original_checkpoints_names():
    """SD 1.x (diffusers' converter can not be the judge there: it takes ``input_blocks_1`` for
    a prefix of ``input_blocks_10``): names of the original v1 checkpoint's layout."""
    unet = meta_unet(SD15)
    layers = [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    prefixes = sgm_prefixes(layers)
    names = {layer: sgm_name(layer, prefixes) for layer in layers}
    assert len(set(names.values())) == len(layers)
    for layer, name in {
        "conv_in": "input_blocks.0.0",
        "down_blocks.0.attentions.1.proj_in": "input_blocks.2.1.proj_in",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "down_blocks.2.resnets.0.conv_shortcut": "input_blocks.7.0.skip_connection",
        "down_blocks.3.resnets.1.conv2": "input_blocks.11.0.out_layers.3",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k": (
            "middle_block.1.transformer_blocks.0.attn2.to_k"
        ),
        "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
        "up_blocks.0.resnets.2.conv1": "output_blocks.2.0.in_layers.2",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",
        "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
        "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2": (
            "output_blocks.11.1.transformer_blocks.0.ff.net.2"
        ),
        "conv_out": "out.2",
        "time_embedding.linear_2": "time_embed.2",
    }.items():
        assert names[layer] == name, layer


def test_text_encoders_and_other_models_get_no_sgm_names():
    assert sgm_prefixes(["text_model.encoder.layers.0.self_attn.q_proj"]) == {}
    unet = sgm_prefixes(["down_blocks.0.resnets.0.conv1"])
    assert sgm_name("conv_in", unet) == "input_blocks.0.0"
    assert sgm_name("down_blocks.0.resnets.0.conv1", unet) == "input_blocks.1.0.in_layers.2"
    assert sgm_name("not_a_layer", unet) is None
