"""Style LoRAs switched in place (streamv2v.adapters) against an engine loaded fresh with the LoRA
fused by diffusers, on the tiny random model: real LoRA files in both formats, real
from_pretrained, hundreds of frames and a thousand switches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamv2v import EngineConfig, LoraSpec, StreamV2V
from streamv2v.adapters import LoraError, load_lora
from tests.lora_helpers import lora_factors, write_diffusers, write_kohya

CFG = EngineConfig(vae="model", width=64, height=64, steps=2)


@pytest.fixture(scope="module")
def loras(tiny_model, tmp_path_factory):
    """Three LoRAs for the tiny model (diffusers format) and one in both formats."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    folder = tmp_path_factory.mktemp("loras")
    made = {name: lora_factors(unet, seed=i + 1) for i, name in enumerate(("a", "b", "c"))}
    files = {name: write_diffusers(folder / f"{name}.safetensors", f) for name, f in made.items()}
    files["a-kohya"] = write_kohya(folder / "a-kohya.safetensors", made["a"])
    return files


@pytest.fixture(scope="module")
def engine(tiny_model, loras):
    engine = StreamV2V.from_pretrained(tiny_model, config=CFG, device="cpu")
    for name in ("a", "b", "c"):
        engine.adapters.load(name, loras[name])
    engine.set_prompt("a cat")
    return engine


