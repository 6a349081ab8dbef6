"""LoCon, LoHa (with and without Tucker cores), LoKr (whole and factored), DoRA (kohya's
``dora_scale`` and peft's ``lora_magnitude_vector``), for the UNet and the text encoder,
switched in place (streamv2v.adapters) against peft's own layers merged into the same model:
real files written from peft adapters, read back through the file readers."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from streamv2v.adapters import AdapterLibrary, LoraError, fuse, load_lora
from tests.lycoris_helpers import TinyEncoder, TinyUNet, configs, make, make_mixed

FORMATS = list(configs([]))


@pytest.fixture(scope="module")
def models(tiny_model):
    """The tiny model's UNet and text encoder, through from_pretrained."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    te = CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder")
    return unet.requires_grad_(False), te.requires_grad_(False)


@pytest.fixture(scope="module")
def files(models, tmp_path_factory):
    """Per format: its file and peft's merged weights {(part, layer): weight}."""
    folder = tmp_path_factory.mktemp("lycoris")
    return {fmt: make(folder / f"{fmt}.safetensors", fmt, *models) for fmt in FORMATS}


def _model(models, part):
    return models[0] if part == "unet" else models[1]


def _worst(models, reference, base_of) -> tuple[float, float]:
    """Largest |ours - peft| and smallest |peft - base|, relative to max |peft| per layer."""
    worst, least = 0.0, float("inf")
    for (part, layer), want in reference.items():
        ours = _model(models, part).get_submodule(layer).weight
        scale = float(want.abs().max())
        worst = max(worst, float((ours - want).abs().max()) / scale)
        least = min(least, float((want - base_of(part, layer)).abs().max()) / scale)
    return worst, least


@pytest.mark.parametrize("fmt", FORMATS)
def test_in_place_weights_equal_peft_merged_weights(models, files, fmt):
    path, reference = files[fmt]
    lib = AdapterLibrary(*models)
    lora = lib.load(fmt, path)
    assert {("unet", n) for n in lora.unet} | {("text_encoder", n) for n in lora.text_encoder} == (
        set(reference)
    )
    base = {key: _model(models, key[0]).get_submodule(key[1]).weight.clone() for key in reference}
    lib.set_loras({fmt: 1.0})
    with lib.text_encoder_loras({fmt: 1.0}):
        worst, least = _worst(models, reference, lambda p, n: base[(p, n)])
    assert worst <= 1e-5, worst
    assert least > 1e-2  # every layer really changes (the comparison is not base vs base)
    lib.retain(set())
    for (part, layer), w in base.items():
        assert torch.equal(_model(models, part).get_submodule(layer).weight, w)


def test_a_file_mixing_formats_layer_by_layer(models, tmp_path):
    plan = [
        ("loha", ["to_q"], ["q_proj"]),
        ("lokr-factored", ["conv1"], ["fc1"]),
        ("dora-kohya", ["ff.net.2", "proj_in"], []),
        ("locon", ["conv_shortcut", "to_k"], ["v_proj"]),
        ("loha-tucker", ["conv2"], []),
    ]
    path, reference = make_mixed(tmp_path / "mixed.safetensors", plan, *models)
    lib = AdapterLibrary(*models)
    lora = lib.load("mixed", path)
    kinds = {type(d).__name__ for d in lora.unet.values()}
    assert kinds == {"Hadamard", "Kronecker", "Dora", "LowRank"}
    base = {key: _model(models, key[0]).get_submodule(key[1]).weight.clone() for key in reference}
    lib.set_loras({"mixed": 1.0})
    with lib.text_encoder_loras({"mixed": 1.0}):
        worst, _ = _worst(models, reference, lambda p, n: base[(p, n)])
    lib.retain(set())
    assert worst <= 1e-5, worst


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    unet, te = TinyUNet().requires_grad_(False), TinyEncoder().requires_grad_(False)
    folder = tmp_path_factory.mktemp("tiny-lycoris")
    made = {fmt: make(folder / f"{fmt}.safetensors", fmt, unet, te, seed=3) for fmt in FORMATS}
    return unet, te, made


def test_every_format_holds_on_tiny_layers_too(tiny):
    unet, te, made = tiny
    lib = AdapterLibrary(unet, te)
    for fmt, (path, reference) in made.items():
        lib.load(fmt, path)
        lib.set_loras({fmt: 1.0})
        with lib.text_encoder_loras({fmt: 1.0}):
            worst, least = _worst((unet, te), reference, lambda p, n: lib._patch[p].base[n])
        assert worst <= 1e-5 and least > 1e-2, (fmt, worst, least)
    lib.retain(set())


def test_a_thousand_switches_among_every_format_leave_the_base_bit_identical(tiny):
    unet, te, made = tiny
    params = {(p, n): w for p, m in (("unet", unet), ("text_encoder", te))
              for n, w in m.named_parameters() if n.endswith("weight")}  # fmt: skip
    before = {k: (w.clone(), w.data_ptr()) for k, w in params.items()}
    lib = AdapterLibrary(unet, te)
    for fmt, (path, _) in made.items():
        lib.load(fmt, path)
    rng = np.random.default_rng(0)
    rewritten = 0
    for i in range(1000):
        pick = rng.choice(FORMATS, size=int(rng.integers(0, 3)), replace=False)
        scales = {str(f): float(rng.uniform(-1.0, 1.5)) for f in pick}
        rewritten += lib.set_loras(scales)
        if i % 100 == 7:  # the text encoder's parts too
            with lib.text_encoder_loras(scales):
                pass
    lib.set_loras({})
    assert rewritten > 5000
    for key, (w, ptr) in before.items():
        assert torch.equal(params[key], w), key
        assert params[key].data_ptr() == ptr, key  # the same storage all along
    lib.retain(set())


