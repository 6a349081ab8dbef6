"""The SDXL family on a tiny SDXL (diffusers' own tests' config, random weights), loaded through
from_pretrained from a real StableDiffusionXL pipeline folder: equal to diffusers' SDXL img2img,
stream batch == sequential, hundreds of float16 frames with the bank on SDXL's blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from long_run_helpers import encode_each_image_once
from lora_helpers import TARGETS

from streamv2v import EngineConfig, StreamV2V
from streamv2v.families import SD, SDXL, family_of_index, family_of_unet
from streamv2v.testing_sdxl import save_tiny_sdxl_model

SIZE = {"width": 128, "height": 128}
PROMPT = "the cat and the dog"


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return save_tiny_sdxl_model(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


def make_engine(model, dtype=None, **cfg) -> StreamV2V:
    config = EngineConfig(vae="model", **{**SIZE, **cfg})
    engine = StreamV2V.from_pretrained(model, config=config, device="cpu", dtype=dtype)
    engine.set_prompt(PROMPT)
    return engine


def _pipeline(model):
    from diffusers import LCMScheduler, StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(model, local_files_only=True)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_family_is_read_from_the_model_config(tiny_sdxl, tiny_model):
    import json

    from diffusers import UNet2DConditionModel

    assert family_of_unet(UNet2DConditionModel.load_config(tiny_sdxl / "unet")) is SDXL
    assert family_of_unet(UNet2DConditionModel.load_config(tiny_model / "unet")) is SD
    assert family_of_index(json.loads((tiny_sdxl / "model_index.json").read_text())) is SDXL
    assert family_of_index(json.loads((tiny_model / "model_index.json").read_text())) is SD
    # The default tiny VAE means the family's own TAESD.
    assert SDXL.vae_for(EngineConfig().vae) == "madebyollin/taesdxl"
    assert SD.vae_for(EngineConfig().vae) == EngineConfig().vae
    assert SDXL.vae_for("model") == "model"


def test_prompt_embeddings_equal_diffusers_sdxl_encode_prompt(tiny_sdxl):
    engine = make_engine(tiny_sdxl, steps=1, bank={"enabled": False})
    pipe = _pipeline(tiny_sdxl)
    emb, neg, pooled, neg_pooled = pipe.encode_prompt(
        PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
    )
    cond, uncond = engine.prompt_embeds
    hidden, got_pooled = SDXL.split(cond, pooled.shape[-1])
    assert hidden.shape == emb.shape == (1, 77, 64)
    assert torch.allclose(hidden, emb, atol=1e-6)
    assert torch.allclose(got_pooled, pooled, atol=1e-6)
    # SDXL forces zeros for an empty negative prompt (force_zeros_for_empty_prompt).
    assert torch.count_nonzero(neg) == 0 and torch.count_nonzero(uncond) == 0
    assert torch.count_nonzero(neg_pooled) == 0


@pytest.mark.parametrize(
    ("steps", "scale"), [(1, 0.0), (2, 0.0), (1, 1.5)], ids=["1-step", "2-steps", "full-cfg"]
)
def test_one_frame_bank_off_equals_diffusers_sdxl_img2img(tiny_sdxl, steps, scale):
    """The engine (sequential, bank off) == StableDiffusionXLImg2ImgPipeline with the same LCM
    scheduler, timesteps, noise and embeddings, in float32; with full guidance the guidance
    rows carry the negative prompt's embeddings and pooled embedding."""
    guidance = {"guidance": "full", "guidance_scale": scale} if scale else {}
    engine = make_engine(
        tiny_sdxl,
        steps=steps,
        strength=0.5,
        stream_batch=False,
        bank={"enabled": False},
        **guidance,
    )
    engine.set_prompt(PROMPT, negative_prompt="a blurry photo")
    pipe = _pipeline(tiny_sdxl)
    frame = np.random.default_rng(3).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    got = engine(frame, output_type="latent")
    timesteps = [int(t) for t in engine._schedule.timesteps]
    image = torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255.0
    emb, neg, pooled, neg_pooled = pipe.encode_prompt(
        PROMPT, device="cpu", negative_prompt="a blurry photo", do_classifier_free_guidance=True
    )
    # The engine's fixed noise is the seed's first draw on the CPU; for k steps it draws all k
    # slots at once, and the first slot's noise is what noises the frame.
    gen = torch.Generator("cpu").manual_seed(engine.config.seed)
    want = pipe(
        prompt_embeds=emb,
        pooled_prompt_embeds=pooled,
        negative_prompt_embeds=neg,
        negative_pooled_prompt_embeds=neg_pooled,
        image=image,
        timesteps=timesteps,
        strength=1.0,
        guidance_scale=scale,
        generator=gen,
        output_type="latent",
    ).images
    # (with two steps the scheduler's second draw is the engine's second slot's noise)
    diff = (got - want).abs().max().item()
    assert diff <= 1e-4, f"max abs latent difference {diff}"
    assert want.abs().max().item() > 0.1  # not a vacuous comparison


