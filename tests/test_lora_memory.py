"""The presets' LoRAs priced from file headers: the estimate equals the bytes the adapter library
really holds (base copies of the touched layers, each LoRA's factors), in float32 and float16."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel

from daemon.models.lora_sizes import LoraSizer, model_layers, read_header
from streamv2v import LoraSpec
from streamv2v.adapters import AdapterLibrary
from streamv2v.lora_memory import layer_index, layer_of, lora_footprint, module_layers
from tests.lora_helpers import lora_factors, write_diffusers, write_kohya

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
OLD_DIFFUSERS = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1."


@pytest.fixture(scope="module")
def files(tiny_model, tmp_path_factory):
    """Three real LoRA files: a LoCon (attention, projections, resnet convs) with text-encoder
    weights in the diffusers format, an attention LoRA in kohya's format (its layers a subset
    of the LoCon's), and a text-encoder-only one."""
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    te = CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder")
    folder = tmp_path_factory.mktemp("priced")
    te_lora = lora_factors(te, seed=2, targets=["q_proj", "v_proj", "fc1"])
    te_only = lora_factors(te, seed=3, targets=["k_proj", "out_proj"], rank=2)
    return {
        "locon": write_diffusers(folder / "locon.safetensors", lora_factors(unet, seed=1), te_lora),
        "attn": write_kohya(
            folder / "attn.safetensors",
            lora_factors(unet, seed=4, rank=8, targets=ATTENTION),
        ),
        "te": write_kohya(
            folder / "te.safetensors", {"factors": {}, "rank": 2, "alpha": 2}, te_only
        ),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_estimate_equals_the_bytes_the_adapter_library_holds(tiny_model, files, dtype):
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet", torch_dtype=dtype)
    te = CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder", dtype=dtype)
    sizer = LoraSizer(tiny_model)  # the model's layers from its weight files' headers
    for part, model in (("unet", unet), ("text_encoder", te)):
        live = module_layers(model)
        assert {name: sizer.layers[part][name] for name in live} == live
    size = torch.finfo(dtype).bits // 8
    library = AdapterLibrary(unet, te)
    specs = {}
    for count, name in enumerate(("attn", "locon", "te"), start=1):
        library.load(name, files[name])
        specs[name] = LoraSpec(id=str(files[name]))
        estimate = sizer.memory(specs, size)
        held = library.memory()
        assert estimate.base_bytes == held["lora_base_bytes"] > 0
        for n in specs:
            assert estimate.factor_bytes[n] == library.get(n).nbytes > 0
        assert sum(estimate.factor_bytes.values()) == held["lora_bytes"]
        assert held["loras_loaded"] == count
    # The attention LoRA's layers are among the LoCon's: the union copies them once.
    attn, locon = (sizer.footprint(specs[n]) for n in ("attn", "locon"))
    assert attn.touched < locon.touched and not attn.unmapped and not locon.unmapped
    alone = sizer.memory({"locon": specs["locon"], "te": specs["te"]}, size)
    assert alone.base_bytes == sizer.memory(specs, size).base_bytes


def test_every_tensor_but_alpha_counts_by_the_layer_it_names():
    """The header reader's rule for the formats the in-place reader grows into: LoHa, LoKr
    (whole and factored, Tucker cores), DoRA (kohya's dora_scale, peft's magnitude), old
    diffusers processor names; alphas and tensors for layers the model lacks count nothing."""
    layers = {
        "unet": {
            "down_blocks.0.attentions.0.proj_in": (32, 32, 1, 1),
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (32, 32),
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0": (32, 32),
            "down_blocks.0.resnets.0.conv1": (32, 32, 3, 3),
            "down_blocks.0.resnets.0.norm1": (32,),
        },
        "text_encoder": {"text_model.encoder.layers.0.self_attn.q_proj": (16, 16)},
    }
    header = {
        "__metadata__": {"ss_network_module": "lycoris.kohya"},
        "lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a": {"shape": [32, 4]},
        "lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_b": {"shape": [4, 288]},
        "lora_unet_down_blocks_0_resnets_0_conv1.hada_t1": {"shape": [4, 4, 3, 3]},
        "lora_unet_down_blocks_0_resnets_0_conv1.alpha": {"shape": []},
        "lora_unet_down_blocks_0_attentions_0_proj_in.lokr_w1": {"shape": [4, 4]},
        "lora_unet_down_blocks_0_attentions_0_proj_in.lokr_w2_a": {"shape": [8, 2]},
        "lora_unet_down_blocks_0_attentions_0_proj_in.dora_scale": {"shape": [32, 1]},
        OLD_DIFFUSERS + "processor.to_out_lora.up.weight": {"shape": [32, 2]},
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_magnitude_vector": {
            "shape": [32]
        },
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": {"shape": [2, 16]},
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": {"shape": [2, 8]},
        "lora_unet_up_blocks_9_attentions_0_proj_in.lora_down.weight": {"shape": [2, 32]},
    }
    footprint = lora_footprint(header, layers)
    assert footprint.factor_elements == 128 + 1152 + 144 + 16 + 16 + 32 + 64 + 32 + 32
    assert footprint.touched == {
        ("unet", "down_blocks.0.resnets.0.conv1"),
        ("unet", "down_blocks.0.attentions.0.proj_in"),
        ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"),
        ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
        ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj"),
    }
    assert sorted(footprint.unmapped) == [
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
        "lora_unet_up_blocks_9_attentions_0_proj_in.lora_down.weight",
    ]
    index = {"unet": layer_index(layers["unet"])}
    assert layer_of("lora_unet_down_blocks_0_resnets_0_norm1.lora_down.weight", index) is None


