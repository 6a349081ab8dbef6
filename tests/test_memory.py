"""Memory: the estimate (streamv2v.memory) against what the real engine allocates on the tiny
model, the preflight's one line, and the daemon stepping down after CUDA out-of-memory errors.

The GPU is a boundary this machine lacks: the out-of-memory errors are torch's own
``torch.OutOfMemoryError``, raised by a forward hook registered on the running engine's real
UNet (``register_forward_hook``, torch's public extension point) at chosen calls.
"""

from __future__ import annotations

import itertools
import json
import threading
import urllib.request

import numpy as np
import pytest
import test_server_page
import torch
from test_daemon import demo_config, wait_for

from daemon.app import Daemon
from daemon.control.tables import status_table
from daemon.dataplane.degrade import Limits, StepDown
from daemon.models.preflight import estimate_for, shortage
from streamv2v import EngineConfig, StreamV2V
from streamv2v.memory import UNetLayout, estimate_memory, fitting, lower

#: Stable Diffusion 1.5's UNet config (the parts the estimate reads).
SD15_UNET = {
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "layers_per_block": 2,
    "transformer_layers_per_block": 1,
}
SD15_PARAMS = 859_520_964 + 123_060_480 + 2_445_511  # UNet, CLIP ViT-L text encoder, TAESD
MIB = 1 << 20
browser = test_server_page.browser  # the real browser (a fixture of the control page's tests)
until = test_server_page.until


def bank(frames: int) -> dict:
    return {"max_frames": frames, "merge_ratio": 1 / (frames + 1)}