@pytest.mark.parametrize("fmt", FORMATS)
def test_fused_at_load_equals_switched(tiny, fmt):
    unet, te, made = tiny
    path, _ = made[fmt]
    fused = {"unet": copy.deepcopy(unet), "text_encoder": copy.deepcopy(te)}
    fuse(fused, [(fmt, 0.7, load_lora(path, fused))])
    lib = AdapterLibrary(unet, te)
    lib.load(fmt, path)
    lib.set_loras({fmt: 0.7})
    with lib.text_encoder_loras({fmt: 0.7}):
        for part, model in (("unet", unet), ("text_encoder", te)):
            for name, w in model.named_parameters():
                assert torch.equal(w, fused[part].get_parameter(name)), (part, name)
    lib.retain(set())


def test_dora_on_the_input_side_as_lycoris_2_defines_it(tiny, tmp_path):
    """kohya / LyCORIS 2.x ``dora_scale`` of shape [1, in]: the norms of the merged weight
    per input channel (checked against the formula in float64)."""
    unet, te, _ = tiny
    gen = torch.Generator().manual_seed(4)
    tensors, want = {}, {}
    for layer in ("block.to_q", "conv1"):
        w = unet.get_submodule(layer).weight.detach().double()
        down = torch.randn(2, *w.shape[1:], generator=gen, dtype=torch.float64) * 0.3
        shape = (w.shape[0], 2, *([1, 1] if w.ndim == 4 else []))
        up = torch.randn(shape, generator=gen, dtype=torch.float64) * 0.3
        merged = w + 1.5 * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)  # alpha 3 / rank 2
        norm = merged.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)
        side = (1, -1, *[1] * (w.ndim - 2))
        jitter = torch.rand(norm.shape, generator=gen, dtype=torch.float64).reshape(side)
        magnitude = norm.reshape(side) * (1 + 0.3 * jitter)
        want[layer] = merged * magnitude / norm.reshape(side)
        stem = "lora_unet_" + layer.replace(".", "_")
        tensors |= {
            f"{stem}.lora_down.weight": down.float(),
            f"{stem}.lora_up.weight": up.float(),
            f"{stem}.alpha": torch.tensor(3.0),
            f"{stem}.dora_scale": magnitude.float(),
        }
    save_file(tensors, str(tmp_path / "dora-in.safetensors"))
    lib = AdapterLibrary(unet, te)
    lora = lib.load("in", tmp_path / "dora-in.safetensors")
    assert {d.side for d in lora.unet.values()} == {"in"}
    lib.set_loras({"in": 1.0})
    for layer, w in want.items():
        got = unet.get_submodule(layer).weight.double()
        assert float((got - w).abs().max() / w.abs().max()) <= 1e-6
    lib.retain(set())


def test_locon_with_a_tucker_core_is_the_three_convolutions_in_a_row(tiny, tmp_path):
    unet, te, _ = tiny
    conv = unet.conv1
    gen = torch.Generator().manual_seed(5)
    down = torch.randn(3, 8, 1, 1, generator=gen)
    mid = torch.randn(3, 3, 3, 3, generator=gen)
    up = torch.randn(8, 3, 1, 1, generator=gen) * 0.1
    save_file({"lora_unet_conv1.lora_down.weight": down, "lora_unet_conv1.lora_mid.weight": mid,
               "lora_unet_conv1.lora_up.weight": up, "lora_unet_conv1.alpha": torch.tensor(1.5)},
              str(tmp_path / "locon-cp.safetensors"))  # fmt: skip
    lib = AdapterLibrary(unet, te)
    lib.load("cp", tmp_path / "locon-cp.safetensors")
    x = torch.randn(2, 8, 9, 9, generator=gen)
    plain = conv(x)
    lib.set_loras({"cp": 1.0})
    styled = conv(x)
    lib.retain(set())
    nn_f = torch.nn.functional
    chained = nn_f.conv2d(nn_f.conv2d(nn_f.conv2d(x, down), mid), up) * (1.5 / 3)
    assert torch.allclose(styled - plain, chained, atol=1e-5)


@pytest.mark.parametrize(
    ("keys", "named"),
    [
        ({"lora_unet_conv1.diff": (8, 8, 3, 3)}, "full-weight difference"),
        ({"lora_unet_conv1.a1.weight": (2, 8), "lora_unet_conv1.b1.weight": (8, 2)}, "GLoRA"),
        ({"lora_unet_block_to_q.weight": (16,), "lora_unet_block_to_q.on_input": ()}, "(IA)^3"),
        ({"lora_unet_conv1.oft_blocks": (2, 4, 4)}, "OFT"),
        ({"unet.block.to_q.lora_A.weight": (2, 16), "unet.block.to_q.lora_B.bias": (16,)}, "bias"),
    ],
)
def test_refused_formats_are_named(tiny, tmp_path, keys, named):
    unet, te, _ = tiny
    path = tmp_path / "refused.safetensors"
    save_file({k: torch.ones(s) for k, s in keys.items()}, str(path))
    with pytest.raises(LoraError, match=r"cannot apply: .*" + re.escape(named)) as err:
        load_lora(path, {"unet": unet, "text_encoder": te})
    assert "Supported: LoRA/LoCon, LoHa, LoKr and DoRA" in str(err.value)
