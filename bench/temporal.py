"""Flicker of the built-in tiny style model with the feature bank off and on.

    python bench/temporal.py                       # the shipped model, prompt "a warm scene"
    python bench/temporal.py --model DIR --prompt "a cool striped scene" --frames 60

Two clips of the model's own world, 128x128: a STATIC scene with fresh camera-like noise on every
frame (sigma 6/255), and a MOVING scene. For each bank setting it prints the consecutive-frame
MAD of the output, the MAD on frames right after a bank update vs the others (the "update pulse"
of Dynamic Merging), the FF pass rate and, for scale, the input's own MAD. One step, strength 0.3
(as the demo presets); then the self-attention entropy of every layer.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from daemon.cli import set_runtime_defaults
from streamv2v import BankConfig, EngineConfig
from streamv2v.scenes import SIZE, witness_clips

BANKS = {
    "off": BankConfig(enabled=False),
    "on (reference: EA+FF+DyMe)": BankConfig(mode="dyme"),
    "on, stable (the default)": BankConfig(mode="stable"),
    "on, FIFO (no merging)": BankConfig(mode="fifo", merge_ratio=0.5),
    "on, EA only": BankConfig(feature_fusion=False),
}


def attention_entropy(engine, frame: np.ndarray) -> dict[str, float]:
    """Softmax entropy of every self-attention layer on ``frame``, as a fraction of the maximum
    (log of the token count): ~1.0 is uniform attention (nothing for the bank to match),
    lower is structured."""
    import torch

    from streamv2v.attention import self_attention_layers

    found: dict[str, float] = {}

    def hook(name):
        def record(module, args, kwargs, _output):
            x = args[0] if args else kwargs["hidden_states"]
            if x.ndim == 4:
                x = x.flatten(2).transpose(1, 2)
            if module.group_norm is not None:
                x = module.group_norm(x.transpose(1, 2)).transpose(1, 2)
            q, k = module.to_q(x), module.to_k(x)
            b, n, c = q.shape
            h = module.heads
            q = q.view(b, n, h, c // h).transpose(1, 2)
            k = k.view(b, n, h, c // h).transpose(1, 2)
            attn = torch.softmax(q @ k.transpose(-1, -2) * module.scale, dim=-1).float()
            entropy = -(attn * attn.clamp_min(1e-12).log()).sum(-1).mean()
            found[name] = float(entropy / math.log(n))

        return record

    layers = self_attention_layers(engine.unet)
    handles = [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in layers.items()]
    try:
        engine(frame)
    finally:
        for handle in handles:
            handle.remove()
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="default: the shipped tiny style model")
    p.add_argument("--prompt", default="a warm scene")
    p.add_argument("--frames", type=int, default=48)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--strength", type=float, default=0.3, help="the demo presets' strength")
    args = p.parse_args()
    set_runtime_defaults()  # quiet library progress bars: before torch/transformers load
    from streamv2v import StreamV2V
    from streamv2v.temporal import temporal_figures

    if args.model is None:
        from daemon.models.registry import tiny_styles_dir

        args.model = str(tiny_styles_dir())

    def config(bank: BankConfig) -> EngineConfig:
        size = {"width": SIZE, "height": SIZE}
        return EngineConfig(
            **size, steps=args.steps, strength=args.strength, vae="model", bank=bank
        )

    print(
        f"model {args.model}, prompt {args.prompt!r}, {args.steps} step(s), strength "
        f"{args.strength:g}, {SIZE}x{SIZE}"
    )
    header = f"{'clip':<16} {'bank':<28} {'MAD':>7} {'after upd':>9} {'other':>7} {'FF pass':>7}"
    print(header + f" {'input MAD':>9}")
    for clip_name, frames in witness_clips(args.frames).items():
        for bank_name, bank in BANKS.items():
            engine = StreamV2V.from_pretrained(args.model, config=config(bank), device="cpu")
            engine.set_prompt(args.prompt)
            f = temporal_figures(engine, frames)

            def show(x: float | None, width: int) -> str:
                return f"{'-':>{width}}" if x is None else f"{x:{width}.4f}"

            print(
                f"{clip_name:<16} {bank_name:<28} {show(f.mad, 7)} {show(f.mad_after_update, 9)} "
                f"{show(f.mad_other, 7)} {show(f.ff_pass_rate, 7)} {show(f.input_mad, 9)}"
            )
    engine = StreamV2V.from_pretrained(args.model, config=config(BANKS["off"]), device="cpu")
    engine.set_prompt(args.prompt)
    entropy = attention_entropy(engine, witness_clips(2)["moving"][0])
    print("self-attention entropy (1.0 = uniform), by layer:")
    for name, value in entropy.items():
        print(f"  {name:<48} {value:.3f}")


if __name__ == "__main__":
    main()
