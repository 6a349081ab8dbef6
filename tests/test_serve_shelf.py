"""`serve`'s shelf of ControlNets and LoRA users, on the shipped tiny style model's real UNet and
the shipped tiny canny ControlNet: one load per distinct model however many sessions name it,
freed with the last; each session its own scales."""

from __future__ import annotations

import shutil

import pytest
import torch

from daemon.models.registry import tiny_canny_dir, tiny_styles_dir
from daemon.remote.metrics import serve_metrics_text
from daemon.remote.shelf import ControlShelf, LoraUsers, module_bytes
from streamv2v import ControlSpec


@pytest.fixture(scope="module")
def unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_styles_dir() / "unet")


def test_a_controlnet_loads_once_for_all_sessions_and_goes_with_the_last(unet, tmp_path):
    other = tmp_path / "other-net"
    shutil.copytree(tiny_canny_dir(), other)
    canny = ControlSpec(model=str(tiny_canny_dir()), preprocess="canny", scale=1.0)
    shelf = ControlShelf(unet)
    first = shelf.acquire(1, [canny])
    second = shelf.acquire(2, [canny.model_copy(update={"scale": 0.5})])
    third = shelf.acquire(3, [ControlSpec(model=str(other), preprocess="image")])
    # One net for the two sessions naming it (its weights once), another for the third.
    assert first.nets[0] is second.nets[0] and third.nets[0] is not first.nets[0]
    assert first.preprocessors[0] is second.preprocessors[0]
    # Each session its own scales (a live tensor write of one does not touch the other).
    first.set_scales([0.25])
    assert second.scales.tolist() == [0.5] and first.scales.tolist() == [0.25]
    figures = shelf.figures()["controlnets"]
    assert figures[canny.model]["sessions"] == 2 and figures[str(other)]["sessions"] == 1
    assert figures[canny.model]["bytes"] == module_bytes(first.nets[0]) > 1e6
    assert shelf.release(3) == [str(other)]
    assert shelf.release(1) == [] and canny.model in shelf.figures()["controlnets"]
    assert shelf.release(2) == [canny.model]
    assert shelf.figures() == {"controlnets": {}, "preprocessors": {}}


def test_a_controlnet_that_does_not_load_holds_nothing(unet, tmp_path):
    shelf = ControlShelf(unet)
    shelf.acquire(1, [ControlSpec(model=str(tiny_canny_dir()), preprocess="canny")])
    with pytest.raises(Exception, match="missing"):
        shelf.acquire(
            2,
            [
                ControlSpec(model=str(tiny_canny_dir()), preprocess="canny"),
                ControlSpec(model=str(tmp_path / "missing"), preprocess="image", name="x"),
            ],
        )
    assert shelf.figures()["controlnets"][str(tiny_canny_dir())]["sessions"] == 1


def test_lora_users_free_a_lora_with_the_last_session_naming_it():
    users = LoraUsers()
    users.add(1, ["sepia", "ink"])
    users.add(2, ["sepia"])
    assert users.release(1) == {"ink"}
    assert users.named() == {"sepia"}
    assert users.release(2) == {"sepia"} and users.named() == set()


def test_module_bytes_counts_parameters_and_buffers():
    module = torch.nn.BatchNorm1d(4)  # 8 parameters, 9 buffer values (float32, long)
    assert module_bytes(module) == 8 * 4 + 8 * 4 + 8
    assert module_bytes(object()) == 0


def test_a_depth_model_is_shared_by_the_depth_controlnets_and_goes_with_the_last(unet, tmp_path):
    from streamv2v.testing import save_tiny_depth_model

    depth = str(save_tiny_depth_model(tmp_path / "depth"))
    other = tmp_path / "other-net"
    shutil.copytree(tiny_canny_dir(), other)
    shelf = ControlShelf(unet)
    specs = [
        ControlSpec(model=str(tiny_canny_dir()), preprocess="depth", depth_model=depth),
        ControlSpec(model=str(other), preprocess="depth", depth_model=depth),
    ]
    a, b = shelf.acquire(1, specs[:1]), shelf.acquire(2, specs[1:])
    assert a.preprocessors[0] is b.preprocessors[0]  # one depth model for both ControlNets
    (held,) = shelf.figures()["preprocessors"].values()
    assert held["sessions"] == 2 and held["bytes"] == module_bytes(a.preprocessors[0].model) > 0
    # /metrics names the depth model and its bytes, once.
    loaded = {"model_bytes": 1, "loras": {}, "lora_base_bytes": 0, **shelf.figures()}
    figures = {
        "sessions": 2,
        "max_sessions": 4,
        "free_sessions": 2,
        "engines": [],
        "loaded": loaded,
    }
    lines = serve_metrics_text(figures).splitlines()
    depth_lines = [line for line in lines if line.startswith("streamv2v_serve_depth_model_bytes{")]
    assert depth_lines == [
        f'streamv2v_serve_depth_model_bytes{{model="{depth}"}} {held["bytes"]:.1f}'
    ]
    assert not any("gpu_memory" in line for line in lines)  # (CUDA only)
    assert "streamv2v_serve_draining 0.0" in lines
    draining = serve_metrics_text({**figures, "draining": True}).splitlines()
    assert "streamv2v_serve_draining 1.0" in draining
    shelf.release(1)
    assert len(shelf.figures()["preprocessors"]) == 1
    shelf.release(2)
    assert shelf.figures()["preprocessors"] == {}


