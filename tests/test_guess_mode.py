"""Guess mode as diffusers does it: a ControlNet whose config sets ``global_pool_conditions``
(shuffle), or whose spec asks for ``guess_mode``, steers the conditional rows only; guidance's
unconditional rows get no residual. Checked against diffusers' own
StableDiffusionControlNetPipeline (its UNet call, same latents, timestep and embeddings) and in
the engine's stream batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamv2v import ControlSpec, EngineConfig, StreamV2V
from streamv2v.control import load_control
from streamv2v.testing import save_tiny_controlnet


@pytest.fixture(scope="module")
def nets(tiny_model, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("guess")
    return {
        "plain": str(save_tiny_controlnet(root / "plain", tiny_model)),
        "pooled": str(
            save_tiny_controlnet(root / "pooled", tiny_model, seed=1, global_pool_conditions=True)
        ),
    }


def capture(module: torch.nn.Module, into: list) -> torch.utils.hooks.RemovableHandle:
    def hook(mod, args, kwargs, output):
        into.append((args, kwargs, output))

    return module.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("net", "guess_mode"), [("pooled", False), ("plain", True)], ids=["global-pool", "asked"]
)
def test_the_controlled_unet_equals_diffusers_pipeline_in_guess_mode(
    tiny_model, nets, net, guess_mode
):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    torch.manual_seed(0)
    controlnet = ControlNetModel.from_pretrained(nets[net])
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        tiny_model, controlnet=controlnet, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    unet_calls, net_calls = [], []
    hooks = [capture(pipe.unet, unet_calls), capture(pipe.controlnet, net_calls)]
    pipe(
        "a cat",
        image=image,
        height=64,
        width=64,
        num_inference_steps=1,
        guidance_scale=5.0,
        guess_mode=guess_mode,
        output_type="latent",
        generator=torch.Generator().manual_seed(1),
    )
    for h in hooks:
        h.remove()
    ((args, kwargs, output),) = unet_calls
    latents, t = args[0], args[1]
    embeds = kwargs["encoder_hidden_states"]
    want = output[0] if isinstance(output, tuple) else output.sample
    # diffusers ran its ControlNet on the conditional half only (rows: uncond, cond).
    assert net_calls[0][0][0].shape[0] == 1 and latents.shape[0] == 2
    assert all(
        (r[0] == 0).all() and (r[1] != 0).any() for r in kwargs["down_block_additional_residuals"]
    )
    cond_image = net_calls[0][1]["controlnet_cond"]

    # The engine's rows: conditional first, then unconditional.
    spec = ControlSpec(model=nets[net], preprocess="image", guess_mode=guess_mode)
    stream = load_control([spec], pipe.unet)
    assert stream.guess == [True]
    ours = stream.model(pipe.unet)
    order = torch.tensor([1, 0])
    with torch.no_grad():
        got = ours(
            latents[order],
            t.expand(2),
            encoder_hidden_states=embeds[order],
            control=[cond_image.expand(2, -1, -1, -1)],
            cond_rows=1,
        )[0]
    torch.testing.assert_close(got, want[order], atol=1e-4, rtol=0)


def residual_rows(engine: StreamV2V, frames: list[np.ndarray]) -> list[list[torch.Tensor]]:
    """The down-block residuals each UNet call of the engine received."""
    seen = []
    handle = capture(engine.unet, seen)
    try:
        for f in frames:
            engine(f)
    finally:
        handle.remove()
    return [kw["down_block_additional_residuals"] for _, kw, _ in seen]


@pytest.mark.slow
@pytest.mark.parametrize("guidance", ["full", "initialize"])
def test_the_engine_gives_guess_mode_controlnets_no_residual_on_unconditional_rows(
    tiny_model, nets, guidance
):
    frames = [np.random.default_rng(i).integers(0, 256, (64, 64, 3), np.uint8) for i in range(3)]
    results = {}
    for name in ("pooled", "plain"):
        config = EngineConfig(
            vae="model",
            width=64,
            height=64,
            steps=2,
            stream_batch=True,
            guidance=guidance,
            guidance_scale=2.0,
            bank={"enabled": False},
            control=[{"model": nets[name], "preprocess": "image"}],
        )
        engine = StreamV2V.from_pretrained(tiny_model, config=config, device="cpu")
        engine.set_prompt("a cat", "a dog")
        results[name] = residual_rows(engine, frames)
    uncond = 2 if guidance == "full" else 1  # rows after the 2 conditional ones
    for name, calls in results.items():
        assert calls and all(r.shape[0] == 2 + uncond for res in calls for r in res)
        cond = torch.stack([r[:2].abs().amax() for res in calls for r in res])
        rest = torch.stack([r[2:].abs().amax() for res in calls for r in res])
        assert (cond > 0).all()
        if name == "pooled":  # guess mode: nothing on the unconditional rows
            assert (rest == 0).all()
        else:  # a plain ControlNet steers every row
            assert (rest > 0).all()
