"""The memory estimate (streamv2v.memory) against the memory the engine really takes on CUDA, and
a real out-of-memory error stepped down the daemon's way.

    python bench/memory_estimate.py                        # CUDA, SD1.5's UNet architecture, fp16
    python bench/memory_estimate.py --model tiny --device cpu   # rehearsal (no measurement)

Per configuration: the estimate by part (read from the saved model folder's config and weight
headers, as the daemon's preflight reads it) and the measured peak of allocated memory over a
few frames (torch.cuda.max_memory_allocated, eager, compile off). Then, with a filler tensor
taking most of the free memory: the preflight's refusal line (daemon.models.preflight), and a
real torch.OutOfMemoryError in the engine stepped down with daemon.dataplane.degrade.StepDown
until frames run. Random weights: memory does not depend on weight values. Writes JSON.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import SD15_UNET, sd_components

from daemon.dataplane.degrade import StepDown, is_out_of_memory
from daemon.models.preflight import MemoryShortage, check_memory, estimate_for
from streamv2v import EngineConfig, StreamV2V
from streamv2v.memory import gib
from streamv2v.testing import save_tiny_model


def bank(frames: int) -> dict:
    return {"max_frames": frames, "merge_ratio": 1 / (frames + 1)}


CASES = {
    "512 4 steps bank 1": {"steps": 4},
    "512 4 steps bank 2": {"steps": 4, "bank": bank(2)},
    "512 4 steps bank off": {"steps": 4, "bank": {"enabled": False}},
    "512 1 step bank 1": {"steps": 1},
    "512 2 steps full CFG": {"steps": 2, "guidance": "full", "guidance_scale": 1.5},
    "768 2 steps bank 1": {"steps": 2, "width": 768, "height": 768},
}


def model_folder(kind: str, device: torch.device, dtype: torch.dtype) -> Path:
    """A diffusers folder: the tiny model, or SD1.5's UNet + TAESD with random weights."""
    root = Path(tempfile.mkdtemp(prefix="streamv2v-mem-"))
    tiny = save_tiny_model(root / "tiny")
    if kind == "tiny":
        return tiny
    from diffusers import StableDiffusionPipeline

    with torch.device(device):  # random init on the device: seconds, not minutes
        parts = sd_components(tiny, SD15_UNET)
    for name in ("unet", "vae", "text_encoder"):
        parts[name] = parts[name].to(device="cpu", dtype=dtype)
    pipe = StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(root / "sd15")
    return root / "sd15"


def measure(engine: StreamV2V, cfg: EngineConfig, frames: int) -> dict:
    engine.set_config(cfg)
    engine.release_memory()
    cuda = engine.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0
    image = np.random.default_rng(0).integers(0, 256, (cfg.height, cfg.width, 3), np.uint8)
    t0 = time.perf_counter()
    for i in range(frames):
        engine(np.roll(image, i, axis=1), output_type="np")
    if cuda:
        torch.cuda.synchronize()
    return {
        "allocated_before": before,
        "peak": torch.cuda.max_memory_allocated() if cuda else None,
        "seconds": time.perf_counter() - t0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["sd15", "tiny"], default="sd15")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--frames", type=int, default=8)
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    size = torch.finfo(dtype).bits // 8
    t0 = time.perf_counter()
    folder = model_folder(args.model, device, dtype)
    print(f"model folder built in {time.perf_counter() - t0:.1f} s: {folder}", flush=True)
    scale = 1 if args.model == "sd15" else 4  # the tiny rehearsal at an eighth of the sizes
    base = EngineConfig(vae="model", compile="off")

    def config(**update) -> EngineConfig:
        data = {**base.model_dump(), **update}
        for key in ("width", "height"):
            data[key] = data.get(key, 512) // (scale * 2 if scale > 1 else 1)
        return EngineConfig.model_validate(data)

    engine = StreamV2V.from_pretrained(folder, config=config(), device=device, dtype=dtype)
    engine.set_prompt("a claymation figure")
    weights = sum(
        p.numel() * p.element_size()
        for m in (engine.unet, engine.text_encoder, engine.vae)
        for p in m.parameters()
    )
    rows = []
    for name, update in CASES.items():
        cfg = config(**update)
        need = estimate_for(str(folder), cfg, size)
        got = measure(engine, cfg, args.frames)
        raw = need.weights + need.activations + need.bank + need.vae
        row = {
            "case": name,
            "size": f"{cfg.width}x{cfg.height}",
            "estimate": need.__dict__ | {"total": need.total, "raw": raw},
            "measured": got,
            "weights_loaded": weights,
        }
        if got["peak"]:
            row["estimate_over_peak"] = need.total / got["peak"]
            row["raw_over_peak"] = raw / got["peak"]
        rows.append(row)
        peak = got["peak"]
        print(
            f"{name:24s} estimate {gib(need.total)} (raw {gib(raw)}; weights {gib(need.weights)}, "
            f"act {gib(need.activations)}, bank {gib(need.bank)}, vae {gib(need.vae)})  "
            + (f"measured peak {gib(peak)}  ratio {need.total / peak:.2f}" if peak else ""),
            flush=True,
        )
    report: dict = {"device": str(device), "model": args.model, "cases": rows}
    report["weights_loaded_vs_estimate"] = [weights, rows[0]["estimate"]["weights"]]
    if device.type == "cuda":
        report["oom"] = real_oom(engine, folder, config(**CASES["512 4 steps bank 2"]), rows[1])
    out = Path(os.environ.get("OUT", ".")) / "memory_estimate.json"
    out.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {out}")


def real_oom(engine: StreamV2V, folder: Path, cfg: EngineConfig, row: dict) -> dict:
    """A filler takes the free memory but half of what ``cfg`` needs beyond what is allocated:
    the preflight refuses ``cfg`` with its line, and the engine's real OutOfMemoryError is
    stepped down until frames run."""
    engine.set_config(cfg)
    engine.release_memory()
    torch.cuda.synchronize()
    free, _ = torch.cuda.mem_get_info()
    extra = row["measured"]["peak"] - torch.cuda.memory_allocated()
    filler = torch.empty(max(0, free - extra // 2), dtype=torch.uint8, device="cuda")
    result: dict = {"filler": filler.numel(), "extra_needed": extra}
    try:
        check_memory(str(folder), cfg, "cuda", "float16")
        result["preflight"] = None
    except MemoryShortage as err:
        result["preflight"] = str(err)
    print(f"preflight with the filler: {result['preflight']}", flush=True)
    step = StepDown()
    image = np.zeros((cfg.height, cfg.width, 3), np.uint8)
    result["errors"] = []
    for _ in range(12):
        try:
            for _ in range(4):
                engine(image, output_type="np")
            break
        except Exception as err:
            oom = is_out_of_memory(err)
            result["errors"].append(
                {"type": type(err).__name__, "is_oom": oom, "text": str(err)[:160]}
            )
            if not is_out_of_memory(err):
                raise
            lowered = step.after(engine.config, err)
            if lowered is None:
                break
            engine.release_memory()
            engine.set_config(lowered)
    result["changes"] = step.changes
    result["ran_at"] = engine.config.model_dump(include={"width", "height", "steps"}) | {
        "bank": engine.config.bank.enabled and engine.config.bank.max_frames
    }
    print(f"real OOM stepped down: {step.changes} -> {result['ran_at']}", flush=True)
    del filler
    torch.cuda.empty_cache()
    return result


if __name__ == "__main__":
    main()
