"""What a style-LoRA switch costs, and what a frame costs with LoRAs fused in place vs none.

    python bench/lora.py --model tiny --size 128 --steps 1 --frames 30 --rank 8
    python bench/lora.py --model sd15 --size 512 --steps 1 --frames 4 --warmup 1 --rank 64

One run: a random LoRA of ``--rank`` on every attention projection, feed-forward layer and
resnet convolution of the UNet (what a CivitAI style LoRA touches) is loaded into the engine's
adapter library. Timed, interleaved: frames with no LoRA and frames with the LoRA rewritten into
the weights (the per-frame ratio: goal 1.0, a fused LoRA adds no matmul); a full switch
(none -> LoRA: every touched layer rewritten); a blend step (scale changes: the same rewrite);
a switch back to none (base copies restored); and the ``serve`` case, two sessions on shared
weights alternating frames with different LoRA sets (a rewrite before every frame). Prints
medians, the memory held (factors and base copies) and writes nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import add_model_args, build_engine, median, test_frames, timed

from streamv2v.adapters import LoraWeights, LowRank

#: Layers a typical SD1.5 style LoRA adapts (kohya's default "LoRA-C3Lier"-like set).
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
           "conv1", "conv2")  # fmt: skip


def random_lora(unet, rank: int, seed: int = 0) -> LoraWeights:
    import torch

    gen = torch.Generator().manual_seed(seed)
    param = next(unet.parameters())
    out = LoraWeights(f"random rank {rank}")
    for name, module in unet.named_modules():
        if not any(name.endswith(t) for t in TARGETS) or not hasattr(module, "weight"):
            continue
        w = module.weight
        down = torch.randn(rank, *w.shape[1:], generator=gen) / w[0].numel() ** 0.5
        up = torch.randn(w.shape[0], rank, *([1, 1] if w.ndim == 4 else []), generator=gen)
        out.unet[name] = LowRank(
            down.to(param.device, param.dtype), (up * 0.01).to(param.device, param.dtype), 1.0
        )
    return out


def measure(engine, rank: int, frames: list, warmup: int, switches: int = 5) -> dict:
    """Every figure of the module docstring, in ms (medians) and bytes, for ``engine``."""
    dev = engine.device
    lora = random_lora(engine.unet, rank)
    engine.adapters.add("style", lora)
    engine.adapters.add("other", random_lora(engine.unet, rank, seed=1))
    engine.set_prompt("a style")
    for f in frames[: warmup + engine.latency_frames]:
        engine(f)
    timed_frames = frames[warmup:]
    plain, fused = [], []
    for i, f in enumerate(timed_frames):
        engine.set_loras({"style": 1.0} if i % 2 else {})
        (fused if i % 2 else plain).append(timed(lambda f=f: engine(f), dev))
    switch_on, blend, switch_off = [], [], []
    for k in range(switches):
        engine.set_loras({})
        switch_on.append(timed(lambda: engine.set_loras({"style": 1.0}), dev))
        blend.append(timed(lambda k=k: engine.set_loras({"style": 0.5 + 0.05 * k}), dev))
        switch_off.append(timed(lambda: engine.set_loras({}), dev))
    # serve: two sessions, sets {style} and {other}, alternating (each frame pays a rewrite).
    serve = []
    for i, f in enumerate(timed_frames[: max(2, len(timed_frames) // 2)]):
        scales = {"style": 1.0} if i % 2 else {"other": 1.0}
        serve.append(timed(lambda f=f, s=scales: (engine.set_loras(s), engine(f)), dev))
    mem = engine.adapters.memory()
    engine.adapters.retain(set())
    ms = 1000.0
    return {
        "rank": rank,
        "layers": len(lora.unet),
        "frame_plain_ms": median(plain) * ms,
        "frame_fused_ms": median(fused) * ms,
        "fused_over_plain": median(fused) / median(plain),
        "switch_on_ms": median(switch_on) * ms,
        "blend_step_ms": median(blend) * ms,
        "switch_off_ms": median(switch_off) * ms,
        "serve_alternating_ms": median(serve) * ms,
        "serve_over_plain": median(serve) / median(plain),
        "factor_bytes_2_loras": mem["lora_bytes"],
        "base_copy_bytes": mem["lora_base_bytes"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_model_args(p)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--switches", type=int, default=5, help="timed switches of each kind")
    args = p.parse_args()
    engine = build_engine(args, bank={"enabled": False})
    frames = test_frames(args.warmup + 2 * args.frames, size=args.size)
    r = measure(engine, args.rank, frames, args.warmup, args.switches)
    print(
        f"bench/lora.py model={args.model} size={args.size} steps={args.steps} rank={args.rank} "
        f"device={engine.device} dtype={engine.dtype} layers={r['layers']}"
    )
    print(f"frame, no LoRA:               {r['frame_plain_ms']:8.1f} ms")
    print(f"frame, LoRA fused in place:   {r['frame_fused_ms']:8.1f} ms")
    print(f"  ratio fused / none:         {r['fused_over_plain']:8.3f}")
    print(f"switch none -> LoRA:          {r['switch_on_ms']:8.1f} ms")
    print(f"blend step (scale change):    {r['blend_step_ms']:8.1f} ms")
    print(f"switch LoRA -> none:          {r['switch_off_ms']:8.1f} ms")
    print(f"serve, sessions alternating:  {r['serve_alternating_ms']:8.1f} ms per frame")
    print(f"  ratio to a plain frame:     {r['serve_over_plain']:8.3f}")
    print(
        f"memory: factors {r['factor_bytes_2_loras'] / 2**20:.1f} MB (2 LoRAs), "
        f"base copies {r['base_copy_bytes'] / 2**20:.1f} MB"
    )


if __name__ == "__main__":
    main()