def test_the_model_layers_come_from_headers_alone(tiny_model, tmp_path):
    layers = model_layers(tiny_model)
    unet = layers["unet"]
    assert len(unet["conv_in"]) == 4 and len(unet["time_embedding.linear_1"]) == 2
    assert model_layers(tmp_path) == {}
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_header(junk)


def test_the_preflight_refuses_a_locon_preset_that_does_not_fit_before_reading_it(
    tiny_model, files, monkeypatch
):
    """A card with room for the model and an attention LoRA, not for a LoCon's base copies: the
    preflight says so (naming the LoRA) from the headers alone; with the base copies in host
    memory ("host", or "auto" when short) the LoCon fits."""
    import streamv2v.adapters as adapters
    from daemon.models.preflight import estimate_for, lora_memory, shortage
    from streamv2v import EngineConfig
    from streamv2v.memory import OVERHEAD

    def no_reading(*args, **kwargs):
        raise AssertionError("a LoRA file was read")

    monkeypatch.setattr(adapters, "load_lora", no_reading)
    monkeypatch.setattr(adapters.reader, "read_file", no_reading)  # (the tensors' reader)
    monkeypatch.setattr(adapters.files, "read_file", no_reading)
    model = str(tiny_model)
    floor = EngineConfig(vae="model", width=64, height=64, steps=1, bank={"enabled": False})
    base = estimate_for(model, floor, 2)
    attn = lora_memory(model, {"attn": LoraSpec(id=str(files["attn"]))}, 2)
    locon = lora_memory(model, {"locon": LoraSpec(id=str(files["locon"]))}, 2)
    assert attn.total < locon.base_bytes / 2
    free = base.total + int(OVERHEAD * (sum(locon.factor_bytes.values()) + locon.base_bytes / 2))
    card = {"dtype_bytes": 2, "free": free, "total": 8 * 2**30, "device": "cuda:0"}
    assert shortage(model, floor, **card) is None
    assert shortage(model, floor, loras=attn, **card) is None
    refused = shortage(model, floor, loras=locon, **card)
    assert refused is not None and "LoRAs hold" in refused and "largest: locon" in refused
    assert "LoRA base copies" in refused  # the need by part names them
    assert shortage(model, floor, loras=locon, lora_base="host", **card) is None
    assert shortage(model, floor, loras=locon, lora_base="auto", **card) is None
    assert shortage(model, floor, loras=locon, lora_base="auto", **{**card, "free": base.total})


