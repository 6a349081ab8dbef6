"""Cost of the feature bank: bank off / EA only / EA+FF / EA+FF+DyMe / EA+FF+stable, in one run.

    python bench/feature_bank.py --model tiny --size 512
    python bench/feature_bank.py --model sd15 --size 512 --cycles 1 --warmup 1

For each variant: the median per-frame time of the UNet work (the UNet call(s) plus the bank's
update, i.e. what the bank changes), the same amortized over whole update cycles (every
``interval``-th frame also merges; the median over cycles of each cycle's mean), the merge
frames alone, the whole engine(frame) median, the
ratio to bank-off (same run, variants interleaved round by round), and the bank's memory: the
banked tokens alone, and the whole buffer (banked tokens plus the current frame's K/V/O tail,
which replaces the per-call concatenation a straightforward implementation allocates).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_model_args, build_engine, median, synchronize, test_frames

from streamv2v import BankConfig

VARIANTS = {
    "bank off": BankConfig(enabled=False),
    "EA only": BankConfig(feature_fusion=False, mode="fifo"),
    "EA+FF": BankConfig(mode="fifo"),
    "EA+FF+DyMe": BankConfig(mode="dyme"),  # the reference's settings
    "EA+FF+stable": BankConfig(mode="stable"),  # the default
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_model_args(p)
    p.add_argument(
        "--cycles", type=int, default=3, help="timed update cycles per variant per round"
    )
    p.add_argument("--rounds", type=int, default=2, help="rounds over all variants (interleaved)")
    p.add_argument("--only", nargs="*", choices=list(VARIANTS), default=list(VARIANTS))
    args = p.parse_args()
    engine = build_engine(args)
    dev = engine.device
    interval = BankConfig().interval

    # Time the UNet part of each frame: the engine's denoise step plus the bank's end of frame.
    core: list[float] = []

    def timing(fn):
        def wrapped(*a, **kw):
            synchronize(dev)
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            synchronize(dev)
            core[-1] += time.perf_counter() - t0
            return out

        return wrapped

    denoise_frame = timing(engine._denoise_frame)
    engine._denoise_frame = denoise_frame

    per_frame = defaultdict(list)  # variant -> [(core_s, whole_s, frame_index, round)]
    memory = {}
    n_frames = args.warmup + args.cycles * interval
    frames = test_frames(n_frames)
    wrapped: set[int] = set()
    with torch.inference_mode():
        for rnd in range(args.rounds):
            for name in args.only:
                engine.set_config(engine.config.model_copy(update={"bank": VARIANTS[name]}))
                # (the engine keeps each configuration's bank: wrap each bank once)
                if engine.bank is not None and id(engine.bank) not in wrapped:
                    engine.bank.end_frame = timing(engine.bank.end_frame)
                    wrapped.add(id(engine.bank))
                for i, f in enumerate(frames):
                    core.append(0.0)
                    synchronize(dev)
                    t0 = time.perf_counter()
                    engine(f)
                    synchronize(dev)
                    whole = time.perf_counter() - t0
                    if i >= args.warmup:
                        per_frame[name].append((core[-1], whole, i, rnd))
                bank = engine.bank
                memory[name] = (
                    (
                        bank.nbytes,
                        bank.nbytes * bank.config.max_frames // (bank.config.max_frames + 1),
                    )
                    if bank is not None
                    else (0, 0)
                )

    cfg = engine.config
    print(
        f"model={args.model} size={cfg.width}x{cfg.height} steps={cfg.steps} "
        f"stream_batch={cfg.stream_batch} device={dev} dtype={engine.dtype} "
        f"threads={torch.get_num_threads()} interval={interval} "
        f"timed frames/variant={len(per_frame[args.only[0]])}"
    )
    base = per_frame.get("bank off")
    base_med = median([c for c, *_ in base]) if base else None
    base_amort = amortized(base, interval) if base else None
    print(
        f"{'variant':<12} {'UNet p50 ms':>11} {'amortized':>10} {'merge fr.':>10} "
        f"{'frame p50':>10} {'ratio p50':>9} {'ratio amort':>11} {'banked MB':>9} {'buffer MB':>9}"
    )
    for name in args.only:
        rows = per_frame[name]
        med = median([c for c, *_ in rows])
        amort = amortized(rows, interval)
        merges = [c for c, _, i, _ in rows if i > 0 and i % interval == 0]
        whole = median([w for _, w, *_ in rows])
        r_med = f"{med / base_med:9.3f}" if base_med else f"{'-':>9}"
        r_am = f"{amort / base_amort:11.3f}" if base_amort else f"{'-':>11}"
        print(
            f"{name:<12} {med * 1e3:11.1f} {amort * 1e3:10.1f} "
            f"{median(merges) * 1e3 if merges else float('nan'):10.1f} {whole * 1e3:10.1f} "
            f"{r_med} {r_am} {memory[name][1] / 2**20:9.1f} {memory[name][0] / 2**20:9.1f}"
        )


def amortized(rows: list[tuple[float, float, int, int]], interval: int) -> float:
    """Per-frame cost over whole update cycles (``interval`` consecutive frames hold exactly one
    merge frame): the median over cycles of the cycle's mean, robust to a stray slow frame."""
    cycles = defaultdict(list)
    first = min(i for _, _, i, _ in rows)
    for core_s, _, i, rnd in rows:
        cycles[(rnd, (i - first) // interval)].append(core_s)
    means = [sum(v) / len(v) for v in cycles.values() if len(v) == interval]
    return median(means)


if __name__ == "__main__":
    main()
