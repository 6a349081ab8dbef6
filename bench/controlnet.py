"""ControlNet cost per frame, as a ratio to the same engine without one.

    python bench/controlnet.py                       # tiny model and the SD1.5 architecture
    python bench/controlnet.py --arch tiny --size 128 --frames 20

Per architecture: the UNet with random weights and a ControlNet made from it
(``ControlNetModel.from_unet``: an SD1.5-architecture ControlNet for SD1.5), Canny preprocessing,
1 step, bank off (to isolate the ControlNet). Engines with and without the ControlNet share the
weights and run interleaved, frame by frame, in this one run (these machines are noisy); the
ratio is median(with) / median(without). Also: the Canny preprocessing alone. Speed does not
depend on weight values: random weights give honest timings.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import SD15_UNET, median, sd_components, test_frames, timed

from streamv2v import ControlSpec, EngineConfig, StreamV2V
from streamv2v.control import ControlStream
from streamv2v.preprocess import make_preprocessor
from streamv2v.testing import build_tiny_components, save_tiny_model


def parts_for(arch: str, tiny: Path, device, dtype) -> dict:
    if arch == "tiny":
        from transformers import CLIPTokenizer

        parts = build_tiny_components()
        parts["tokenizer"] = CLIPTokenizer.from_pretrained(tiny / "tokenizer")
    else:
        parts = sd_components(tiny, SD15_UNET)
    for m in (parts["unet"], parts["vae"], parts["text_encoder"]):
        m.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return parts


def control_case(
    arch: str, tiny: Path, device, dtype, size: int, frames: int, warmup: int, compiled: bool
) -> dict:
    """Per-frame p50 with and without a Canny ControlNet (interleaved), and their ratio."""
    from diffusers import ControlNetModel

    parts = parts_for(arch, tiny, device, dtype)
    net = ControlNetModel.from_unet(parts["unet"]).to(device=device, dtype=dtype).eval()
    spec = ControlSpec(model="(random)", preprocess="canny")
    cfg = EngineConfig(
        width=size,
        height=size,
        steps=1,
        vae="model",
        bank={"enabled": False},
        compile="on" if compiled else "off",
    )
    control = ControlStream([net], [make_preprocessor(spec, device=device, dtype=dtype)], [spec])
    plain = StreamV2V(**parts, config=cfg)
    cn_cfg = cfg.model_copy(update={"control": (spec,)})
    with_cn = StreamV2V(**parts, config=cn_cfg, control=control)
    clip = test_frames(8, size=min(480, size))
    image = with_cn._to_model_input(clip[0])
    times: dict[str, list[float]] = {"none": [], "canny": [], "preprocess": []}
    for engine in (plain, with_cn):
        engine.set_prompt("a claymation figure")
    with torch.inference_mode():
        for i in range(warmup + frames):
            f = clip[i % len(clip)]
            t_none = timed(lambda f=f: plain(f), device)
            t_cn = timed(lambda f=f: with_cn(f), device)
            t_pre = timed(lambda: control.preprocess(image), device)
            if i >= warmup:
                times["none"].append(t_none * 1000)
                times["canny"].append(t_cn * 1000)
                times["preprocess"].append(t_pre * 1000)
    row = {"arch": arch, "size": size, "compiled": compiled, "frames": frames}
    row.update({f"{k}_p50_ms": median(v) for k, v in times.items()})
    row["ratio"] = row["canny_p50_ms"] / row["none_p50_ms"]
    row["controlnet_params_m"] = sum(p.numel() for p in net.parameters()) / 1e6
    row["unet_params_m"] = sum(p.numel() for p in parts["unet"].parameters()) / 1e6
    return row


def control_cases(args, tiny: Path, device, dtype) -> list[dict]:
    """The ControlNet cases of bench/gpu.py (and of this script's main)."""
    rows = []
    for arch in args.arch:
        size = args.size if arch != "tiny" else min(args.size, 256)
        for compiled in {"off": [False], "on": [True], "both": [False, True]}[args.compiled]:
            rows.append(
                control_case(arch, tiny, device, dtype, size, args.frames, args.warmup, compiled)
            )
            print(f"  controlnet {rows[-1]}", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["tiny", "sd15"], choices=["tiny", "sd15"])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--frames", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compiled", choices=["off", "on", "both"], default="off")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    tiny = save_tiny_model(Path(tempfile.mkdtemp(prefix="streamv2v-cn-bench-")) / "tiny")
    print(f"device={device} dtype={dtype} threads={torch.get_num_threads()}", flush=True)
    rows = control_cases(args, tiny, device, dtype)
    print("| UNet | size | compiled | none p50 ms | canny CN p50 ms | ratio | Canny alone ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['arch']} | {r['size']} | {r['compiled']} | {r['none_p50_ms']:.1f} | "
            f"{r['canny_p50_ms']:.1f} | {r['ratio']:.2f} | {r['preprocess_p50_ms']:.1f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
