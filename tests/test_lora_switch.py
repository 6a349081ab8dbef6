"""LoRA presets switched by the StyleSwitcher (blended with the prompt, one rewrite per frame) and
by `serve` sessions on shared weights, on the tiny random model with real LoRA files."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from daemon.remote.session import EngineSession, SharedModel
from daemon.styles.loras import StyleLoras, switched_loras
from daemon.styles.presets import Preset
from daemon.styles.switching import StyleSwitcher
from streamv2v import EngineConfig, LoraSpec, StreamV2V
from tests.lora_helpers import lora_factors, write_diffusers

CFG = EngineConfig(vae="model", width=64, height=64, steps=2)


@pytest.fixture(scope="module")
def files(tiny_model, tmp_path_factory):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    folder = tmp_path_factory.mktemp("loras")
    return {
        n: str(write_diffusers(folder / f"{n}.safetensors", lora_factors(unet, seed=i)))
        for i, n in enumerate(("ink", "glow"), start=11)
    }


def preset(name: str, prompt: str, loras=(), frames: int = 4) -> Preset:
    specs = tuple(LoraSpec(id=path, scale=scale) for path, scale in loras)
    return Preset(name=name, prompt=prompt, loras=specs or None, transition_frames=frames)


def test_a_switch_blends_the_lora_scales_with_the_prompt_one_rewrite_per_frame(tiny_model, files):
    engine = StreamV2V.from_pretrained(tiny_model, config=CFG, device="cpu")
    ink = preset("ink", "an ink drawing", [(files["ink"], 0.8)])
    glow = preset("glow", "a glowing scene", [(files["glow"], 1.0)])
    plain = preset("plain", "a plain scene")
    switcher = StyleSwitcher(engine, CFG)
    switcher.encode([ink, glow, plain])
    assert set(engine.adapters.names) == {files["ink"], files["glow"]}  # loaded with the library
    switcher.start(ink)
    assert engine.adapters.active == {files["ink"]: 0.8}
    frame = np.zeros((64, 64, 3), np.uint8)
    for _ in range(3):
        engine(frame)
    switcher.switch(glow)
    seen = []
    for _ in range(4):
        before = engine.adapters.rewrites
        switcher.before_frame()
        seen.append(dict(engine.adapters.active))
        assert engine.adapters.rewrites > before  # one rewrite of the touched layers per frame
        engine(frame)
    for i, scales in enumerate(seen[:-1], start=1):
        w = i / 4
        assert scales[files["ink"]] == pytest.approx(0.8 * (1 - w))
        assert scales[files["glow"]] == pytest.approx(w)
    assert seen[-1] == {files["glow"]: 1.0}
    assert not switcher.switching or switcher._blend is None

    # transition_frames = 0: one rewrite, at the switch.
    rewrites = engine.adapters.rewrites
    switcher.switch(plain.model_copy(update={"transition_frames": 0}))
    assert engine.adapters.active == {}
    assert engine.adapters.rewrites - rewrites == len(engine.adapters.get(files["glow"]).unet)

    # A LoRA no preset names any more is freed at the next library read.
    switcher.encode([ink, plain])
    assert engine.adapters.names == [files["ink"]]
    # ...even in the middle of a blend to it: the blend carries on without it.
    switcher.switch(ink)
    switcher.before_frame()
    switcher.encode([plain])
    for _ in range(4):
        switcher.before_frame()
        assert engine(frame) is not None
    assert engine.adapters.active == {} and engine.adapters.names == []


def test_engine_loras_stay_fused_and_a_preset_listing_one_switches_the_difference(files):
    fused = (LoraSpec(id=files["ink"], scale=1.0),)
    both = preset("both", "x", [(files["ink"], 0.25), (files["glow"], 0.5)])
    assert switched_loras(both, fused) == {files["ink"]: -0.75, files["glow"]: 0.5}
    same = preset("same", "x", [(files["ink"], 1.0)])
    assert switched_loras(same, fused) == {}


def good_and_bad(tiny_model, files, tmp_path) -> tuple[StreamV2V, StyleLoras, Preset, Preset]:
    """An engine, its StyleLoras, a preset with a real LoRA and one whose LoRA file is junk."""
    engine = StreamV2V.from_pretrained(tiny_model, config=CFG, device="cpu")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 16)
    good = preset("good", "x", [(files["ink"], 1.0)])
    return engine, StyleLoras(engine, ()), good, preset("bad", "y", [(str(junk), 1.0)])


def test_a_broken_lora_marks_only_its_preset(tiny_model, files, tmp_path):
    _, loras, good, bad = good_and_bad(tiny_model, files, tmp_path)
    errors = loras.sync([good, bad])
    assert list(errors) == ["bad"] and "could not read LoRA" in errors["bad"]
    assert loras.scales(good) == {files["ink"]: 1.0} and loras.scales(bad) == {}
    assert loras.sync([good, bad]) == errors  # not retried until the file changes


def test_files_read_ahead_in_another_thread_leave_the_engine_thread_no_reading(
    tiny_model, files, tmp_path, monkeypatch
):
    """The daemon reads a changed library's LoRA files in a thread of its own; the engine thread's
    sync() then only adds them (and marks a bad one broken) without touching the disk."""
    import threading

    import daemon.styles.loras as loras_module
    import streamv2v.adapters as adapters_module

    reads: list[str] = []
    real = adapters_module.load_lora

    def counted(source, *args, **kwargs):
        reads.append(threading.current_thread().name)
        return real(source, *args, **kwargs)

    monkeypatch.setattr(loras_module, "load_lora", counted)
    monkeypatch.setattr(adapters_module, "load_lora", counted)
    engine, loras, good, bad = good_and_bad(tiny_model, files, tmp_path)
    reader = threading.Thread(target=loras.read_ahead, args=([good, bad],), name="lora-read")
    reader.start()
    reader.join()
    assert sorted(reads) == ["lora-read", "lora-read"] and not engine.adapters.names
    errors = loras.sync([good, bad])  # this thread: no read
    assert len(reads) == 2
    assert list(errors) == ["bad"] and "could not read LoRA" in errors["bad"]
    assert engine.adapters.names == [files["ink"]] and loras.scales(good) == {files["ink"]: 1.0}
    # The same as a LoRA read on this thread: the rewrite gives identical weights.
    direct = StreamV2V.from_pretrained(tiny_model, config=CFG, device="cpu")
    direct.adapters.load(files["ink"], files["ink"])
    engine.set_loras({files["ink"]: 1.0})
    direct.set_loras({files["ink"]: 1.0})
    for (name, a), (_, b) in zip(engine.unet.named_parameters(), direct.unet.named_parameters()):
        assert torch.equal(a, b), name
    # Read ahead for nothing new: no read; an edited file is read again, ahead, not by sync.
    reads.clear()
    assert loras.read_ahead([good, bad]) == 0
    time.sleep(0.01)
    Path(files["ink"]).touch()
    assert loras.read_ahead([good]) == 1 and reads == ["MainThread"]
    loras.sync([good])
    assert reads == ["MainThread"] and engine.adapters.names == [files["ink"]]


def test_the_daemon_reads_a_new_presets_lora_in_its_read_ahead_thread(
    tiny_model, files, tmp_path, monkeypatch, memory_vcam
):
    """The daemon's own wiring: a preset with a LoRA added to the running daemon's folder is
    read by the engine worker's "lora-read" thread, never by the engine thread."""
    import threading

    from test_daemon import demo_config, wait_for

    import daemon.styles.loras as loras_module
    import streamv2v.adapters as adapters_module
    from daemon.app import Daemon

    reads: list[str] = []
    real = adapters_module.load_lora

    def counted(source, *args, **kwargs):
        reads.append(threading.current_thread().name)
        return real(source, *args, **kwargs)

    monkeypatch.setattr(loras_module, "load_lora", counted)
    monkeypatch.setattr(adapters_module, "load_lora", counted)
    folder = tmp_path / "presets"
    folder.mkdir()
    (folder / "plain.toml").write_text('prompt = "a plain scene"\n')
    daemon = Daemon(demo_config(tiny_model, presets={"dir": str(folder), "startup": "plain"}))
    daemon.start()
    try:
        assert wait_for(lambda: daemon.output.kinds["styled"] > 2, 60), daemon.status()
        assert reads == []
        (folder / "ink.toml").write_text(
            f'prompt = "an ink drawing"\nloras = [{{ id = "{files["ink"]}", scale = 0.8 }}]\n'
        )
        assert "ink" in daemon.reload_presets()["presets"]
        daemon.select_preset("ink", "test")
        active = {files["ink"]: 0.8}
        assert wait_for(lambda: daemon.engine.engine.adapters.active == active, 30), reads
    finally:
        daemon.stop()
    assert reads == ["lora-read"]


