"""The SDXL family's cost: the SDXL UNet architecture (random weights: speed does not depend on
weight values) with TAESDXL's architecture, 1 step, bank off/on, eager (and compiled on CUDA).

    python bench/sdxl.py                       # CPU: 512, eager, bank off/on (fp32: ~11 GB,
                                               # the UNet's 2.6 G parameters)
    python bench/sdxl.py --sizes 512 768 1024 --device cuda --compiled   # what bench/gpu.py runs

Prints per case the per-frame p50 ms and the bank-on / bank-off ratio; writes JSON with --json.
The text encoders are one-layer stand-ins of SDXL's widths (768 and 1280, the second projecting
to 1280): they never run per frame.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from streamv2v import BankConfig, EngineConfig, StreamV2V

#: SDXL base's UNet (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json).
SDXL_UNET = {
    "sample_size": 128,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
    "cross_attention_dim": 2048,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 * 256 + 1280
}


def sdxl_components(tokenizer_folder: Path, dtype: torch.dtype, device) -> dict:
    """SDXL's UNet and TAESDXL's architecture (random), one-layer text encoder stand-ins."""
    from diffusers import AutoencoderTiny, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    from streamv2v.testing import tiny_lcm_scheduler

    tok = CLIPTokenizer.from_pretrained(tokenizer_folder)

    def text(width: int, cls):
        cfg = CLIPTextConfig(
            vocab_size=tok.vocab_size,
            hidden_size=width,
            intermediate_size=width,
            num_hidden_layers=2,  # (SDXL reads the penultimate layer)
            num_attention_heads=width // 64,
            max_position_embeddings=77,
            projection_dim=1280,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        return cls(cfg)

    with torch.device("meta"):  # no 10 GB of random init: shapes first, then empty storage
        unet = UNet2DConditionModel(**SDXL_UNET)
    unet = unet.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0.0, 0.02)
    parts = {
        "unet": unet,
        "vae": AutoencoderTiny(),  # TAESDXL has TAESD's architecture
        "text_encoder": text(768, CLIPTextModel),
        "text_encoder_2": text(1280, CLIPTextModelWithProjection),
        "tokenizer": tok,
        "tokenizer_2": tok,
        "scheduler": tiny_lcm_scheduler(),
    }
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        parts[name].to(device=device, dtype=dtype).eval().requires_grad_(False)
    return parts


def frames(n: int, size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    return [np.roll(base, 4 * i, axis=1) for i in range(n)]


def time_case(engine: StreamV2V, n: int, warmup: int) -> float:
    """Median ms per frame (device work included)."""
    clip = frames(n + warmup, engine.config.width)
    ms = []
    for i, f in enumerate(clip):
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine(f)
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            ms.append((time.perf_counter() - t0) * 1000)
    return float(np.median(ms))


def sdxl_cases(
    sizes, device, dtype, *, compiled=(False,), frames_n: int = 3, warmup: int = 1, log=print
) -> list[dict]:
    """Per size and compile setting: bank off and on, 1 step, p50 ms and the on/off ratio."""
    from streamv2v.testing import write_tiny_tokenizer

    folder = Path(tempfile.mkdtemp(prefix="streamv2v-sdxl-bench-")) / "tokenizer"
    write_tiny_tokenizer(folder)
    parts = sdxl_components(folder, dtype, device)
    rows = []
    for size in sizes:
        for comp in compiled:
            row = {"arch": "sdxl", "size": size, "steps": 1, "compiled": comp}
            for bank in ("off", "on"):
                cfg = EngineConfig(
                    width=size,
                    height=size,
                    steps=1,
                    strength=0.5,
                    compile="on" if comp else "off",
                    bank=BankConfig(enabled=bank == "on"),
                )
                try:
                    engine = StreamV2V(**parts, config=cfg)
                    engine.set_prompt("a claymation figure")
                    with torch.inference_mode():
                        row[f"bank_{bank}_ms"] = time_case(engine, frames_n, warmup)
                except Exception as err:  # a failed case is a row, not a lost run
                    row[f"bank_{bank}_error"] = f"{type(err).__name__}: {err}"[:300]
                del engine
            if "bank_on_ms" in row and "bank_off_ms" in row:
                row["ratio_on_off"] = row["bank_on_ms"] / row["bank_off_ms"]
            log(f"  sdxl {row}")
            rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=[512])
    p.add_argument("--compiled", action="store_true", help="also the compiled cases")
    p.add_argument("--frames", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    print(f"bench/sdxl.py device={device} dtype={dtype} threads={torch.get_num_threads()}")
    rows = sdxl_cases(
        args.sizes,
        device,
        dtype,
        compiled=(False, True) if args.compiled else (False,),
        frames_n=args.frames,
        warmup=args.warmup,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