def test_the_preflight_prices_only_the_loras_the_presets_switch(files):
    from daemon.dataplane.engine_worker import switched_specs
    from daemon.styles.presets import Preset

    attn, locon = (LoraSpec(id=str(files[n])) for n in ("attn", "locon"))
    presets = [
        Preset(name="a", prompt="x", loras=(attn,)),
        Preset(name="b", prompt="y", loras=(locon, attn)),
        Preset(name="c", prompt="z"),
    ]
    assert switched_specs(presets, ()) == {attn.id: attn, locon.id: locon}
    # A LoRA fused at load at the preset's own scale is not switched: nothing more to hold.
    assert switched_specs(presets, (attn,)) == {locon.id: locon}


def test_streamv2v_presets_and_the_page_listing_show_each_loras_bytes(tmp_path, capsys):
    """The demo presets without a daemon: the sepia LoRA's bytes are what the adapter library
    holds for it on the float16 model (the dtype an accelerator runs), said per LoRA."""
    from daemon.app import local_preset_listing
    from daemon.config import DaemonConfig
    from daemon.control.tables import preset_table
    from daemon.models.registry import tiny_styles_dir

    config = DaemonConfig.model_validate(
        {"engine": {"model": "tiny-styles"}, "presets": {"bundled": "demo", "dir": str(tmp_path)}}
    )
    listing = local_preset_listing(config)
    (sepia,) = [r for r in listing["presets"] if r["name"] == "sepia"]
    (lora,) = sepia["loras"]
    root, f16 = tiny_styles_dir(), torch.float16
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=f16)
    te = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", dtype=f16)
    library = AdapterLibrary(unet, te)
    library.load("sepia", lora["id"])
    assert lora["bytes"] == library.get("sepia").nbytes > 0
    assert listing["lora_base_bytes"] >= library.memory()["lora_base_bytes"] > 0
    lines, _ = preset_table(listing, running=False)
    (line,) = [line for line in lines if line.split()[0] == "sepia"]
    assert f"[LoRA sepia.safetensors {lora['bytes'] / 2**20:.1f} MiB]" in line
    assert any("LoRA base copies" in line for line in lines)
    plain = [r for r in listing["presets"] if r["name"] == "plain"]
    assert plain and plain[0]["loras"] == []


def test_check_memory_on_a_cuda_card_counts_the_presets_loras(tiny_model, files, monkeypatch):
    """The preflight's entry point as the engine worker calls it, on a CUDA card this machine
    lacks (its free-memory query is the one fake): the LoCon's base copies tip it over; the
    shortfall an engine with lora_base = "auto" asks for says by how much."""
    from daemon.models.preflight import MemoryShortage, check_memory, estimate_for, lora_memory
    from streamv2v import EngineConfig
    from streamv2v.lora_memory import device_shortfall
    from streamv2v.memory import OVERHEAD

    model = str(tiny_model)
    floor = EngineConfig(vae="model", width=64, height=64, steps=1, bank={"enabled": False})
    specs = {"locon": LoraSpec(id=str(files["locon"]))}
    locon = lora_memory(model, specs, 2)
    free = estimate_for(model, floor, 2).total + int(OVERHEAD * locon.total / 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 8 * 2**30))
    check_memory(model, floor, "cuda", "float16")  # without the LoRAs: fits
    with pytest.raises(MemoryShortage, match="LoRA base copies"):
        check_memory(model, floor, "cuda", "float16", loras=specs)
    check_memory(model, floor, "cuda", "float16", loras=specs, lora_base="host")
    # "auto": fits with the base copies on the host; the room it reports for them is too small,
    # so the library the engine worker feeds it puts them there.
    headroom = check_memory(model, floor, "cuda", "float16", loras=specs, lora_base="auto")
    assert headroom is not None and 0 <= headroom < locon.base_bytes
    from streamv2v.adapters import choose_lora_base

    assert choose_lora_base("auto", base_bytes=locon.base_bytes, headroom_bytes=headroom) == "host"
    assert check_memory(model, floor, "cpu", "float16", loras=specs, lora_base="auto") is None
    assert device_shortfall(free + 123, "cuda:0") == 123
    assert device_shortfall(free, "cuda:0") == 0
    assert device_shortfall(10**15, "cpu") == 0  # the CPU's (and MPS's) memory is the system's