@pytest.mark.slow
def test_a_session_moving_to_other_controlnets_gets_a_new_engine_and_keeps_its_lora(tmp_path):
    """In process (the engine thread's calls, without the network): a session whose daemon
    now lists another ControlNet runs a new engine with it; the old one is freed, the LoRA its
    preset names is not; the session's end frees both."""
    import numpy as np

    from daemon.remote.session import EngineSession, SharedModel
    from daemon.styles.presets import Preset
    from streamv2v import EngineConfig, LoraSpec

    sepia = tiny_canny_dir().parent / "tiny-styles-loras" / "sepia.safetensors"
    shared = SharedModel.load(str(tiny_styles_dir()), EngineConfig(vae="model"), "cpu", None, False)
    session = EngineSession(shared, 1)
    canny = ControlSpec(model="tiny-canny", preprocess="canny")  # found in this installation
    base = EngineConfig(width=64, height=64, steps=1, vae="model", control=(canny,))
    preset = Preset(
        name="s", prompt="a sepia scene", loras=(LoraSpec(id=str(sepia)),), control_scales=[0.5]
    )
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    try:
        session.apply(base, preset)
        assert all(session.process(image, i)[0] is not None for i in range(2))
        assert session.engine.control.scales.tolist() == [0.5]
        first = session.engine
        other = tmp_path / "other-net"
        shutil.copytree(tiny_canny_dir(), other)
        moved = base.model_copy(
            update={"control": (ControlSpec(model=str(other), preprocess="image"),)}
        )
        session.apply(moved, preset)
        assert session.engine is not first
        assert all(session.process(image, i)[0] is not None for i in range(2, 4))
        loaded = shared.figures()
        assert set(loaded["controlnets"]) == {str(other)}
        assert [v["sessions"] for v in loaded["loras"].values()] == [1]
    finally:
        session.close()
        shared.close()
    loaded = shared.figures()
    assert loaded["controlnets"] == {} and loaded["loras"] == {} and loaded["lora_base_bytes"] == 0


def test_a_joining_session_does_not_run_the_unet_to_build_its_engine():
    """Every engine on the shared UNet needs its self-attention layers' shapes (the bank's
    storage). Found by a UNet pass on fake tensors that cost ~1 s of the one engine thread (3.4 s
    on a loaded box), it stalled every running session whenever a daemon joined at a size the
    box had not seen: they are read off the UNet's blocks (tests/test_attention_shapes.py), so
    building an engine runs no UNet pass at all, at any size."""
    import numpy as np

    from daemon.remote.session import EngineSession, SharedModel
    from daemon.styles.presets import Preset
    from streamv2v import EngineConfig

    shared = SharedModel.load(str(tiny_styles_dir()), EngineConfig(vae="model"), "cpu", None, False)
    passes = []
    shared.weights.unet.register_forward_pre_hook(lambda *_: passes.append(1))
    preset = Preset(name="w", prompt="a warm scene")
    image = np.zeros((80, 80, 3), np.uint8)
    sessions = [EngineSession(shared, n) for n in range(3)]
    try:
        for session in sessions:
            session.apply(EngineConfig(width=80, height=80, steps=1, vae="model"), preset)
        assert passes == []
        for session in sessions:
            assert session.process(image, 0)[0] is not None
        assert len(passes) == 3  # one per frame (the hook sees the UNet's calls)
        # Each its own bank, allocated with the same shapes.
        banks = [s.engine.bank.tensors() for s in sessions]
        assert [t.shape for t in banks[2]] == [t.shape for t in banks[0]]
        assert all(a.data_ptr() != b.data_ptr() for a, b in zip(banks[1], banks[2]))
        sessions[2].apply(EngineConfig(width=88, height=72, steps=1, vae="model"), preset)
        assert len(passes) == 3  # another size: no pass either
    finally:
        for session in sessions:
            session.close()
        shared.close()
