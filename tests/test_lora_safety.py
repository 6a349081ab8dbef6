"""Style files read safely and applied as a transaction: pickle refused unless allowed (by
path, folder + weight_name, hub id), one alpha rule fused or switched, a failed rewrite
restores the previous set, channels_last, base copies in host memory, the bytes held."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from streamv2v import EngineConfig, LoraSpec, StreamV2V, UnsafeWeightsError
from streamv2v.adapters import (
    PICKLE_SUFFIXES,
    AdapterLibrary,
    LoraError,
    LoraSwitchError,
    UnknownLoraError,
    choose_lora_base,
    load_lora,
)
from streamv2v.adapters.writer import Patcher
from tests.lora_helpers import lora_factors, write_diffusers, write_kohya
from tests.lycoris_helpers import TinyEncoder, TinyUNet, make, make_mixed

CFG = EngineConfig(vae="model", width=64, height=64, steps=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(1)
    unet, te = TinyUNet().requires_grad_(False), TinyEncoder().requires_grad_(False)
    folder = tmp_path_factory.mktemp("safety")
    files = {
        fmt: make(folder / f"{fmt}.safetensors", fmt, unet, te, seed=i)[0]
        for i, fmt in enumerate(("locon", "loha-tucker", "lokr-factored", "dora-peft"))
    }
    return unet, te, files


# ---------------------------------------------------------------------------- pickle
@pytest.mark.parametrize("suffix", PICKLE_SUFFIXES)
def test_a_pickle_file_is_refused_by_path_folder_and_hub_name(tiny, tmp_path, suffix):
    unet, te, files = tiny
    models = {"unet": unet, "text_encoder": te}
    state = {}
    with safe_open(str(files["locon"]), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    pickled = tmp_path / f"style{suffix}"
    torch.save(state, pickled)
    for source, weight_name in (
        (pickled, None),  # a path
        (tmp_path, pickled.name),  # a folder and the file's name
        ("someone/style", f"style{suffix}"),  # a hub id: refused before any download
    ):
        with pytest.raises(
            UnsafeWeightsError, match=rf"pickle file \({suffix}\), refused.*allow_pickle"
        ):
            load_lora(source, models, weight_name=weight_name)
    # Opted in: read, and the same weights as the safetensors file.
    ours = load_lora(pickled, models, allow_pickle=True)
    theirs = load_lora(files["locon"], models)
    assert set(ours.unet) == set(theirs.unet)
    lib = AdapterLibrary(unet, te)
    lib.add("p", ours)
    lib.add("s", theirs)
    lib.set_loras({"p": 1.0})
    styled = {n: w.clone() for n, w in unet.named_parameters()}
    lib.set_loras({"s": 1.0})
    assert all(torch.equal(w, styled[n]) for n, w in unet.named_parameters())
    lib.retain(set())


def test_a_folder_of_pickles_only_and_a_pickle_named_safetensors_are_refused(tiny, tmp_path):
    unet, te, _ = tiny
    models = {"unet": unet, "text_encoder": te}
    torch.save({"lora_unet_conv1.alpha": torch.tensor(1.0)}, tmp_path / "only.bin")
    with pytest.raises(LoraError, match="pickle file"):
        load_lora(tmp_path, models)
    disguised = tmp_path / "disguised.safetensors"
    disguised.write_bytes((tmp_path / "only.bin").read_bytes())
    with pytest.raises(LoraError, match="not a readable safetensors file"):
        load_lora(disguised, models, allow_pickle=True)  # never unpickled "in case"


def test_engine_loras_refuse_a_pickle_too(tiny_model, tmp_path):
    torch.save({}, tmp_path / "lcm.pt")
    cfg = CFG.model_copy(update={"loras": (LoraSpec(id=str(tmp_path / "lcm.pt")),)})
    with pytest.raises(LoraError, match="pickle"):
        StreamV2V.from_pretrained(tiny_model, config=cfg, device="cpu")


# ---------------------------------------------------------------------------- one alpha rule
@pytest.fixture(scope="module")
def engines(tiny_model, tmp_path_factory):
    """A kohya file with a text-encoder part where some layers carry no alpha (kohya: the
    rank), a plain engine, and one with that file fused at load at 0.8."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    plain = StreamV2V.from_pretrained(tiny_model, config=CFG, device="cpu")
    lora = lora_factors(unet, seed=7, rank=4, alpha=16.0)
    te = lora_factors(plain.text_encoder, seed=8, targets=["q_proj", "fc1"])
    path = write_kohya(tmp_path_factory.mktemp("alpha") / "mixed-alpha.safetensors", lora, te)
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    dropped = sorted(k for k in tensors if k.endswith(".alpha") and "attn1" in k)
    for key in dropped:
        del tensors[key]
    save_file(tensors, str(path))
    cfg = CFG.model_copy(update={"loras": (LoraSpec(id=str(path), scale=0.8),)})
    fused = StreamV2V.from_pretrained(tiny_model, config=cfg, device="cpu")
    return plain, fused, str(path), dropped


