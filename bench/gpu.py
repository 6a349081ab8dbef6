"""The GPU benchmark: one prepared command (run it through bench/gpu.sh on the GPU machine).

    python bench/gpu.py                          # CUDA: SD1.5 / SD2.1 architectures, 512x512, fp16
    python bench/gpu.py --device cpu --quick     # the same logic on the CPU, tiny model (rehearsal)

Per case: engine-only per-frame p50/p95 ms (CUDA events around ``engine(frame)``, numpy out),
FPS, peak VRAM; bank off / our reference bank (EA+FF+DyMe, the reference defaults) / the same
bank computed the reference's way (bench/reference_bank.py); eager / compiled. Then the daemon's
glass-to-glass p50/p95 (capture -> publish) with a generated camera at 30 and 60 fps. Random
weights: speed does not depend on weight values. Prints a markdown table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import SD15_UNET, SD21_UNET, pct, sd_components, test_frames
from controlnet import control_case
from reference_bank import install_reference_bank

from streamv2v import BankConfig, EngineConfig, StreamV2V
from streamv2v.testing import build_tiny_components, save_tiny_model

#: "reference": the engine's own bank off, bench/reference_bank.py's processors on the UNet.
BANKS = {
    "off": BankConfig(enabled=False),
    "ours": BankConfig(),
    "reference": BankConfig(enabled=False),
}
#: (architecture, steps, bank, compiled) in priority order: the budget cuts from the end.
CASES = [
    ("sd15", 1, "ours", False),
    ("sd15", 1, "ours", True),
    ("sd15", 1, "off", False),
    ("sd15", 1, "off", True),
    ("sd15", 1, "reference", False),
    ("sd21", 1, "ours", False),
    ("sd21", 1, "ours", True),
    ("sd15", 4, "ours", False),
    ("sd15", 4, "ours", True),
]


def parts_for(arch: str, quick: bool, tiny: Path, device, dtype) -> dict:
    if quick:  # the tiny model; its "sd21" role gets SD2.1's linear projections
        parts = build_tiny_components()
        if arch == "sd21":
            from diffusers import UNet2DConditionModel

            parts["unet"] = UNet2DConditionModel.from_config(
                parts["unet"].config, use_linear_projection=True
            )
        from transformers import CLIPTokenizer

        parts["tokenizer"] = CLIPTokenizer.from_pretrained(tiny / "tokenizer")
    else:
        parts = sd_components(tiny, SD15_UNET if arch == "sd15" else SD21_UNET)
    for m in (parts["unet"], parts["vae"], parts["text_encoder"]):
        m.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return parts


def time_engine(engine: StreamV2V, frames, n: int, warmup: int, hook=None) -> dict:
    dev = engine.device
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    ms = []
    for i in range(warmup + n):
        if hook is not None:
            hook(i)
        f = frames[i % len(frames)]
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            engine(f)
            end.record()
            end.synchronize()
            dt = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            engine(f)
            dt = (time.perf_counter() - t0) * 1000
        if i >= warmup:
            ms.append(dt)
    return {
        "p50_ms": pct(ms, 50),
        "p95_ms": pct(ms, 95),
        "fps": 1000.0 / float(np.mean(ms)),
        "peak_vram_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "frames": len(ms),
    }


def engine_cases(args, tiny: Path, device, dtype, deadline: float, dump) -> list[dict]:
    rows, engines, parts = [], {}, {}
    frames = test_frames(8, size=min(480, args.size))
    for arch, steps, bank, compiled in CASES:
        row = {"arch": arch, "steps": steps, "bank": bank, "compiled": compiled}
        rows.append(row)
        if args.quick and compiled and (arch, steps) != ("sd15", 1):
            row["skipped"] = "--quick compiles the 1-step sd15 cases only"
            continue
        if time.monotonic() > deadline - (90 if compiled else 20):
            row["skipped"] = "time budget"
            continue
        if arch not in parts:
            parts[arch] = parts_for(arch, args.quick, tiny, device, dtype)
        cfg = EngineConfig(
            width=args.size,
            height=args.size,
            steps=steps,
            strength=max(0.4, steps / 50),
            vae="model",
            bank=BANKS[bank],
            compile="on" if compiled else "off",
        )
        key = (arch, compiled)
        t0 = time.monotonic()
        if key not in engines:
            engines[key] = StreamV2V(**parts[arch], config=cfg)
            engines[key].set_prompt("a claymation figure")
        engine = engines[key]
        hook = None
        engine.set_config(cfg)  # (also puts this engine's processors back on the shared UNet)
        if bank == "reference":
            state = install_reference_bank(engine.unet, BankConfig())
            interval = BankConfig().interval

            def hook(i, state=state, interval=interval):
                state["update"] = i % interval == 0

        if compiled:
            engine.warmup([steps], progress=False)
            row["compile_s"] = time.monotonic() - t0
            # Graphs inductor could not run as CUDA graphs (e.g. a mutated non-static input).
            row["cudagraph_skips"] = counters["inductor"].get("cudagraph_skips", 0)
        row.update(time_engine(engine, frames, args.frames, args.warmup, hook))
        print(f"  {arch} {steps} step(s) bank={bank} compiled={compiled}: {row}", flush=True)
        dump(rows=rows)
    by = {(r["arch"], r["steps"], r["bank"], r["compiled"]): r for r in rows if "p50_ms" in r}
    for r in rows:  # the ratios the goal is stated in
        eager = by.get((r["arch"], r["steps"], r["bank"], False))
        ref = by.get((r["arch"], r["steps"], "reference", False))
        if "p50_ms" in r and eager and r["compiled"]:
            r["speedup_vs_eager"] = eager["p50_ms"] / r["p50_ms"]
        if "p50_ms" in r and ref and r["bank"] == "ours":
            r["ours_over_reference"] = r["p50_ms"] / ref["p50_ms"]
    return rows


def save_model(parts: dict, folder: Path) -> Path:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(folder)
    return folder


def daemon_g2g(folder: Path, args, fps: int, compiled: bool) -> dict:
    """The daemon (generated camera at ``fps``, engine thread, output paced at ``fps``):
    glass-to-glass latency p50/p95 and the styled output rate."""
    from daemon.app import Daemon
    from daemon.config import DaemonConfig
    from daemon.runner import apply_demo

    cfg, _ = apply_demo(DaemonConfig())
    data = cfg.model_dump()
    data["engine"].update({"model": str(folder), "loras": [], "device": args.device})
    # (no ControlNet: the demo's tiny-canny fits the tiny style model, not this one)
    data["engine"]["settings"].update(
        {"width": args.size, "height": args.size, "steps": 1, "vae": "model", "loras": (),
         "control": ()}
    )  # fmt: skip
    data["engine"]["settings"]["compile"] = "on" if compiled else "off"
    data["output"]["fps"] = fps
    data["output"]["preview"]["port"] = 0
    data["output"]["virtual_camera"]["enabled"] = False
    data["camera"]["fps"] = fps
    for section in ("latency", "control", "hotkeys"):
        data[section]["enabled"] = False
    daemon = Daemon(DaemonConfig.model_validate(data))
    t0 = time.monotonic()
    daemon.start()
    try:
        while daemon.engine.state != "running":
            if time.monotonic() - t0 > 300:
                return {"fps": fps, "error": f"engine state {daemon.engine.state} after 300 s"}
            time.sleep(0.1)
        ready = time.monotonic() - t0
        time.sleep(1.0)
        daemon.output.latency_ms.clear()
        styled0, t1 = daemon.output.kinds["styled"], time.monotonic()
        time.sleep(args.daemon_seconds)
        lat = np.asarray(daemon.output.latency_ms.snapshot())
        styled = (daemon.output.kinds["styled"] - styled0) / (time.monotonic() - t1)
    finally:
        daemon.stop()
    return {
        "camera_fps": fps,
        "compiled": compiled,
        "ready_s": ready,
        "g2g_p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
        "g2g_p95_ms": float(np.percentile(lat, 95)) if lat.size else None,
        "styled_fps": styled,
    }


def markdown(rows: list[dict], daemon: list[dict]) -> str:
    def f(v, spec=".1f"):
        return "-" if v is None else format(v, spec)

    out = [
        "| UNet | steps | bank | compiled | p50 ms | p95 ms | FPS | peak VRAM MB | "
        "x eager | ours/ref | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r:
            out.append(
                f"| {r['arch']} | {r['steps']} | {r['bank']} | {r['compiled']} | "
                f"skipped: {r['skipped']} | | | | | | |"
            )
            continue
        out.append(
            f"| {r['arch']} | {r['steps']} | {r['bank']} | {r['compiled']} | {f(r['p50_ms'])} | "
            f"{f(r['p95_ms'])} | {f(r['fps'])} | {f(r['peak_vram_mb'], '.0f')} | "
            f"{f(r.get('speedup_vs_eager'), '.2f')} | {f(r.get('ours_over_reference'), '.2f')} | "
            f"{f(r.get('compile_s'), '.0f')} |"
        )
    out += ["", "| daemon camera fps | compiled | g2g p50 ms | g2g p95 ms | styled fps |"]
    out.append("|---|---|---|---|---|")
    for d in daemon:
        out.append(
            f"| {d['camera_fps']} | {d.get('compiled')} | {f(d.get('g2g_p50_ms'))} | "
            f"{f(d.get('g2g_p95_ms'))} | {f(d.get('styled_fps'))} |"
        )
    return "\n".join(out)


def lora_case(args, tiny: Path, device, dtype) -> dict:
    """bench/lora.py on the SD1.5 architecture (the tiny model with --quick), rank 64, eager:
    the switch costs with base copies on the device and with ``lora_base = "host"`` (pinned
    host memory, uploads per switch: ``*_host_ms``), and per file type (LoRA/LoHa/LoKr/DoRA)."""
    from lora import measure

    parts = parts_for("sd15", args.quick, tiny, device, dtype)
    cfg = EngineConfig(width=args.size, height=args.size, steps=1, vae="model",
                       bank=BANKS["off"], compile="off")  # fmt: skip
    engine = StreamV2V(**parts, config=cfg)
    frames = test_frames(args.warmup + 2 * min(args.frames, 20), size=min(480, args.size))
    try:
        return measure(engine, 64, frames, args.warmup)
    except Exception as err:  # a failed case is a row, not a lost run
        return {"error": repr(err)}


def mask_cases(device: torch.device, frames: int) -> dict:
    """The person mask's steps (bench/mask.py): the segmenter (a CPU thread) and the composite
    on the CPU and on ``device``: which is cheaper there."""
    import mask

    out: dict = {}
    try:
        out["segment_512_from_640x480"] = mask.bench_segment(frames)
    except Exception as err:  # e.g. ai-edge-litert not carried: the composite still runs
        out["segment_512_from_640x480"] = {"error": str(err)}
    for dev in dict.fromkeys(["cpu", str(device)]):
        for w, h in ((512, 512), (1280, 720)):
            out[f"composite_{dev}_{w}x{h}"] = mask.bench_composite(dev, w, h, frames)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny model, 64x64, few frames (CPU)")
    p.add_argument("--size", type=int, default=None, help="default 512 (64 with --quick)")
    p.add_argument("--frames", type=int, default=None, help="timed frames per case")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--daemon-seconds", type=float, default=None)
    p.add_argument(
        "--budget-s", type=float, default=330, help="start no engine case after this (s)"
    )
    p.add_argument("--json", default=os.environ.get("BENCH_JSON", "bench_gpu.json"))
    args = p.parse_args()
    args.size = args.size or (64 if args.quick else 512)
    args.frames = args.frames or (8 if args.quick else 100)
    args.daemon_seconds = args.daemon_seconds or (3.0 if args.quick else 8.0)
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    t_start = time.monotonic()
    deadline = t_start + args.budget_s
    tiny = save_tiny_model(Path(tempfile.mkdtemp(prefix="streamv2v-gpu-bench-")) / "tiny")
    info = {
        "device": str(device),
        "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype),
        "size": args.size,
        "quick": args.quick,
        "threads": torch.get_num_threads(),
    }
    print(f"bench/gpu.py {info}", flush=True)
    results: dict = {**info, "engine": [], "daemon": []}

    def dump(rows=None, daemon=None) -> None:  # after every case: a cut-off run keeps its part
        results["engine"] = rows if rows is not None else results["engine"]
        results["daemon"] = daemon if daemon is not None else results["daemon"]
        results["elapsed_s"] = time.monotonic() - t_start
        Path(args.json).write_text(json.dumps(results, indent=1))

    with torch.inference_mode():
        rows = engine_cases(args, tiny, device, dtype, deadline, dump)
    # ControlNet cost: a Canny ControlNet of the UNet's architecture, ratio to none (1 step).
    results["control"] = []
    for compiled in (False, True):
        if time.monotonic() > deadline - (120 if compiled else 30):
            results["control"].append({"compiled": compiled, "skipped": "time budget"})
            continue
        arch = "tiny" if args.quick else "sd15"
        frames = min(args.frames, 30)
        results["control"].append(
            control_case(arch, tiny, device, dtype, args.size, frames, args.warmup, compiled)
        )
        print(f"  controlnet {results['control'][-1]}", flush=True)
        dump()
    daemon: list[dict] = []
    folder = tiny
    if not args.quick:
        parts = parts_for("sd15", False, tiny, "cpu", dtype)
        folder = save_model(parts, tiny.parent / "sd15")
        del parts
    for fps in (30, 60):
        # On a GPU the daemon runs what a user runs there (compiled); the CPU rehearsal eager.
        if time.monotonic() > deadline + 60:  # (each daemon run: load, compile, ~10 s)
            daemon.append({"camera_fps": fps, "error": "time budget"})
            continue
        daemon.append(daemon_g2g(folder, args, fps, compiled=device.type == "cuda"))
        print(f"  daemon {daemon[-1]}", flush=True)
        dump(daemon=daemon)
    results["lora"] = lora_case(args, tiny, device, dtype)  # style LoRA switch costs
    print(f"  lora {results['lora']}", flush=True)
    results["mask"] = mask_cases(device, args.frames)
    # The SDXL family (bench/sdxl.py): its UNet architecture at 512/768/1024, 1 step, bank
    # off/on, eager; compiled at 512. After everything else: the budget cuts it first.
    results["sdxl"] = []
    if not args.quick and time.monotonic() < deadline + 120:
        from sdxl import sdxl_cases

        for sizes, compiled in (((512, 768, 1024), (False,)), ((512,), (True,))):
            results["sdxl"] += sdxl_cases(
                sizes, device, dtype, compiled=compiled, frames_n=min(args.frames, 30), warmup=3
            )
            dump()
    dump(rows, daemon)
    print(markdown(rows, daemon))
    print(f"person mask (ms p50/p95): {json.dumps(results['mask'])}")
    print(f"wrote {args.json} ({results['elapsed_s']:.0f} s)")


if __name__ == "__main__":
    main()