# ------------------------------------------------------------------------- the stream on SDXL
def moving_clip(n: int, size: int = 64, seed: int = 5, period: int | None = None) -> list:
    """A smooth texture panning 2 px a frame, so every frame differs from the last (starting
    over every ``period`` frames)."""
    period = period or n
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((size // 8, (2 * period + size) // 8, 3))
    tex = np.kron(z, np.ones((8, 8, 1)))
    tex = np.clip(128 + 50 * tex, 0, 255).astype(np.uint8)
    starts = [2 * (i % period) for i in range(n)]
    return [np.ascontiguousarray(tex[:, x : x + size]) for x in starts]


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("guidance", ["none", "self", "initialize", "full"])
def test_stream_batch_equals_sequential_on_sdxl(tiny_sdxl, guidance):
    """Bank off, k=2: the batched call's rows (their timesteps, text, pooled embeds and time
    ids, and the residual-CFG stock) give what one call per slot gives."""
    k = 2
    cfg = {"steps": k, "guidance": guidance, "guidance_scale": 1.5, "bank": {"enabled": False}}
    cfg |= {"width": 64, "height": 64}
    batched = make_engine(tiny_sdxl, stream_batch=True, **cfg)
    sequential = make_engine(tiny_sdxl, stream_batch=False, **cfg)
    for e in (batched, sequential):
        e.set_prompt(PROMPT, negative_prompt="a blurry photo")
    clip = moving_clip(24 + k - 1)
    want = [sequential(f, output_type="latent") for f in clip[:24]]
    got = [batched(f, output_type="latent") for f in clip][k - 1 :]
    worst = max((g - w).abs().max().item() for g, w in zip(got, want))
    assert worst <= 1e-4, f"stream batch differs from sequential by {worst}"
    assert (want[0] - want[20]).abs().max().item() > 1e-3  # not vacuous


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_three_hundred_float16_frames_with_the_bank_on_sdxl_blocks(tiny_sdxl, one_torch_thread):
    cfg = {"steps": 2, "width": 64, "height": 64, "guidance": "self", "guidance_scale": 1.2}
    cfg["bank"] = {"interval": 1}
    engine = make_engine(tiny_sdxl, torch.float16, **cfg)
    layers = engine.stats()["bank_tokens_per_layer"]
    # The bank sits on every transformer of SDXL's blocks (two per block here), FF on the
    # mid block's by the name rule.
    assert any(".transformer_blocks.1.attn1" in n for n in layers), layers
    assert engine.fusion_layers and all("mid_block" in n for n in engine.fusion_layers)
    clip = moving_clip(300, period=48)  # 48 distinct frames, each encoded once (the helper)
    encoded = encode_each_image_once(engine)
    peak, fused = 0.0, []
    for f in clip:
        x = engine(f, output_type="latent")
        if x is not None:
            peak = max(peak, x.abs().max().item())
            fused.append(engine.stats()["fused_fraction"])
    assert np.isfinite(peak) and peak < 20, f"latents reached {peak}"
    assert len(encoded) == 48
    assert torch.isfinite(engine._stock).all()
    for group in engine.bank._groups:
        assert torch.isfinite(group.storage).all()
    assert max(fused) > 0, "feature fusion never fused a token: the bank is not alive"
    # Still following the input after 300 frames.
    a, b = clip[0], 255 - clip[0]

    def response(e: StreamV2V) -> float:
        xa = [e(a, output_type="latent") for _ in range(3)][-1]
        xb = [e(b, output_type="latent") for _ in range(3)][-1]
        return (xa.float() - xb.float()).abs().mean().item()

    fresh = make_engine(tiny_sdxl, torch.float16, **cfg)
    assert response(engine) > 0.5 * response(fresh) > 0


def test_similar_image_filter_skips_a_static_scene_on_sdxl(tiny_sdxl):
    still = moving_clip(1)[0]
    engine = make_engine(
        tiny_sdxl, steps=1, width=64, height=64, similar_filter=True, similar_max_skip=5
    )
    calls = {"n": 0}
    engine.unet.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    for _ in range(30):
        engine(still)
    assert calls["n"] == 5  # frames 0, 6, 12, ...: skip 5, process 1
    engine.set_prompt("another prompt")  # never repeats a frame of the old prompt
    engine(still)
    assert calls["n"] == 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_memory_estimate_counts_both_text_encoders_and_the_bank_of_every_sdxl_block(
    tiny_sdxl, dtype
):
    from daemon.models.preflight import estimate_for

    cfg = EngineConfig(vae="model", width=64, height=64, steps=2, bank={"max_frames": 1})
    engine = StreamV2V.from_pretrained(tiny_sdxl, config=cfg, device="cpu", dtype=dtype)
    size = torch.finfo(dtype).bits // 8
    parts = (engine.unet, engine.text_encoder, engine.text_encoder_2, engine.vae)
    loaded = sum(p.numel() * p.element_size() for m in parts for p in m.parameters())
    for c in (cfg, cfg.model_copy(update={"guidance": "full", "guidance_scale": 1.5})):
        engine.set_config(c)
        need = estimate_for(str(tiny_sdxl), c, size)
        assert need.weights == loaded  # the loaded weights' bytes, from the headers alone
        assert need.bank == engine.stats()["bank_bytes"] > 0


# ------------------------------------------------------------------------- LoRAs on SDXL
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


#: LoCon's further UNet layers: down/upsamplers, shortcuts, time embedding projections.
LOCON_TARGETS = [*TARGETS, "conv", "conv_shortcut", "time_emb_proj", "conv_in", "conv_out"]


def write_kohya_sdxl(path, unet, te1, te2, seed=0, sgm=False):
    """A kohya/CivitAI SDXL LoRA (``lora_unet_``, ``lora_te1_``, ``lora_te2_`` keys, alphas);
    ``sgm``: the UNet's layers by their original names, as kohya's sd-scripts writes SDXL files
    (``lora_unet_input_blocks_4_1_...``), LoCon layers included."""
    from lora_helpers import lora_factors
    from safetensors.torch import save_file

    from streamv2v.sgm_names import sgm_name, sgm_prefixes

    tensors = {}
    unet_factors = lora_factors(unet, seed=seed, targets=LOCON_TARGETS if sgm else TARGETS)
    if sgm:
        prefixes = sgm_prefixes(unet_factors["factors"])
        unet_factors["factors"] = {
            sgm_name(layer, prefixes): f for layer, f in unet_factors["factors"].items()
        }
    parts = (
        ("lora_unet_", unet_factors),
        ("lora_te1_", lora_factors(te1, seed=seed + 1, targets=TE_TARGETS)),
        ("lora_te2_", lora_factors(te2, seed=seed + 2, targets=TE_TARGETS)),
    )
    for prefix, part in parts:
        for layer, (down, up) in part["factors"].items():
            # (kohya names the text encoders' layers as transformers 4 did: text_model.*)
            te = "text_model." if prefix != "lora_unet_" and "text_model" not in layer else ""
            key = prefix + (te + layer).replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = down.contiguous()
            tensors[f"{key}.lora_up.weight"] = (up * 4).contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(float(part["alpha"]))
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


@pytest.mark.parametrize("sgm", [False, True], ids=["diffusers-names", "sgm-names"])
def test_kohya_sdxl_lora_with_te1_te2_unet_switches_in_place_equal_to_peft_merged(
    tiny_sdxl, tmp_path, sgm
):
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    from streamv2v.lora_memory import lora_footprint, module_layers

    engine = make_engine(tiny_sdxl, steps=1, bank={"enabled": False})
    path = write_kohya_sdxl(
        tmp_path / "style.safetensors",
        engine.unet,
        engine.text_encoder,
        engine.text_encoder_2,
        sgm=sgm,
    )
    base = {n: p.clone() for n, p in engine.unet.named_parameters()}
    before = engine.encode_prompt(PROMPT)
    weights = engine.adapters.load("style", path)
    assert weights.unet and weights.text_encoder and weights.part("text_encoder_2")
    # The memory estimate (safetensors header only) places every tensor of the file too.
    with safe_open(str(path), "pt") as f:
        header = {k: {"shape": list(f.get_slice(k).get_shape())} for k in f.keys()}  # noqa: SIM118
    parts = {"unet": engine.unet, "text_encoder": engine.text_encoder}
    parts["text_encoder_2"] = engine.text_encoder_2
    footprint = lora_footprint(header, {k: module_layers(m) for k, m in parts.items()})
    assert footprint.unmapped == ()
    assert len(footprint.touched) == sum(len(layers) for layers in weights.parts.values())
    scale = 0.8
    ref = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
    ref.load_lora_weights(str(path), adapter_name="style")
    ref.set_adapters(["style"], [scale])
    ref.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"])
    ref.unload_lora_weights()

    assert engine.set_loras({"style": scale}) > 0
    mine = dict(engine.unet.named_parameters())
    worst = max((mine[n] - p).abs().max().item() for n, p in ref.unet.named_parameters())
    assert worst <= 1e-5, f"UNet weights differ from peft's merge by {worst}"
    changed = sum(not torch.equal(mine[n], base[n]) for n in base)
    assert changed >= len(weights.unet)
    # Both text encoders: applied while a preset's prompt is encoded, equal to peft's merge.
    with engine.adapters.text_encoder_loras({"style": scale}):
        for ours, theirs in ((engine.text_encoder, ref.text_encoder),
                             (engine.text_encoder_2, ref.text_encoder_2)):  # fmt: skip
            got = dict(ours.named_parameters())
            worst = max((got[n] - p).abs().max().item() for n, p in theirs.named_parameters())
            assert worst <= 1e-5, f"text encoder weights differ from peft's merge by {worst}"
    styled = engine.encode_prompt(PROMPT, {"style": scale})
    emb, _, pooled, _ = ref.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(styled, SDXL.pack(emb, pooled), atol=1e-5, rtol=0)
    assert not torch.allclose(styled, before, atol=1e-3)
    # Off again: the base comes back bit for bit, the text encoders too.
    engine.set_loras({})
    assert all(torch.equal(p, base[n]) for n, p in engine.unet.named_parameters())
    assert torch.equal(engine.encode_prompt(PROMPT), before)


def test_an_sdxl_lora_on_an_sd15_model_says_so(tiny_model, tiny_sdxl, tmp_path):
    from streamv2v.adapters import LoraError

    sdxl = make_engine(tiny_sdxl, steps=1, bank={"enabled": False})
    path = write_kohya_sdxl(
        tmp_path / "x.safetensors", sdxl.unet, sdxl.text_encoder, sdxl.text_encoder_2
    )
    sd = make_engine(tiny_model, steps=1, bank={"enabled": False})
    with pytest.raises(LoraError, match="SDXL"):
        sd.adapters.load("x", path)


# ------------------------------------------------------------------------- around the engine
def test_models_pull_reads_the_second_text_encoder_and_taesdxl(tiny_sdxl):
    from daemon.models.engine_config import engine_config
    from daemon.models.needs import Need, needs_of, select_files

    files = {str(p.relative_to(tiny_sdxl)): p.stat().st_size for p in tiny_sdxl.rglob("*")}
    files = {k: v for k, v in files.items() if (tiny_sdxl / k).is_file()}
    chosen = select_files(Need("org/tiny-sdxl", "pipeline"), files)
    assert "text_encoder_2/model.safetensors" in chosen
    assert "tokenizer_2/tokenizer_config.json" in chosen
    assert not any(f.startswith("vae/") for f in chosen)  # (TAESDXL instead)
    # An SDXL model's default tiny VAE is TAESDXL, so that is what is fetched; SD keeps TAESD.
    xl = engine_config("stabilityai/sdxl-turbo")
    assert xl.vae == "madebyollin/taesdxl"
    needs = {(n.repo, n.kind) for n in needs_of("stabilityai/sdxl-turbo", [xl])}
    assert needs == {("stabilityai/sdxl-turbo", "pipeline"), ("madebyollin/taesdxl", "component")}
    local = engine_config(str(tiny_sdxl))  # family read from its model_index.json
    assert local.vae == "madebyollin/taesdxl"
    assert engine_config("some-org/an-sd15-model").vae == "madebyollin/taesd"


def test_doctor_says_the_model_family(tiny_sdxl, tiny_model, capsys):
    from daemon.cli import main

    settings = ["--set", "camera.source=testpattern"]
    settings += ["--set", "output.virtual_camera.enabled=false"]
    for model, label in ((tiny_sdxl, "SDXL family"), (tiny_model, "SD1.5/SD2.1 family")):
        local = ["--set", f"engine.model={model}", "--set", "engine.settings.vae=model"]
        main(["doctor", *local, "--set", "engine.loras=[]", *settings])
        model_line = next(r for r in capsys.readouterr().out.splitlines() if " model " in r)
        assert model_line.startswith("OK") and label in model_line, model_line


def test_sdxl_own_vae_in_float16_is_refused_with_the_fp16_fix_named(tiny_sdxl, tmp_path):
    import shutil

    from diffusers import AutoencoderKL

    from streamv2v import ModelLoadError

    folder = tmp_path / "xl-kl"
    shutil.copytree(tiny_sdxl, folder)
    shutil.rmtree(folder / "vae")
    AutoencoderKL(
        block_out_channels=(8,), norm_num_groups=8, latent_channels=4, force_upcast=True
    ).save_pretrained(folder / "vae")
    cfg = EngineConfig(vae="model", width=64, height=64, steps=1)
    with pytest.raises(ModelLoadError, match="sdxl-vae-fp16-fix"):
        StreamV2V.from_pretrained(folder, config=cfg, device="cpu", dtype=torch.float16)
    engine = StreamV2V.from_pretrained(folder, config=cfg, device="cpu")  # float32: safe
    assert engine.vae.config.force_upcast


def test_an_sdxl_controlnet_steers_the_tiny_sdxl_and_an_sd_controlnet_is_refused(
    tiny_sdxl, tiny_model, tmp_path
):
    """diffusers' ControlNetModel with SDXL's added conditioning (text_embeds, time_ids given
    to it as to the UNet): shapes kept, the scale matters, the stream batch equals sequential."""
    from streamv2v import ModelLoadError
    from streamv2v.testing import save_tiny_controlnet
    from streamv2v.testing_sdxl import save_tiny_sdxl_controlnet

    net = save_tiny_sdxl_controlnet(tmp_path / "xl-canny", tiny_sdxl)
    clip = moving_clip(6)

    def run(scale, **cfg):
        spec = {"model": str(net), "preprocess": "canny", "scale": scale}
        config = EngineConfig(vae="model", width=64, height=64, control=[spec], **cfg)
        engine = StreamV2V.from_pretrained(tiny_sdxl, config=config, device="cpu")
        engine.set_prompt(PROMPT)
        return [engine(f, output_type="latent") for f in clip]

    off = {"enabled": False}
    on = run(1.0, steps=2, bank=off)
    zero = run(0.0, steps=2, bank=off)
    seq = run(1.0, steps=2, bank=off, stream_batch=False)
    assert on[1].shape == (1, 4, 8, 8)
    assert (on[-1] - zero[-1]).abs().max().item() > 1e-3  # the ControlNet steers
    assert (on[-1] - seq[-2]).abs().max().item() <= 1e-4  # stream batch == sequential
    sd_net = save_tiny_controlnet(tmp_path / "sd-canny", tiny_model)
    spec = {"model": str(sd_net), "preprocess": "canny"}
    with pytest.raises(ModelLoadError, match="SDXL"):
        StreamV2V.from_pretrained(
            tiny_sdxl, config=EngineConfig(vae="model", control=[spec]), device="cpu"
        )
