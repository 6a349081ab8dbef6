"""What a style-LoRA switch costs, and what a frame costs with LoRAs fused in place vs none.

    python bench/lora.py --model tiny --size 128 --steps 1 --frames 30 --rank 8
    python bench/lora.py --model sd15 --size 512 --steps 1 --frames 4 --warmup 1 --rank 64

One run: a random LoRA of ``--rank`` on every attention projection, feed-forward layer and
resnet convolution of the UNet (what a CivitAI style LoRA touches) is loaded into the engine's
adapter library. Timed, interleaved: frames with no LoRA and frames with the LoRA rewritten into
the weights (the per-frame ratio: goal 1.0, a fused LoRA adds no matmul); a full switch
(none -> LoRA: every touched layer rewritten); a blend step (scale changes: the same rewrite);
a switch back to none (base copies restored); and the ``serve`` case, two sessions on shared
weights alternating frames with different LoRA sets (a rewrite before every frame). The
switches are timed twice: base copies on the device and in host memory (``lora_base = "host"``:
page-locked on CUDA, each rewrite uploads its base from there). Then one switch per file type
(LoRA, LoHa, LoKr, DoRA: random factors of the same rank on the same layers). Prints medians,
the memory held (factors and base copies) and writes nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import add_model_args, build_engine, median, test_frames, timed

from streamv2v.adapters import Dora, Hadamard, Kronecker, LoraWeights, LowRank

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


def random_kind(unet, kind: str, rank: int, seed: int = 0) -> LoraWeights:
    """A random LoHa / LoKr / DoRA of ``rank`` on the same layers as :func:`random_lora`."""
    import torch

    lora = random_lora(unet, rank, seed)
    if kind == "lora":
        return lora
    gen = torch.Generator().manual_seed(seed + 1)
    out = LoraWeights(f"random {kind} rank {rank}")
    for name, f in lora.unet.items():
        w = unet.get_submodule(name).weight
        dev, dt = w.device, w.dtype
        if kind == "dora":
            norms = w.float().flatten(1).norm(dim=1)
            out.unet[name] = Dora(f, norms.to(dev, dt), "out")
        elif kind == "loha":

            def r(*shape, dev=dev, dt=dt):
                return (torch.randn(*shape, generator=gen) * 0.1).to(dev, dt)

            cols = w[0].numel()
            out.unet[name] = Hadamard(r(w.shape[0], rank), r(rank, cols),
                                      r(w.shape[0], rank), r(rank, cols))  # fmt: skip
        else:  # lokr: w1 [a, c] whole, w2 factored (LyCORIS's default split)
            a = next(d for d in (8, 4, 2, 1) if w.shape[0] % d == 0)
            c = next(d for d in (8, 4, 2, 1) if w.shape[1] % d == 0)
            rest = w[0].numel() // c
            w1 = (torch.randn(a, c, generator=gen) * 0.1).to(dev, dt)
            w2a = (torch.randn(w.shape[0] // a, rank, generator=gen) * 0.1).to(dev, dt)
            w2b = (torch.randn(rank, rest, generator=gen) * 0.1).to(dev, dt)
            out.unet[name] = Kronecker(w1=w1, w2a=w2a, w2b=w2b)
    return out


def _switch_times(engine, switches: int, dev) -> tuple[list, list, list]:
    switch_on, blend, switch_off = [], [], []
    for k in range(switches):
        engine.set_loras({})
        switch_on.append(timed(lambda: engine.set_loras({"style": 1.0}), dev))
        blend.append(timed(lambda k=k: engine.set_loras({"style": 0.5 + 0.05 * k}), dev))
        switch_off.append(timed(lambda: engine.set_loras({}), dev))
    return switch_on, blend, switch_off


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
    switch_on, blend, switch_off = _switch_times(engine, switches, dev)
    engine.adapters.set_lora_base("host")  # base copies in (page-locked) host memory
    host_on, host_blend, host_off = _switch_times(engine, switches, dev)
    engine.adapters.set_lora_base("device")
    # serve: two sessions, sets {style} and {other}, alternating (each frame pays a rewrite).
    serve = []
    for i, f in enumerate(timed_frames[: max(2, len(timed_frames) // 2)]):
        scales = {"style": 1.0} if i % 2 else {"other": 1.0}
        serve.append(timed(lambda f=f, s=scales: (engine.set_loras(s), engine(f)), dev))
    mem = engine.adapters.memory()
    engine.adapters.retain(set())
    kinds = {}
    for kind in ("lora", "loha", "lokr", "dora"):
        engine.adapters.add("style", random_kind(engine.unet, kind, rank, seed=3))
        kinds[kind] = median(_switch_times(engine, max(2, switches // 2), dev)[0])
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
        "switch_on_host_ms": median(host_on) * ms,
        "blend_step_host_ms": median(host_blend) * ms,
        "switch_off_host_ms": median(host_off) * ms,
        **{f"switch_on_{kind}_ms": t * ms for kind, t in kinds.items()},
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
    print(
        f"  base copies in host memory: {r['switch_on_host_ms']:8.1f} / "
        f"{r['blend_step_host_ms']:.1f} / {r['switch_off_host_ms']:.1f} ms (on/blend/off)"
    )
    kinds = "  ".join(f"{k} {r[f'switch_on_{k}_ms']:.1f}" for k in ("lora", "loha", "lokr", "dora"))
    print(f"switch none -> style by type: {kinds} ms")
    print(f"serve, sessions alternating:  {r['serve_alternating_ms']:8.1f} ms per frame")
    print(f"  ratio to a plain frame:     {r['serve_over_plain']:8.3f}")
    print(
        f"memory: factors {r['factor_bytes_2_loras'] / 2**20:.1f} MB (2 LoRAs), "
        f"base copies {r['base_copy_bytes'] / 2**20:.1f} MB"
    )


if __name__ == "__main__":
    main()
