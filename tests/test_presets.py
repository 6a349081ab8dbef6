"""Preset files (bundled and user), hot reload, the manager, and switches on the tiny model."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from daemon.config import DaemonConfig
from daemon.styles.presets import (
    PresetLibrary,
    PresetManager,
    UnknownPreset,
    bundled_presets_dir,
    config_preset,
    load_preset_file,
)
from daemon.styles.switching import StyleSwitcher
from streamv2v import EngineConfig, StreamV2V

BASE = EngineConfig(width=64, height=64, steps=2, vae="model")


def library(user_dir: Path | None = None, **kw) -> PresetLibrary:
    lib = PresetLibrary(user_dir, BASE, config_preset("a photo", ""), **kw)
    lib.scan()
    return lib


def write(path: Path, text: str) -> Path:
    """Write a preset file so a scan sees it as changed even within one mtime tick."""
    path.write_text(text)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    return path


# --------------------------------------------------------------------------- files
def test_bundled_presets_validate_and_include_six_styles_and_passthrough():
    files = sorted(bundled_presets_dir().glob("*.toml"))
    presets = [load_preset_file(f) for f in files]  # raises on any invalid file
    styles = [p for p in presets if not p.passthrough]
    assert len(styles) >= 6
    assert any(p.passthrough and p.name == "passthrough" for p in presets)
    assert len({p.prompt for p in styles}) == len(styles)  # distinct styles
    hotkeys = [p.hotkey for p in presets if p.hotkey]
    assert len(hotkeys) == len(set(hotkeys))
    for p in styles:  # every one fits the default engine settings
        p.engine_config(DaemonConfig().engine.settings)


def test_demo_presets_use_the_style_models_prompts():
    from streamv2v.scenes import STYLES

    presets = [load_preset_file(f) for f in sorted(bundled_presets_dir("demo").glob("*.toml"))]
    styles = {p.prompt for p in presets if not p.passthrough and not p.loras}
    assert styles == set(STYLES.values())
    assert any(p.passthrough for p in presets)
    # The LoRA presets (noir: a LyCORIS LoHa, and sepia) name the demo style files shipped
    # in the package, by a relative path.
    lora_presets = [p for p in presets if p.loras]
    assert [p.name for p in lora_presets] == ["noir", "sepia"]
    assert all(Path(spec.id).is_file() for p in lora_presets for spec in p.loras)


def test_user_folder_adds_and_overrides_by_name(tmp_path):
    write(tmp_path / "anime.toml", 'prompt = "my own anime"\n')
    write(tmp_path / "mine.toml", 'prompt = "a robot"\nhotkey = "<ctrl>+<alt>+9"\n')
    lib = library(tmp_path)
    assert lib.get("anime").prompt == "my own anime"
    assert lib.origin("anime") == tmp_path / "anime.toml"
    assert lib.get("mine").hotkey == "<ctrl>+<alt>+9"
    assert lib.get("claymation").prompt.startswith("claymation")  # bundled ones stay
    assert next(iter(lib.presets)) == "config"


def test_a_broken_file_is_reported_with_line_and_key_and_the_last_good_version_stays(
    tmp_path, caplog
):
    path = write(tmp_path / "mine.toml", 'prompt = "a robot"\nstrength = 0.5\n')
    lib = library(tmp_path)
    assert lib.get("mine").strength == 0.5
    version = lib.version
    with caplog.at_level(logging.ERROR, logger="streamv2v"):
        write(path, 'prompt = "a robot"\n\nstrength = 7\n')
        assert lib.scan() is False  # nothing usable changed
    error = lib.errors[str(path)]
    assert "line 3" in error and "strength" in error and "less than or equal to 1" in error
    assert lib.get("mine").strength == 0.5 and lib.version == version
    assert sum("mine.toml" in r.getMessage() for r in caplog.records) == 1
    assert "last good" in caplog.records[-1].getMessage()
    assert lib.scan() is False and sum("mine.toml" in r.message for r in caplog.records) == 1

    write(path, 'prompt = "a robot"\nstrength = = 0.3\n')  # not TOML at all
    lib.scan()
    assert "not valid TOML" in lib.errors[str(path)] and "line 2" in lib.errors[str(path)]

    write(path, 'prompt = "a robot"\n[bank]\ninterval = 0\n')  # a nested key
    lib.scan()
    assert "line 3: bank.interval" in lib.errors[str(path)]

    write(path, 'prompt = "a robot"\nstrength = 0.6\n')  # fixed: picked up, error gone
    assert lib.scan() is True
    assert lib.get("mine").strength == 0.6 and str(path) not in lib.errors


def test_unknown_keys_and_an_empty_prompt_are_errors(tmp_path):
    write(tmp_path / "a.toml", 'prompt = "x"\nstrenght = 0.5\n')
    write(tmp_path / "b.toml", 'negative_prompt = "x"\n')
    lib = library(tmp_path)
    errors = lib.errors
    assert "line 2: strenght: Extra inputs are not permitted" in errors[str(tmp_path / "a.toml")]
    assert "prompt is empty" in errors[str(tmp_path / "b.toml")]
    assert "a" not in lib.presets and "b" not in lib.presets


def test_added_and_removed_files_change_the_library(tmp_path):
    lib = library(tmp_path)
    assert "mine" not in lib.presets
    write(tmp_path / "mine.toml", 'prompt = "a robot"\n')
    assert lib.scan() is True and "mine" in lib.presets
    (tmp_path / "mine.toml").unlink()
    assert lib.scan() is True and "mine" not in lib.presets


def test_scenes_map_exact_names_before_globs_and_the_config_first(tmp_path):
    write(tmp_path / "mine.toml", 'prompt = "x"\nobs_scenes = ["Game*", "Chat"]\n')
    lib = library(tmp_path, scene_map={"Gameplay": "anime", "Chat*": "cyberpunk"})
    assert lib.preset_for_scene("Gameplay") == "anime"  # exact (config) beats glob (preset)
    assert lib.preset_for_scene("Game Over") == "mine"
    assert lib.preset_for_scene("Chat") == "mine"  # exact (preset) beats glob (config)
    assert lib.preset_for_scene("Chatting") == "cyberpunk"
    assert lib.preset_for_scene("Intro") is None


def test_manager_cycles_and_names_the_choices_for_an_unknown_preset():
    lib = library()
    manager = PresetManager(lib, "config")
    names = list(lib.presets)
    assert manager.select("next", "test") == names[1]
    assert manager.select("prev", "test") == "config"
    assert manager.select("prev", "test") == names[-1]
    with pytest.raises(UnknownPreset, match="there are: config, anime"):
        manager.select("nope", "test")
    assert manager.active == names[-1]


# --------------------------------------------------------------------------- switching
def engine(model, **cfg) -> StreamV2V:
    return StreamV2V.from_pretrained(model, config=BASE.model_copy(update=cfg), device="cpu")


class Counter:
    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        module.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))


def run_switch(model, frames, *, bank: bool, steps: int = 3):
    """Frames 0-5 with preset A, then a switch to B over 4 frames; returns the outputs, the
    transition's end (index of the first output made with B only) and the text encoder calls
    during the switch."""
    base = EngineConfig(width=64, height=64, steps=steps, vae="model", bank={"enabled": bank})
    lib = PresetLibrary(None, base, config_preset("a photo", ""))
    lib.scan()
    a, b = lib.get("claymation"), lib.get("cyberpunk")
    a = a.model_copy(update={"strength": 0.5, "min_steps": steps, "max_steps": steps})
    b = b.model_copy(update={"strength": 0.5, "min_steps": steps, "max_steps": steps})
    eng = StreamV2V.from_pretrained(model, config=a.engine_config(base), device="cpu")
    switcher = StyleSwitcher(eng, base)
    switcher.encode([a, b])
    switcher.start(a)
    counter = Counter(eng.text_encoder)
    outs, end = [], None
    clip = [frames[i % len(frames)] for i in range(16)]
    for i, frame in enumerate(clip):
        if i == 6:
            switcher.switch(b)
        switcher.before_frame()
        outs.append(eng(frame, output_type="latent"))
        if i >= 6 and end is None and not switcher.switching:
            end = i + 1
    return outs, end, counter.calls, clip, (a, b, base)


def reference(model, clip, preset, base) -> list:
    eng = StreamV2V.from_pretrained(model, config=preset.engine_config(base), device="cpu")
    eng.set_prompt(preset.prompt, preset.negative_prompt)
    return [eng(f, output_type="latent") for f in clip]


def test_switch_blends_without_the_text_encoder_and_ends_exactly_on_the_new_prompt(
    tiny_model, frames
):
    outs, end, encoder_calls, clip, (a, b, base) = run_switch(tiny_model, frames, bank=False)
    assert encoder_calls == 0
    assert all(o is not None for o in outs[2:])  # the stream never restarts (same settings)
    assert end == 6 + b.transition_frames + 2  # the blend, then the stream's 2 older slots
    new, old = reference(tiny_model, clip, b, base), reference(tiny_model, clip, a, base)
    for i in range(end, len(clip)):  # after the transition: exactly what B alone makes
        assert (outs[i] - new[i]).abs().max().item() <= 1e-4, i
    assert (outs[5] - old[5]).abs().max().item() <= 1e-4  # before: exactly A
    mid = 6 + b.transition_frames // 2
    assert (outs[mid] - new[mid]).abs().max().item() > 1e-3  # the blend is in between


def test_switch_with_the_bank_lands_on_the_new_style(tiny_model, frames):
    outs, end, encoder_calls, clip, (a, b, base) = run_switch(tiny_model, frames, bank=True)
    assert encoder_calls == 0
    new, old = reference(tiny_model, clip, b, base), reference(tiny_model, clip, a, base)
    for i in range(end, len(clip)):
        to_new = (outs[i] - new[i]).abs().mean().item()
        to_old = (outs[i] - old[i]).abs().mean().item()
        assert to_new < to_old / 2, (i, to_new, to_old)


def test_a_preset_with_other_settings_restarts_the_stream_after_the_blend(tiny_model, frames):
    base = EngineConfig(width=64, height=64, steps=2, vae="model")
    lib = PresetLibrary(None, base, config_preset("a photo", ""))
    lib.scan()
    a = lib.get("anime")
    b = lib.get("pixel-art").model_copy(update={"transition_frames": 2, "seed": 9})
    eng = StreamV2V.from_pretrained(tiny_model, config=a.engine_config(base), device="cpu")
    switcher = StyleSwitcher(eng, base)
    switcher.encode([a, b])
    switcher.start(a)
    for f in frames[:3]:
        switcher.before_frame()
        eng(f)
    switcher.switch(b)
    results = []
    for f in frames:
        switcher.before_frame()
        results.append((eng(f), switcher.switching))
    assert eng.config == b.engine_config(base) and eng.config.seed == 9
    # The first blend frame is output; the restart (with the blend's end) brings one warm-up
    # frame that is not; then the transition is over.
    assert [r is None for r, _ in results[:4]] == [False, True, False, False]
    assert [s for _, s in results[:4]] == [True, True, False, False]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_bundled_preset_renders_with_the_tiny_model(tiny_model, frames, dtype):
    lib = library()
    eng = StreamV2V.from_pretrained(tiny_model, config=BASE, device="cpu", dtype=dtype)
    switcher = StyleSwitcher(eng, BASE)
    switcher.encode(lib.presets.values())
    for preset in lib.presets.values():
        if preset.passthrough:
            continue
        switcher.start(preset)
        out = [eng(f) for f in frames[: eng.latency_frames + 1]][-1]
        assert isinstance(out, np.ndarray) and out.shape == (64, 64, 3), preset.name
        assert np.isfinite(out).all() and out.std() > 0, preset.name


def test_bundled_presets_ship_in_a_non_editable_install(tmp_path):
    """`pip install .` (a built wheel, not the source tree): the presets are inside it."""
    import shutil
    import subprocess
    import sys

    # A copy of the source, so no build/ folder is left in (or reused from) the checkout.
    repo = tmp_path / "src"
    skip = shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "bench")
    shutil.copytree(Path(__file__).resolve().parents[1], repo, ignore=skip)
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*pip, "--target", str(target), str(repo)],
        check=True,
        timeout=300,
        env={**os.environ, "PIP_NO_INDEX": "1"},
    )
    script = (
        "import json, daemon.styles.presets as p, daemon.models.registry as c\n"
        "import daemon.masking.runtime as m\n"
        "def names(folder):\n"
        "    return sorted(p.load_preset_file(f).name for f in folder.glob('*.toml'))\n"
        "folder = p.bundled_presets_dir()\n"
        "print(json.dumps({'folder': str(folder), 'names': names(folder),\n"
        "    'demo': names(p.bundled_presets_dir('demo')), 'model': c.tiny_styles_available(),\n"
        "    'model_dir': str(c.tiny_styles_dir()), 'canny': c.tiny_canny_available(),\n"
        "    'canny_dir': str(c.tiny_canny_dir()),\n"
        "    'loras': [s.id for f in p.bundled_presets_dir('demo').glob('*.toml')\n"
        "              for s in (p.load_preset_file(f).loras or ())],\n"
        "    'mask_model': str(m.model_path()), 'mask_problem': m.runtime_problem()}))\n"
    )
    # From outside the repo, with the installed copy first on the path.
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    found = __import__("json").loads(out.stdout)
    assert Path(found["folder"]).is_relative_to(target)
    bundled = sorted(load_preset_file(f).name for f in bundled_presets_dir().glob("*.toml"))
    assert found["names"] == bundled and len(bundled) >= 7
    demo = sorted(load_preset_file(f).name for f in bundled_presets_dir("demo").glob("*.toml"))
    assert found["demo"] == demo and len(demo) == 7
    # The demo LoRA ships in the package, and the sepia preset finds it there.
    assert found["loras"] and all(Path(f).is_file() for f in found["loras"])
    assert all(Path(f).is_relative_to(target) for f in found["loras"])
    from daemon.models.registry import tiny_styles_available

    # The person-mask model ships too, intact (its runtime is this environment's).
    assert Path(found["mask_model"]).is_relative_to(target) and found["mask_problem"] is None
    if tiny_styles_available():  # the trained model ships inside the package too
        assert found["model"] and Path(found["model_dir"]).is_relative_to(target)
    # So does the tiny canny ControlNet (its weights at the top of its folder).
    assert found["canny"] and Path(found["canny_dir"]).is_relative_to(target)
    assert (Path(found["canny_dir"]) / "diffusion_pytorch_model.safetensors").is_file()