CONFIGS = [
    EngineConfig(width=64, height=64, steps=2, vae="model"),
    EngineConfig(width=96, height=128, steps=3, vae="model", bank=bank(2)),
    EngineConfig(width=64, height=64, steps=2, vae="model", guidance="full", guidance_scale=1.5),
    EngineConfig(width=64, height=64, steps=3, vae="model", stream_batch=False),
    EngineConfig(
        width=72, height=64, steps=2, vae="model", guidance="initialize", guidance_scale=1.3
    ),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_estimate_is_what_the_engine_allocates_for_weights_and_bank(tiny_model, dtype):
    engine = StreamV2V.from_pretrained(tiny_model, config=CONFIGS[0], device="cpu", dtype=dtype)
    size = torch.finfo(dtype).bits // 8
    loaded = sum(
        p.numel() for m in (engine.unet, engine.text_encoder, engine.vae) for p in m.parameters()
    )
    for cfg in CONFIGS:
        engine.set_config(cfg)  # allocates every buffer of the configuration
        need = estimate_for(str(tiny_model), cfg, size)
        assert need is not None
        assert need.weights == loaded * size  # from the safetensors headers alone
        assert need.bank == engine.stats()["bank_bytes"] > 0, cfg


def test_a_controlnet_counts_its_weights_and_a_down_path_of_activations():
    from daemon.models.registry import tiny_canny_dir, tiny_styles_dir
    from streamv2v.config import ControlSpec

    tiny_model = tiny_styles_dir()  # the shipped model, for which tiny-canny was trained

    plain = CONFIGS[0]
    spec = ControlSpec(model=str(tiny_canny_dir()), preprocess="canny")
    with_control = plain.model_copy(update={"control": [spec]})
    engine = StreamV2V.from_pretrained(tiny_model, config=with_control, device="cpu")
    net = sum(p.numel() for n in engine.control.nets for p in n.parameters())
    a, b = estimate_for(str(tiny_model), plain, 4), estimate_for(str(tiny_model), with_control, 4)
    assert a is not None and b is not None
    assert b.weights - a.weights == net * 4 > 0
    assert b.activations == 2 * a.activations and b.bank == a.bank


def test_sd15_figures_and_the_ladder():
    layout = UNetLayout.from_config(SD15_UNET)
    attention = layout.self_attention((64, 64))
    assert len(attention) == 16  # 2+2+2 down, 1 mid, 3+3+3 up
    # One bank frame of K/V/O at fp32, one slot: the 132 MB of the reference's measurement.
    assert 3 * sum(t * c for t, c in attention) * 4 / MIB == pytest.approx(132.2, abs=0.1)
    cfg = EngineConfig()  # 512x512, 4 steps in a stream batch, bank of 1 frame
    need = estimate_memory(cfg, layout, weight_params=SD15_PARAMS, dtype_bytes=2, vae_channels=64)
    assert need.weights == SD15_PARAMS * 2
    assert need.bank == 4 * 2 * 3 * sum(t * c for t, c in attention) * 2  # 4 slots, 2 frames
    assert 1.5 * 1024**3 < need.total < 4 * 1024**3, need.describe()
    # Every step down the ladder needs less, and the floor is a fixed point.
    seen = [cfg]
    while (step := lower(seen[-1])) is not None:
        seen.append(step[0])
    totals = [
        estimate_memory(c, layout, weight_params=SD15_PARAMS, dtype_bytes=2, vae_channels=64).total
        for c in seen
    ]
    assert all(a > b for a, b in itertools.pairwise(totals)), totals
    assert (seen[-1].width, seen[-1].steps, seen[-1].bank.enabled) == (64, 1, False)

    # fitting() stops at the first configuration that fits.
    def need_of(c: EngineConfig):
        return estimate_memory(c, layout, weight_params=SD15_PARAMS, dtype_bytes=2, vae_channels=64)

    fits, changes = fitting(cfg, need_of, totals[3])
    assert fits == seen[3] and len(changes) == 3
    assert fitting(cfg, need_of, totals[-1] - 1)[0] is None  # not even the floor


def test_the_preflight_line_names_what_to_lower(tiny_model):
    cfg = EngineConfig(width=256, height=256, steps=3, vae="model", bank=bank(2))
    need = estimate_for(str(tiny_model), cfg, 2)
    assert need is not None
    args = {"dtype_bytes": 2, "total": 80 * 1024**3, "device": "cuda:0"}
    assert shortage(str(tiny_model), cfg, free=need.total, **args) is None  # fits exactly
    line = shortage(str(tiny_model), cfg, free=need.total - 1, **args)
    assert line is not None and "\n" not in line
    assert "not enough GPU memory on cuda:0" in line and "bank.max_frames = 1" in line
    floor = estimate_for(str(tiny_model), cfg.model_copy(update={"width": 64, "height": 64}), 2)
    line = shortage(str(tiny_model), cfg, free=floor.weights // 2, **args)
    assert "even the lightest settings do not fit" in line and "weights alone" in line
    # Not on disk: no estimate, no refusal (the loader says what is missing).
    assert shortage("nobody/nothing-here", cfg, free=1, **args) is None


def test_limits_hold_every_later_configuration():
    step = StepDown()
    running = EngineConfig(width=128, height=96, steps=3, bank=bank(2))
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
    for expected in ("bank.max_frames 2 -> 1", "feature bank off", "steps 3 -> 2"):
        running = step.after(running, oom)
        assert step.changes[-1] == expected
    assert step.limits == Limits(bank_frames=0, steps=2)
    wide = EngineConfig(width=512, height=512, steps=4, bank=bank(4))
    held = step.apply(wide)
    assert (held.steps, held.bank.enabled, held.width) == (2, False, 512)
    assert "CUDA out of memory" in step.status()["reason"]


# --------------------------------------------------------------------------- the daemon
class OomAt:
    """A forward hook on the UNet that raises torch's OutOfMemoryError at chosen calls."""

    def __init__(self, calls: set[int]) -> None:
        self.calls, self.count, self.raised = calls, 0, 0
        self.lock = threading.Lock()

    def __call__(self, module, args, output):
        with self.lock:
            self.count += 1
            if self.count in self.calls:
                self.raised += 1
                raise torch.OutOfMemoryError(
                    "CUDA out of memory. Tried to allocate 512.00 MiB (test hook)"
                )
        return output


def test_the_daemon_steps_down_after_out_of_memory_and_keeps_publishing(
    tiny_model, memory_vcam, browser
):
    cfg = demo_config(tiny_model, output={"fps": 20.0})
    data = cfg.model_dump()
    data["engine"]["settings"].update({"width": 96, "height": 96, "steps": 2, "bank": bank(2)})
    daemon = Daemon(type(cfg).model_validate(data))
    daemon.start()
    states: list[str] = []
    try:
        assert wait_for(lambda: daemon.engine.state == "running", 60), daemon.status()
        hook = OomAt({3, 9, 15, 21})
        handle = daemon.engine.engine.unet.register_forward_hook(hook)
        cam = memory_vcam.instances[-1]
        start = len(cam.times)

        def settled() -> bool:
            states.append(daemon.engine.state)
            return hook.raised == 4 and hook.count >= 30

        assert wait_for(settled, 60, 0.01), (hook.count, daemon.status())
        styled = daemon.output.kinds["styled"]
        assert wait_for(lambda: daemon.output.kinds["styled"] > styled + 3, 30)
        times = np.array(cam.times[start:])
        url = daemon.control.url + "/status"
        with urllib.request.urlopen(url, timeout=5) as answer:
            status = json.loads(answer.read())
        config = daemon.engine.engine.config
        handle.remove()
        # A preset switch rebuilds the configuration from the settings: still within the limits.
        daemon.select_preset("anime", "test")
        assert wait_for(lambda: daemon.engine.applied.name == "anime", 10)
        worker = daemon.engine  # the switch is done when the engine runs anime's strength

        assert wait_for(lambda: worker.engine.config.strength == 0.5 and not worker.switching, 30)
        after_switch = worker.engine.config
        browser.get(daemon.control.url + "/")  # the control page, in a real browser
        banner = until(
            browser,
            "const b = document.getElementById('banner'); return !b.hidden && b.textContent",
        )
    finally:
        daemon.stop()
    assert "failed" not in states  # never the old fail-and-reload loop
    for cfg in (config, after_switch):
        assert (cfg.bank.enabled, cfg.steps, cfg.width, cfg.height) == (False, 1, 72, 72)
    degraded = status["degraded"]
    assert degraded["changes"] == [
        "bank.max_frames 2 -> 1",
        "feature bank off",
        "steps 2 -> 1",
        "size 96x96 -> 72x72",
    ]
    assert "out of memory" in degraded["reason"] and "CUDA out of memory" in degraded["reason"]
    assert status["state"]["engine"] == "running" and status["steps"] == 1
    table = status_table(status)  # `streamv2v status`
    assert "degraded out of memory (CUDA out of memory." in table, table
    assert banner.startswith("Engine degraded: out of memory") and "size 96x96 -> 72x72" in banner
    gaps = np.diff(times)
    print(f"published {len(times)} frames, largest gap {gaps.max() * 1000:.0f} ms (interval 50)")
    assert gaps.max() < 2 * 0.050  # never a missed output tick