def _frames(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    base = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return [np.roll(base, i, axis=1) for i in range(n)]


def _run(engine: StreamV2V, frames) -> list[torch.Tensor]:
    engine.reset()
    return [o.clone() for f in frames if (o := engine(f, output_type="latent")) is not None]


def test_a_switched_in_blend_equals_an_engine_loaded_with_both_loras_fused(
    tiny_model, loras, engine
):
    """A blend of two LoRAs (the layers they share get both terms) against diffusers/peft
    fusing both into a fresh engine's weights."""
    blend = {"a": 0.4, "b": 0.7}
    specs = tuple(LoraSpec(id=str(loras[n]), scale=s) for n, s in blend.items())
    fused = StreamV2V.from_pretrained(
        tiny_model, config=CFG.model_copy(update={"loras": specs}), device="cpu"
    )
    fused.set_prompt("a cat")
    frames = _frames(64)
    engine.set_loras({"c": 1.0})  # some other style first: the switch must undo it
    engine.set_loras(blend)
    ours, theirs = _run(engine, frames), _run(fused, frames)
    engine.set_loras({"b": 0.7})  # one of the two alone: not the blend
    single = _run(engine, frames[:8])
    engine.set_loras({})
    assert len(ours) == len(theirs) == 63
    worst = max(float((x - y).abs().max()) for x, y in zip(ours, theirs))
    assert worst <= 1e-5, worst
    # ...and both LoRAs count (the comparison is not of a single LoRA, nor of plain engines).
    assert float((ours[6] - single[6]).abs().max()) > 1e-2


def test_a_thousand_switches_leave_every_touched_weight_bit_identical(engine):
    unet = engine.unet
    touched = {layer for n in ("a", "b", "c") for layer in engine.adapters.get(n).unet}
    base = {layer: unet.get_submodule(layer).weight.detach().clone() for layer in touched}
    rng = np.random.default_rng(0)
    sets = [{"a": 1.0}, {"b": 0.8}, {"c": -0.5}, {"a": 0.3, "c": 0.6}, {}]
    rewritten = 0
    for i in range(1000):
        if i % 7 == 3:  # a blend step: fractional scales of two sets
            w = float(rng.random())
            scales = {"a": 1.0 - w, "b": 0.8 * w}
        else:
            scales = sets[int(rng.integers(0, len(sets)))]
        rewritten += engine.set_loras(scales)
    engine.set_loras({})
    assert rewritten > 1000
    for layer in touched:
        assert torch.equal(unet.get_submodule(layer).weight, base[layer]), layer
    # The same storage all along: compiled graphs and CUDA graphs keep reading these tensors.
    ptr = unet.get_submodule(next(iter(touched))).weight.data_ptr()
    engine.set_loras({"a": 1.0})
    assert unet.get_submodule(next(iter(touched))).weight.data_ptr() == ptr
    engine.set_loras({})


def test_only_the_layers_whose_set_changed_are_rewritten(engine):
    engine.set_loras({})
    n_a = len(engine.adapters.get("a").unet)
    assert engine.set_loras({"a": 1.0}) == n_a
    assert engine.set_loras({"a": 1.0}) == 0  # same set: nothing to do
    assert engine.set_loras({"a": 0.5}) == n_a
    engine.set_loras({})


def test_kohya_and_diffusers_files_of_one_lora_give_the_same_output(engine, loras):
    engine.adapters.load("a-kohya", loras["a-kohya"])
    a, k = engine.adapters.get("a"), engine.adapters.get("a-kohya")
    assert set(a.unet) == set(k.unet) and any(f.down.ndim == 4 for f in a.unet.values())
    assert all(a.unet[n].scale == k.unet[n].scale == 2.0 for n in a.unet)  # alpha 8 / rank 4
    frames = _frames(12)
    engine.set_loras({"a": 0.9})
    out_a = _run(engine, frames)
    engine.set_loras({"a-kohya": 0.9})
    out_k = _run(engine, frames)
    engine.set_loras({})
    engine.adapters.remove("a-kohya")
    assert max(float((x - y).abs().max()) for x, y in zip(out_a, out_k)) <= 1e-6


def test_memory_counts_factors_and_base_copies_and_frees_what_is_dropped(engine, tmp_path):
    before = engine.stats()
    assert before["loras_loaded"] == 3 and before["lora_bytes"] > 0
    weights = {n: engine.adapters.get(n) for n in ("a", "b", "c")}
    assert before["lora_bytes"] == sum(w.nbytes for w in weights.values())
    touched = {layer for w in weights.values() for layer in w.unet}
    expected = sum(engine.unet.get_submodule(layer).weight.nbytes for layer in touched)
    assert before["lora_base_bytes"] == expected
    # A LoRA on layers of its own (no other loaded LoRA touches them): its base copies are
    # freed with it, and its layers are the base again.
    own = lora_factors(engine.unet, seed=4, targets=["ff.net.0.proj", "time_emb_proj"])
    engine.adapters.load("d", write_diffusers(tmp_path / "d.safetensors", own))
    layers = set(engine.adapters.get("d").unet)
    assert layers and not layers & touched
    base = {layer: engine.unet.get_submodule(layer).weight.detach().clone() for layer in layers}
    engine.set_loras({"d": 1.0})
    grown = engine.stats()["lora_base_bytes"] - before["lora_base_bytes"]
    assert grown == sum(t.nbytes for t in base.values())
    assert engine.adapters.retain({"a", "b", "c"}) == ["d"]
    after = engine.stats()
    assert after["lora_bytes"] == before["lora_bytes"]
    assert after["lora_base_bytes"] == before["lora_base_bytes"]
    assert engine.adapters.active == {}  # a freed LoRA is switched off
    for layer, weight in base.items():
        assert torch.equal(engine.unet.get_submodule(layer).weight, weight), layer


def test_float16_rewrites_are_the_float32_sum_rounded_once(tiny_model, loras):
    engine = StreamV2V.from_pretrained(tiny_model, config=CFG, device="cpu", dtype=torch.float16)
    engine.adapters.load("a", loras["a"])
    lora = engine.adapters.get("a")
    layer, f = next((n, f) for n, f in lora.unet.items() if f.down.ndim == 4)
    weight = engine.unet.get_submodule(layer).weight
    base = weight.detach().clone()
    engine.set_loras({"a": 0.75})
    delta = f.up.double().flatten(1) @ f.down.double().flatten(1) * (0.75 * f.scale)
    exact = base.double() + delta.view_as(base)
    # One rounding to float16 of the float32 sum: within one fp16 step of the exact value.
    assert torch.allclose(weight.double(), exact, rtol=2**-10, atol=2**-24)
    assert not torch.equal(weight, base)
    engine.set_prompt("a cat")
    frames = _frames(40)
    styled = _run(engine, frames)
    assert all(torch.isfinite(o).all() for o in styled)
    for _ in range(50):
        engine.set_loras({"a": 1.0})
        engine.set_loras({"a": 0.33})
    engine.set_loras({})
    assert torch.equal(weight, base)


def test_text_encoder_weights_apply_while_encoding_only(tiny_model, tmp_path):
    engine = StreamV2V.from_pretrained(tiny_model, config=CFG, device="cpu")
    te = engine.text_encoder
    te_lora = lora_factors(te, seed=9, targets=["q_proj", "v_proj", "fc1"])
    wanted = {n for n, _ in te.named_modules() if n.endswith(("q_proj", "v_proj", "fc1"))}
    plain = engine.encode_prompt("a cat")
    embeds = {}
    for fmt, write in (("diffusers", write_diffusers), ("kohya", write_kohya)):
        path = write(tmp_path / f"te-{fmt}.safetensors", lora_factors(engine.unet, seed=3), te_lora)
        engine.adapters.add(fmt, load_lora(path, engine.adapters.models))
        assert set(engine.adapters.get(fmt).text_encoder) == wanted
        layer = next(iter(wanted))
        before = te.get_submodule(layer).weight.clone()
        embeds[fmt] = engine.encode_prompt("a cat", loras={fmt: 1.0})
        assert torch.equal(te.get_submodule(layer).weight, before)  # restored after encoding
    assert float((embeds["diffusers"] - plain).abs().max()) > 1e-3
    assert torch.allclose(embeds["diffusers"], embeds["kohya"], atol=1e-6)
    assert torch.equal(engine.encode_prompt("a cat"), plain)


def test_a_lora_for_another_model_is_refused_with_its_reason(engine, tmp_path):
    from diffusers import UNet2DConditionModel

    other = UNet2DConditionModel(
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=8,
    )
    path = write_diffusers(tmp_path / "other.safetensors", lora_factors(other, seed=1))
    with pytest.raises(LoraError, match="does not fit this model"):
        engine.adapters.load("x", path)
    with pytest.raises(LoraError, match="not found"):
        engine.adapters.load("x", tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LoraError, match="could not read LoRA"):
        engine.adapters.load("x", tmp_path / "junk.safetensors")
    assert "x" not in engine.adapters
    with pytest.raises(KeyError, match="no LoRA named 'nope'"):
        engine.set_loras({"nope": 1.0})
