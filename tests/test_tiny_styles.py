"""The shipped tiny TRAINED style model as a witness: it loads offline, follows its prompts,
switches style within a preset's transition, and shows the feature bank's temporal effects."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from daemon.models.registry import tiny_styles_dir
from daemon.styles.presets import Preset
from daemon.styles.switching import StyleSwitcher
from streamv2v import BankConfig, EngineConfig, StreamV2V
from streamv2v.scenes import SIZE, STYLES, moving_scene, random_scene, render
from streamv2v.temporal import temporal_figures
from streamv2v.tiny.styles import Recipe, train

MODEL = tiny_styles_dir()
OFF = BankConfig(enabled=False)


def engine(bank: BankConfig = OFF, dtype: torch.dtype | None = None, **cfg) -> StreamV2V:
    # One step at strength 0.3 (timestep 299 of 1000), as the demo presets: the styles separate
    # best there (worst ratio 3.5; at 0.5, timestep 499, "cool" is only 2.7x closer to its own
    # render than to "warm") and the source's shapes survive best.
    settings = {"width": SIZE, "height": SIZE, "steps": 1, "strength": 0.3, "vae": "model"}
    config = EngineConfig(**{**settings, "bank": bank, **cfg})
    return StreamV2V.from_pretrained(MODEL, config=config, device="cpu", dtype=dtype)


def held_out_scenes(n: int = 6):
    rng = np.random.default_rng(20261125)  # not a training seed
    return [random_scene(rng) for _ in range(n)]


def mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


def test_the_shipped_model_loads_offline_and_is_small(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = [p for p in MODEL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 10 * 2**20
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".ckpt")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    out = engine()(render(held_out_scenes(1)[0], "plain"))
    assert out.shape == (SIZE, SIZE, 3)


# float16 on a CPU is slow (a float16 convolution takes torch's reference path here: 6 s a frame
# at 128x128): fewer scenes and one style there, to catch dtype mix-ups.
@pytest.mark.parametrize(
    ("dtype", "scenes", "styles"),
    [(torch.float32, 6, tuple(STYLES)), (torch.float16, 2, ("cool",))],
)
def test_one_step_img2img_lands_3x_closer_to_the_prompted_style(dtype, scenes, styles):
    eng = engine(dtype=dtype)
    scenes = held_out_scenes(scenes)
    for style in styles:
        prompt = STYLES[style]
        eng.set_prompt(prompt)
        errors = {other: 0.0 for other in STYLES}
        for scene in scenes:
            out = eng(render(scene, "plain"))
            for other in STYLES:
                errors[other] += mae(out, render(scene, other)) / len(scenes)
        for other, error in errors.items():
            if other != style:
                assert 3 * errors[style] <= error, (
                    prompt,
                    {k: round(v, 1) for k, v in errors.items()},
                )


def test_a_preset_switch_mid_stream_ends_in_the_new_style_within_the_transition():
    base = EngineConfig(width=SIZE, height=SIZE, steps=2, strength=0.3, vae="model")
    warm = Preset(name="warm", prompt=STYLES["warm"], transition_frames=6)
    cool = Preset(name="cool", prompt=STYLES["cool"], transition_frames=6)
    eng = StreamV2V.from_pretrained(MODEL, config=warm.engine_config(base), device="cpu")
    switcher = StyleSwitcher(eng, base)
    switcher.encode([warm, cool])
    switcher.start(warm)
    scene = held_out_scenes(1)[0]
    outs, ended = [], None
    for i in range(24):
        frame = moving_scene(scene, i / 15)
        if i == 8:
            switcher.switch(cool)
        switcher.before_frame()
        out = eng(render(frame, "plain"))
        outs.append((out, frame))
        if i >= 8 and ended is None and not switcher.switching:
            ended = i
    assert ended is not None and ended <= 8 + cool.transition_frames + eng.latency_frames
    before, _ = outs[7]
    assert mae(before, render(outs[7][1], "warm")) * 2 < mae(before, render(outs[7][1], "cool"))
    for out, frame in outs[ended:]:  # every frame after the transition is in the new style
        assert mae(out, render(frame, "cool")) * 2 < mae(out, render(frame, "warm"))


def test_bank_temporal_figures_show_the_dynamic_merging_update_pulse_and_stable_has_none():
    still = render(held_out_scenes(1)[0], "plain")
    frames = [still] * 21  # a static, noiseless clip: any change comes from the engine itself
    off = temporal_figures(engine(), frames)
    assert off.mad == 0.0 and off.input_mad == 0.0  # deterministic without a bank
    dyme = engine(BankConfig(mode="dyme", interval=4))
    on = temporal_figures(dyme, frames)
    # Between updates the bank is constant: identical outputs. Right after an update, Dynamic
    # Merging has re-paired tokens at random, and the output moves: the update pulse.
    assert on.mad_other is not None and on.mad_other < 1e-6
    assert on.mad_after_update is not None and on.mad_after_update > 1e-4
    assert 0.0 < on.ff_pass_rate <= 1.0
    # The stable update merges the old frame into the same content at the same places: on a
    # still scene the bank does not move, nor does the output.
    stable = temporal_figures(engine(BankConfig(mode="stable", interval=4)), frames)
    assert stable.mad_after_update is not None and stable.mad_after_update < 1e-6
    assert stable.mad < 1e-6


@pytest.mark.parametrize("mode", ["stable", "dyme"])
def test_the_bank_remembers_frames_older_than_its_last_update(mode):
    """Two clips that differ only before the last bank update (the end of frame 8) give
    different outputs after it: the bank carries what it saw before, merged in. Without the
    bank the outputs after frame 8 are the same (so the check can fail)."""
    rng = np.random.default_rng(5)
    scene, other = random_scene(rng), random_scene(rng)
    a = [render(moving_scene(scene, i / 15), "plain") for i in range(12)]
    b = [render(moving_scene(other, i / 15), "plain") for i in range(8)] + a[8:]

    def tail(eng: StreamV2V, clip: list[np.ndarray]) -> list[np.ndarray]:
        eng.reset()
        return [eng(f) for f in clip][9:]

    def gap(eng: StreamV2V) -> float:
        return max(mae(x, y) for x, y in zip(tail(eng, a), tail(eng, b)))

    assert gap(engine()) == 0.0
    assert gap(engine(BankConfig(mode=mode, interval=4))) > 0.3  # (measured: ~1)


def test_training_is_reproducible_with_the_same_seeds(tmp_path):
    micro = Recipe(ae_steps=4, ae_batch=4, scenes=8, unet_steps=4, unet_batch=4)
    figures = [train(tmp_path / name, micro, log=lambda _: None) for name in ("a", "b")]
    assert figures[0]["ae"] == figures[1]["ae"]
    for part in ("unet", "vae", "text_encoder"):
        files = sorted((tmp_path / "a" / part).glob("*.safetensors"))
        assert files
        for file in files:
            a, b = load_file(file), load_file(tmp_path / "b" / part / file.name)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = train(tmp_path / "c", Recipe(**{**micro.__dict__, "seed": 1}), log=lambda _: None)
    assert other["ae"] != figures[0]["ae"]  # the seed matters (the check can fail)


def test_the_demo_daemon_shows_the_style_switch(memory_vcam, tmp_path):
    from test_daemon import wait_for

    from daemon.app import Daemon
    from daemon.config import DaemonConfig
    from daemon.runner import apply_demo
    from daemon.styles.presets import bundled_presets_dir

    config, notes = apply_demo(DaemonConfig())
    assert any("tiny style model" in note for note in notes)
    assert config.engine.model == "tiny-styles" and config.camera.source == "scene"
    assert [c.preprocess for c in config.engine.settings.control] == ["canny"]
    # Each ControlNet style once more with its ControlNet off: "<name>-off", a user preset.
    folder = tmp_path / "presets"
    folder.mkdir()
    for name in CONTROLLED:
        text = (bundled_presets_dir("demo") / f"{name}.toml").read_text()
        lines = [ln for ln in text.splitlines() if not ln.startswith(("hotkey", "control_scales"))]
        (folder / f"{name}-off.toml").write_text("\n".join([*lines, "control_scales = [0.0]"]))
    data = config.model_dump()
    data["output"]["preview"]["port"] = 0
    data["control"]["port"] = 0
    data["hotkeys"]["enabled"] = False
    data["presets"]["dir"] = str(folder)
    daemon = Daemon(DaemonConfig.model_validate(data))
    started = time.monotonic()
    daemon.start()
    cam = memory_vcam.instances[-1]

    def styled_frames(count: int) -> None:
        styled = daemon.output.kinds["styled"]
        assert wait_for(lambda: daemon.output.kinds["styled"] >= styled + count, 60), (
            daemon.status()
        )

    def settled(name: str) -> tuple[list[np.ndarray], float]:
        """Switch to ``name``; the distinct outputs of 5 styled frames once 3 more have passed
        (the first outputs after a switch still carry the last style's bank and stock noise),
        and when their collection began."""
        daemon.select_preset(name, "test")
        assert wait_for(lambda: daemon.engine.applied.name == name, 30)
        assert wait_for(lambda: not daemon.engine.switching, 60)
        styled_frames(3)
        mark, since = len(cam.frames), time.monotonic()
        styled_frames(5)
        return list({f.tobytes(): f for f in cam.frames[mark:]}.values()), since

    def structure(collected: tuple[list[np.ndarray], float]) -> float:
        """The outputs' edge F1 against the camera's scene at the moments they can show: from
        the start of their collection less the daemon's latency (p95, seconds on a loaded CI
        box; + 0.5 s) to now, at least the last DEMO_LAG_S (the figures' window)."""
        outputs, since = collected
        latency = (daemon.output.latency_ms.pct(95) or 0.0) / 1000
        now = time.monotonic()
        window = max(DEMO_LAG_S, now - since + latency + 0.5)
        return camera_structure(outputs, now - started, window)

    shapes, colour = {}, {}
    try:
        assert daemon.presets.active == "warm"
        assert wait_for(lambda: daemon.output.kinds["styled"] > 5, 90), daemon.status()
        for name in CONTROLLED:
            if name == "warm":
                since = time.monotonic() - 8 / daemon.config.output.fps
                collected = list({f.tobytes(): f for f in cam.frames[-8:]}.values()), since
            else:
                collected = settled(name)
            colour[name] = collected[0][-1].reshape(256, 256, 3).reshape(-1, 3).mean(0)
            shapes[name] = structure(collected)
            shapes[f"{name}-off"] = structure(settled(f"{name}-off"))
    finally:
        daemon.stop()
    print({k: round(v, 3) for k, v in shapes.items()})
    warm, cool = colour["warm"], colour["cool"]
    assert warm[0] > warm[2] + 20, warm  # orange and brown
    assert cool[2] > cool[0] + 40, cool  # blue and navy
    # At the presets' strength (0.8) the ControlNet keeps the camera's shapes in these styles;
    # the same style with its ControlNet off paints blobs there.
    for name in CONTROLLED:
        on, off = shapes[name], shapes[f"{name}-off"]
        assert on >= DEMO_MIN_F1, (name, on, off)
        assert on >= off + DEMO_MIN_GAIN[name], (name, on, off)


#: The demo presets that use the ControlNet, whose gain over the same style with the ControlNet
#: off this test can tell. "plain" uses it too but is not compared here: at the demo's 256x256
#: the model alone keeps about as much of the camera's outlines as with the ControlNet (edge F1
#: on 0.19-0.26, off 0.12-0.19 in five runs beside busy cores; in full suites on a loaded box on
#: 0.076 once and 0.067 against 0.107 off once), so neither a gain nor a floor holds for it. Its
#: ControlNet's effect is measured where it shows: at the model's own 128x128 plain gets 0.40
#: against 0.0 off (test_tiny_control.py::test_the_shapes_hold_in_every_style keeps a floor).
CONTROLLED = ("warm", "cool", "outline")
#: Least edge F1 of the demo's output against the camera (the median of the outputs after a
#: switch), and its least gain over the same style with the ControlNet off. Measured in three
#: runs (on / off): warm 0.28-0.40 / 0.0, cool 0.28-0.40 / 0.10-0.16, outline 0.28-0.55 / 0.0;
#: beside a busy core, settled (2026-12-07): warm 0.34-0.36 / 0.0, cool 0.31-0.32 / 0.05-0.12,
#: outline 0.39-0.40 / 0.0.
DEMO_MIN_F1 = 0.08
#: "cool" is measured at a different moment of the moving scene on and off, and the model alone
#: keeps some of its outlines (off 0.05-0.15, on 0.25-0.37 in five runs beside busy cores; one
#: gain of 0.083 under a load of 3 on 2 cores): its bar is lower. With every ControlNet scale at
#: 0 (mutant demo-controlnet-off) warm and outline (off: 0.0) fail at once.
DEMO_MIN_GAIN = {"warm": 0.12, "cool": 0.05, "outline": 0.12}
#: Seconds of the camera's scene an output is matched against (the output lags the camera).
DEMO_LAG_S = 3.0


def camera_structure(outputs: list[np.ndarray], elapsed: float, lag_s: float = DEMO_LAG_S) -> float:
    """Median over the last demo outputs (256x256 from the virtual camera) of each one's edge F1
    against the demo camera's scene at the best-matching moment of the last seconds (the
    daemon's clock and the output's lag are not known here, so the moments of the last
    ``lag_s`` are tried; the scene moves on loops of 5 s and more)."""
    import cv2

    from daemon.offline.quality import edge_f1, edge_map

    scene = random_scene(np.random.default_rng(7))  # the demo camera's
    sources = [
        edge_map(render(moving_scene(scene, t), "plain"))
        for t in np.arange(max(0.0, elapsed - lag_s), elapsed + 0.1, 1 / 15)
    ]
    bests = []
    for output in outputs:
        small = cv2.resize(output.reshape(256, 256, 3), (SIZE, SIZE), interpolation=cv2.INTER_AREA)
        edges = edge_map(small)
        bests.append(max(edge_f1(edges, source) for source in sources))
    return float(np.median(bests))