def test_one_file_gives_the_same_weights_fused_at_load_and_switched(engines):
    plain, fused, path, dropped = engines
    assert dropped  # some layers have no alpha: the rule matters
    lora = plain.adapters.load(path, path)
    scales = {n: d.scale for n, d in lora.unet.items()}
    assert {scales[n] for n in scales if "attn1" in n} == {1.0}  # none = rank
    assert {scales[n] for n in scales if "attn1" not in n} == {4.0}  # 16 / 4
    plain.set_loras({path: 0.8})
    for (name, a), (_, b) in zip(plain.unet.named_parameters(), fused.unet.named_parameters()):
        assert torch.equal(a, b), name
    # The text-encoder part is fused at load too, as a preset switches it in.
    assert torch.equal(plain.encode_prompt("a cat", {path: 0.8}), fused.encode_prompt("a cat"))
    assert not torch.equal(plain.encode_prompt("a cat"), fused.encode_prompt("a cat"))
    plain.set_loras({})
    plain.adapters.retain(set())


def test_peft_alpha_pattern_and_rank_pattern_set_each_layer_s_scale(tiny, tmp_path):
    unet, te, _ = tiny
    lora = lora_factors(unet, seed=2, rank=4, alpha=8.0, targets=["to_q", "to_k", "conv1"])
    path = write_diffusers(tmp_path / "pattern.safetensors", lora)
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta = {"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"to_k": 2, "conv1": 12}}
    save_file(tensors, str(path), metadata={"lora_adapter_metadata": json.dumps(meta)})
    got = load_lora(path, {"unet": unet, "text_encoder": te})
    assert {n: d.scale for n, d in got.unet.items()} == {
        "block.to_q": 2.0,
        "block.to_k": 0.5,
        "conv1": 3.0,
    }


def test_a_lora_in_engine_loras_and_a_preset_switches_its_text_encoder_part_by_the_difference(
    engines,
):
    from daemon.styles.presets import Preset
    from daemon.styles.switching import StyleSwitcher

    plain, fused, path, _ = engines
    switcher = StyleSwitcher(fused, fused.config)
    more = Preset(name="more", prompt="a cat", loras=(LoraSpec(id=path, scale=1.2),))
    same = Preset(name="same", prompt="a cat", loras=(LoraSpec(id=path, scale=0.8),))
    switcher.encode([more, same])
    plain.adapters.load(path, path)
    want_more = plain.encode_prompt("a cat", {path: 1.2})
    want_same = plain.encode_prompt("a cat", {path: 0.8})
    plain.adapters.retain(set())
    got_more, got_same = switcher._embeds_of(more)[0], switcher._embeds_of(same)[0]
    assert float((got_more - want_more).abs().max()) <= 1e-5
    assert torch.equal(got_same, want_same)
    fused.adapters.retain(set())


# ---------------------------------------------------------------------------- transactions
def test_a_rewrite_failing_on_the_nth_layer_restores_the_previous_set(tiny):
    unet, te, files = tiny
    lib = AdapterLibrary(unet, te)
    for fmt, path in files.items():
        lib.load(fmt, path)
    base = {n: w.clone() for n, w in unet.named_parameters()}
    lib.set_loras({"locon": 1.0, "loha-tucker": 0.5})
    before = {n: w.clone() for n, w in unet.named_parameters()}
    calls = []

    def fail_on_the_fourth(layer: str) -> None:
        calls.append(layer)
        if len(calls) == 4:
            raise RuntimeError("CUDA out of memory (injected)")

    lib._patch["unet"].before_write = fail_on_the_fourth
    with pytest.raises(LoraSwitchError, match=r"out of memory.*previous set was restored") as err:
        lib.set_loras({"dora-peft": 1.0, "lokr-factored": 0.7})
    assert err.value.restored == "previous"
    assert len(calls) == 7 and calls[4:] == calls[:3][::-1]  # the three rewritten, put back
    assert lib.active == {"locon": 1.0, "loha-tucker": 0.5}  # not the set that failed
    for n, w in unet.named_parameters():
        assert torch.equal(w, before[n]), n

    # Failing again while restoring: every layer goes back to its base (no memory needed).
    calls.clear()
    lib._patch["unet"].before_write = lambda layer: (
        calls.append(layer),
        len(calls) >= 3 and (_ for _ in ()).throw(RuntimeError("out of memory")),
    )
    with pytest.raises(LoraSwitchError, match="base weight") as err:
        lib.set_loras({"dora-peft": 1.0})
    assert err.value.restored == "base" and lib.active == {}
    for n, w in unet.named_parameters():
        assert torch.equal(w, base[n]), n
    lib._patch["unet"].before_write = None
    assert lib.set_loras({"dora-peft": 1.0}) > 0  # the library claims nothing it does not hold
    lib.retain(set())


def test_adding_a_lora_is_all_or_nothing_for_its_unet_and_text_encoder_parts(tiny, monkeypatch):
    unet, te, files = tiny
    lib = AdapterLibrary(unet, te)
    held = lib.memory()
    weights = load_lora(files["loha-tucker"], lib.models)
    assert weights.unet and weights.text_encoder
    real, copies = Patcher._copy, []

    def fail_on_the_third_unet_layer(self, weight, where):
        copies.append(self.model)
        if copies.count(unet) == 3:
            raise RuntimeError("out of memory (injected)")
        return real(self, weight, where)

    monkeypatch.setattr(Patcher, "_copy", fail_on_the_third_unet_layer)
    with pytest.raises(LoraError, match=r"could not add LoRA 'loha'.*nothing changed"):
        lib.add("loha", weights)
    monkeypatch.undo()
    assert copies.count(te) == len(weights.text_encoder)  # copied, then freed with the rest
    assert lib.names == [] and lib.memory() == held
    lib.add("loha", weights)  # (without the failure: both parts)
    assert lib.memory()["lora_base_bytes"] > 0 and lib.has_text_encoder_weights("loha")
    lib.retain(set())


def test_an_unknown_name_is_a_clear_error_everywhere(tiny):
    unet, te, files = tiny
    lib = AdapterLibrary(unet, te)
    lib.load("locon", files["locon"])
    for call in (
        lambda: lib.set_loras({"nope": 1.0}),
        lambda: lib.text_encoder_loras({"nope": 1.0}).__enter__(),
        lambda: lib.has_text_encoder_weights("nope"),
    ):
        with pytest.raises(UnknownLoraError) as err:
            call()
        assert str(err.value).startswith("no LoRA named 'nope' is loaded; loaded: ['locon']")
    lib.retain(set())


# ---------------------------------------------------------------------------- layouts, bases
def test_conv_loras_on_a_channels_last_model(tiny):
    unet, te, files = tiny
    lib = AdapterLibrary(unet, te)
    lib.load("locon", files["locon"])
    lib.set_loras({"locon": 0.9})
    want = {n: w.clone() for n, w in unet.named_parameters()}
    lib.retain(set())
    last = TinyUNet().requires_grad_(False)
    last.load_state_dict(unet.state_dict())
    last = last.to(memory_format=torch.channels_last)
    assert not last.conv1.weight.is_contiguous()
    strides, ptr = last.conv1.weight.stride(), last.conv1.weight.data_ptr()
    base = {n: w.clone() for n, w in last.named_parameters()}
    lib = AdapterLibrary(last, te)
    lib.load("locon", files["locon"])
    lib.set_loras({"locon": 0.9})
    for n, w in last.named_parameters():
        assert torch.equal(w, want[n]), n
    assert last.conv1.weight.stride() == strides and last.conv1.weight.data_ptr() == ptr
    lib.set_loras({})
    for n, w in last.named_parameters():
        assert torch.equal(w, base[n]), n
    lib.retain(set())


def test_base_copies_in_host_memory_restore_exactly(tiny):
    unet, te, files = tiny
    base = {n: w.clone() for n, w in unet.named_parameters()}
    host = AdapterLibrary(unet, te, lora_base="host")
    for fmt, path in files.items():
        host.load(fmt, path)
    mem = host.memory()
    assert host.base_location == "host" and mem["lora_base_device_bytes"] == 0
    assert mem["lora_base_bytes"] > 0
    rng = np.random.default_rng(1)
    names = list(files)
    results = {}
    for _ in range(60):
        scales = {n: float(rng.uniform(0.2, 1.2)) for n in rng.choice(names, 2, replace=False)}
        host.set_loras(scales)
        results[tuple(sorted(scales.items()))] = {n: w.clone() for n, w in unet.named_parameters()}
    host.set_loras({})
    for n, w in unet.named_parameters():
        assert torch.equal(w, base[n]), n
    host.retain(set())
    # The same weights as with the copies on the device, bit for bit.
    device = AdapterLibrary(unet, te, lora_base="device")
    for fmt, path in files.items():
        device.load(fmt, path)
    for key, want in list(results.items())[:5]:
        device.set_loras(dict(key))
        assert all(torch.equal(w, want[n]) for n, w in unet.named_parameters())
    # Moved while loaded: still exact.
    device.set_lora_base("host")
    assert device.memory()["lora_base_device_bytes"] == 0
    device.set_loras({})
    assert all(torch.equal(w, base[n]) for n, w in unet.named_parameters())
    device.retain(set())


def test_auto_picks_host_when_the_device_is_short(tiny):
    assert choose_lora_base("auto", base_bytes=10, headroom_bytes=None) == "device"
    assert choose_lora_base("auto", base_bytes=10, headroom_bytes=100) == "device"
    assert choose_lora_base("auto", base_bytes=101, headroom_bytes=100) == "host"
    assert choose_lora_base("device", base_bytes=101, headroom_bytes=100) == "device"
    unet, te, files = tiny
    lib = AdapterLibrary(unet, te, lora_base="auto", headroom_bytes=1 << 30)
    lib.load("locon", files["locon"])
    assert lib.base_location == "device"
    short = lib.memory()["lora_base_bytes"] // 2
    lib.set_lora_base("auto", headroom_bytes=short)
    assert lib.base_location == "host" and lib.memory()["lora_base_device_bytes"] == 0
    lib.retain(set())


# ---------------------------------------------------------------------------- bytes held
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_memory_reports_the_documented_rule(tiny, tmp_path, dtype):
    unet32, te32, _ = tiny
    unet, te = TinyUNet().to(dtype), TinyEncoder().to(dtype)
    plan = [("loha-tucker", ["conv1", "to_q"], ["q_proj"]), ("dora-kohya", ["ff.net.2"], []),
            ("lokr-factored", ["proj_in"], ["fc1"])]  # fmt: skip
    path, _ = make_mixed(tmp_path / "mixed.safetensors", plan, unet32, te32)
    lib = AdapterLibrary(unet, te)
    lib.load("mixed", path)
    lib.load("locon", make(tmp_path / "locon.safetensors", "locon", unet32, te32)[0])
    size = torch.finfo(dtype).bits // 8
    factors, touched = 0, set()
    for file in (path, tmp_path / "locon.safetensors"):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118
                if not key.endswith(".alpha"):
                    factors += (
                        f.get_slice(key).get_shape()
                        and np.prod(f.get_slice(key).get_shape()) * size
                    )
                    touched.add(key.split(".")[0])
    models = {"lora_unet_": unet, "lora_te_text_model_": te}
    base = 0
    for stem in touched:
        prefix = next(p for p in models if stem.startswith(p))
        flat = stem[len(prefix) :]
        module = next(m for n, m in models[prefix].named_modules() if n.replace(".", "_") == flat)
        base += module.weight.numel() * size
    mem = lib.memory()
    assert mem["lora_bytes"] == factors and mem["lora_base_bytes"] == base
    assert mem["lora_base_device_bytes"] == base and mem["loras_loaded"] == 2
    assert sum(lib.bytes_of(n)["factors"] for n in lib.names) == factors
    assert max(lib.bytes_of(n)["base"] for n in lib.names) <= base
    lib.retain(set())
    assert lib.memory()["lora_bytes"] == lib.memory()["lora_base_bytes"] == 0


def test_a_preset_whose_switch_fails_is_marked_and_the_old_style_runs_on(tiny_model, tmp_path):
    from diffusers import UNet2DConditionModel

    from daemon.styles.presets import Preset
    from daemon.styles.switching import StyleSwitcher

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    ink = str(write_diffusers(tmp_path / "ink.safetensors", lora_factors(unet, seed=1)))
    glow = str(write_diffusers(tmp_path / "glow.safetensors", lora_factors(unet, seed=2)))
    engine = StreamV2V.from_pretrained(tiny_model, config=CFG, device="cpu")
    a = Preset(name="a", prompt="ink", loras=(LoraSpec(id=ink),), transition_frames=3)
    b = Preset(name="b", prompt="glow", loras=(LoraSpec(id=glow),), transition_frames=3)
    switcher = StyleSwitcher(engine, CFG)
    switcher.encode([a, b])
    switcher.start(a)
    weights = {n: w.clone() for n, w in engine.unet.named_parameters()}
    embeds = engine.prompt_embeds[0].clone()
    calls = []

    def out_of_memory_at_the_fifth_layer(layer: str) -> None:
        calls.append(layer)
        if len(calls) == 5:
            raise RuntimeError("CUDA out of memory (injected)")

    engine.adapters._patch["unet"].before_write = out_of_memory_at_the_fifth_layer
    switcher.switch(b)
    for _ in range(3):
        switcher.before_frame()
    engine.adapters._patch["unet"].before_write = None
    assert switcher.failed == "b" and not switcher.switching
    assert "LoRA switch failed" in switcher.loras.errors["b"]
    assert "out of memory" in switcher.loras.errors["b"]
    assert engine.adapters.active == switcher.lora_scales == {ink: 1.0}
    assert all(torch.equal(w, weights[n]) for n, w in engine.unet.named_parameters())
    assert torch.equal(engine.prompt_embeds[0], embeds)
    # The library changed (a new read): the preset may be tried again, and it works.
    switcher.failed = None  # (its owner, the engine worker, reads and clears it)
    switcher.encode([a, b])
    assert "b" not in switcher.loras.errors
    switcher.switch(b.model_copy(update={"transition_frames": 0}))
    assert engine.adapters.active == {glow: 1.0} and switcher.failed is None


# ---------------------------------------------------------------------------- from a hub
_FROM_HUB = """
import sys, torch
from streamv2v.adapters import LoraError, load_lora
from tests.lycoris_helpers import TinyEncoder, TinyUNet
torch.manual_seed(1)
models = {"unet": TinyUNet(), "text_encoder": TinyEncoder()}
local = load_lora(sys.argv[1], models)
for repo in sys.argv[2:]:
    try:
        got = load_lora(repo, models)
    except LoraError as err:
        print("error", repo, err)
        continue
    same = all(
        torch.equal(a, b)
        for name, d in local.unet.items()
        for a, b in zip(d.tensors(), got.unet[name].tensors())
    )
    print("read", repo, same, len(got.unet), len(got.text_encoder))
"""


@pytest.mark.slow  # (two interpreters: the hub's environment is read at import)
def test_a_hub_lora_is_downloaded_then_read_from_the_cache_offline(tiny, tmp_path):
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from tests.hub_server import HubServer

    _, _, files = tiny
    repos = {"test-org/ink": tmp_path / "ink", "test-org/named": tmp_path / "named"}
    for folder in repos.values():
        folder.mkdir()
    shutil.copy(files["loha-tucker"], repos["test-org/ink"] / "pytorch_lora_weights.safetensors")
    shutil.copy(files["loha-tucker"], repos["test-org/named"] / "style.safetensors")
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), PYTHONPATH=root, HF_HUB_DISABLE_XET="1")
    env.pop("HF_HUB_OFFLINE", None)
    cmd = [sys.executable, "-c", _FROM_HUB, str(files["loha-tucker"]), *repos]

    def run(**extra: str) -> list[str]:
        out = subprocess.run(cmd, env={**env, **extra}, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.splitlines()

    with HubServer(repos) as hub:
        # The default file name, and a repo's one .safetensors file (asked from the hub's list).
        lines = run(HF_ENDPOINT=hub.url)
        assert lines == ["read test-org/ink True 6 3", "read test-org/named True 6 3"], lines
    # Offline: the default name is read from the cache; the other repo's file name needs the
    # hub's list, so it says what to do.
    lines = run(HF_HUB_OFFLINE="1", HF_ENDPOINT=hub.url)
    assert lines[0] == "read test-org/ink True 6 3", lines
    assert lines[1].startswith("error test-org/named") and "HF_HUB_OFFLINE" in lines[1], lines