def test_serve_sessions_on_shared_weights_each_get_their_own_loras(tiny_model, files):
    weights = StreamV2V.from_pretrained(tiny_model, config=CFG, device="cpu")
    shared = SharedModel(weights)
    ink = preset("ink", "an ink drawing", [(files["ink"], 1.0)])
    plain = preset("plain", "an ink drawing")  # same prompt: only the LoRA differs
    a, b = EngineSession(shared), EngineSession(shared)
    a.apply(CFG, ink)
    b.apply(CFG, plain)
    rng = np.random.default_rng(2)
    frames = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(12)]
    out_a, out_b = [], []
    for f in frames:  # interleaved, as the server's one engine thread runs them
        out_a.append(a.process(f, 0)[0])
        out_b.append(b.process(f, 0)[0])
    assert shared.lora_switches >= 2 * len(frames) - 1

    def alone(scales: dict) -> list:
        engine = StreamV2V.from_pretrained(tiny_model, config=CFG, device="cpu")
        engine.adapters.load(files["ink"], files["ink"])
        engine.set_loras(scales)
        engine.set_prompt("an ink drawing")
        return [engine(f) for f in frames]

    for got, want in ((out_a, alone({files["ink"]: 1.0})), (out_b, alone({}))):
        assert all((g is None) == (w is None) for g, w in zip(got, want))
        pairs = [(g, w) for g, w in zip(got, want) if g is not None]
        # The same weights, rewritten to the same values: the same frames, bit for bit.
        assert all(np.array_equal(g, w) for g, w in pairs)
    assert any(not np.array_equal(x, y) for x, y in zip(out_a[2:], out_b[2:]))
    assert torch.equal(
        weights.unet.get_submodule("mid_block.attentions.0.proj_out").weight,
        weights.adapters._patch["unet"].params["mid_block.attentions.0.proj_out"],
    )


def test_the_demo_lora_training_script_runs_reproducibly_on_a_few_steps(tmp_path):
    from safetensors.torch import load_file

    from daemon.models.registry import tiny_styles_dir
    from streamv2v.tiny.lora import LoraRecipe, sepia, sepia_error, train

    recipe = LoraRecipe(steps=2, scenes=4, batch=2, threads=1)
    a = train(tiny_styles_dir(), tmp_path / "a" / "s.safetensors", recipe, log=lambda _: None)
    train(tiny_styles_dir(), tmp_path / "b" / "s.safetensors", recipe, log=lambda _: None)
    ta, tb = (load_file(tmp_path / d / "s.safetensors") for d in ("a", "b"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert any(k.endswith("conv1.lora_A.weight") for k in ta)  # convs adapted too
    assert a["bytes"] < 1_000_000
    # The shipped LoRA is the same recipe at full length: its keys are the same layers.
    shipped = tiny_styles_dir().parent / "tiny-styles-loras" / "sepia.safetensors"
    assert load_file(shipped).keys() == ta.keys()
    # The named statistic: a sepia image is near 0, the styles the model knows are far from it.
    plain = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert sepia_error(sepia(plain)) < 2.0 < 20.0 < sepia_error(plain)
