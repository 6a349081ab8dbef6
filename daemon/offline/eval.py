"""``streamv2v eval``: the temporal quality and structure of a translation, per feature-bank
variant.

The source clip runs through the offline pipeline that ``translate`` uses (one engine, loaded
once; each variant is a bank setting applied with ``set_config``), or an existing translation
is read. Every output clip is measured against the source (daemon/offline/quality.py) and the
figures are printed as a table and, on request, written as a report (daemon/offline/report.py).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from daemon.dataplane.video import VideoReader
from daemon.errors import UserError
from daemon.extras import require
from daemon.models.engine_config import engine_config
from daemon.offline.pipeline import load_engine, stream_frames
from daemon.offline.quality import (
    ClipEmbedder,
    fit_to,
    frame_mad,
    measure,
    source_edges,
    source_motion,
    warp_errors,
)
from daemon.offline.report import (
    REPORT_SUFFIXES,
    Report,
    VariantReport,
    sample_indices,
    text_table,
    write_report,
)

if TYPE_CHECKING:
    from daemon.styles.presets import Preset
    from streamv2v import EngineConfig, StreamV2V

#: Variant name -> the bank settings it runs with, over the engine's own.
VARIANTS: dict[str, dict[str, Any]] = {
    "off": {"enabled": False},
    "dyme": {"enabled": True, "mode": "dyme"},
    "fifo": {"enabled": True, "mode": "fifo"},
    "stable": {"enabled": True, "mode": "stable"},
}
VARIANT_NOTES = {
    "off": "the feature bank off: every frame on its own",
    "dyme": "the reference's Dynamic Merging: a random split, re-drawn at every bank update",
    "fifo": "a FIFO bank: the newest frame replaces the oldest, no merging",
    "stable": "the stable merge (the default): the oldest frame merges into its matches among "
    "the rest, a fixed split",
}
#: Warm-up frames left out of the means by default: the bank's first update cycle.
DEFAULT_SKIP = 4


@dataclass(frozen=True)
class Style:
    """What the source is translated with: a model, a prompt, and maybe a preset's settings."""

    model: str | None  #: None: the default model (SD1.5 when cached, else the built-in one)
    prompt: str
    negative_prompt: str = ""
    preset: Preset | None = None  #: its settings apply over the engine's defaults
    label: str = ""  #: how the report names it (a preset's name, or the prompt)


def check_report_path(path: Path | None) -> None:
    """Fail before any work when the report cannot be written where it was asked for."""
    if path is None:
        return
    require("eval", "`streamv2v eval --report`")
    if path.suffix.lower() not in REPORT_SUFFIXES:
        raise UserError(
            f"cannot write the report to {path}: use a .html (one self-contained page) or .md "
            "(markdown with PNG files beside it) file name"
        )
    folder = path.parent
    if not folder.is_dir():
        raise UserError(f"report folder does not exist: {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"report folder is not writable (permission denied): {folder}")


def read_frames(path: Path, limit: int | None = None) -> list[np.ndarray]:
    """Every frame of the video at ``path`` (the first ``limit``)."""
    with VideoReader(path) as reader:
        frames = []
        for frame in reader:
            frames.append(frame)
            if limit is not None and len(frames) >= limit:
                break
        return frames


def find_preset(name: str, user_dir: Path) -> Preset:
    """A preset by file path or by name: the user's folder, then the bundled sets."""
    from daemon.styles.presets import PresetError, bundled_presets_dir, load_preset_file

    path = Path(name)
    if path.suffix == ".toml":
        if not path.is_file():
            raise UserError(f"preset file not found: {path}")
        candidates = [path]
    else:
        folders = [user_dir, bundled_presets_dir("default"), bundled_presets_dir("demo")]
        candidates = [f / f"{name}.toml" for f in folders if (f / f"{name}.toml").is_file()]
        if not candidates:
            known = sorted({p.stem for f in folders if f.is_dir() for p in f.glob("*.toml")})
            raise UserError(f"no preset named {name!r}; there are: {', '.join(known)}")
    try:
        preset = load_preset_file(candidates[0])
    except PresetError as err:
        raise UserError(str(err)) from None
    if preset.passthrough:
        raise UserError(f"preset {preset.name!r} is a passthrough (no model): nothing to measure")
    return preset


def style_for(
    output: Path | None,
    model: str | None,
    prompt: str | None,
    negative_prompt: str,
    preset: str | None,
) -> Style | None:
    """The style to translate with, from the command's options (None: ``output`` is measured
    as it is). Exactly one of ``output``, ``prompt`` and ``preset`` is needed."""
    given = [
        name
        for name, v in (("--output", output), ("--prompt", prompt), ("--preset", preset))
        if v is not None
    ]
    if len(given) != 1:
        raise UserError(
            "give one of --prompt or --preset (translate INPUT here and measure it) or --output "
            f"(measure a translation of INPUT){'; got ' + ' and '.join(given) if given else ''}"
        )
    if output is not None:
        return None
    if prompt is not None:
        return Style(model, prompt, negative_prompt)
    from daemon.app import default_presets_dir

    found = find_preset(str(preset), default_presets_dir())
    return Style(model, found.prompt, found.negative_prompt, found, f"preset {found.name}")


def _variant_config(base: EngineConfig, name: str) -> EngineConfig:
    from streamv2v import BankConfig, EngineConfig

    bank = BankConfig.model_validate({**base.bank.model_dump(), **VARIANTS[name]})
    return EngineConfig.model_validate({**base.model_dump(), "bank": bank})


@dataclass
class _Run:
    """One output clip and what the engine said while making it."""

    name: str
    outputs: list[np.ndarray]
    description: str = ""
    fused: list[float] | None = None
    fps: float | None = None
    interval: int | None = None  #: the bank's update interval (None: no bank, or unknown)
    latency_frames: int = 0


def _run_variant(
    engine: StreamV2V, source: Sequence[np.ndarray], name: str, label: str = ""
) -> _Run:
    """The source through the engine with the offline pipeline's frame loop; ``label``: the
    run's name in the report (default ``name``)."""
    from streamv2v import StreamV2VError

    outputs: list[np.ndarray] = []
    fused: list[float] = []

    def keep(out: np.ndarray) -> None:
        outputs.append(out)
        fraction = engine.stats()["fused_fraction"]
        if fraction is not None:
            fused.append(fraction)

    label = label or name
    with tqdm(total=len(source), unit="frame", file=sys.stderr, desc=label) as bar:
        try:
            stats = stream_frames(engine, source, keep, bar.update)
        except StreamV2VError as err:
            raise UserError(str(err)) from None
    bank = engine.config.bank
    return _Run(
        label,
        outputs,
        VARIANT_NOTES[name],
        fused,
        fps=1000.0 / stats.median_ms if stats.median_ms else None,
        interval=bank.interval if bank.enabled else None,
        latency_frames=engine.latency_frames,
    )


def _engine_runs(
    style: Style,
    source: list[np.ndarray],
    variants: Sequence[str],
    settings: dict[str, str],
    *,
    device: str | None = None,
    allow_pickle: bool = False,
    control: str | None = None,
    control_scale: float = 1.0,
    **options: Any,
) -> Iterator[_Run]:
    """One :class:`_Run` per variant, from one engine loaded once; the engine's settings are
    added to ``settings`` once it is loaded. ``control``: a canny ControlNet; each variant
    runs with it, then again at scale 0."""
    from daemon.models.registry import default_model
    from streamv2v import ControlSpec

    model = style.model if style.model is not None else default_model()
    start = None
    if control is not None:
        spec = ControlSpec(model=control, preprocess="canny", scale=control_scale)
        start = engine_config(model, control=(spec,))
    preset = style.preset.engine_config(start or engine_config(model)) if style.preset else None
    base = engine_config(model, preset or start, **options)
    first = _variant_config(base, variants[0])
    engine = load_engine(model, first, device=device, allow_pickle=allow_pickle)
    settings["model"] = model
    engine.set_prompt(style.prompt, style.negative_prompt)
    cfg = engine.config
    mode = "stream batch" if cfg.stream_batch else "sequential"
    settings |= {
        "size": f"{cfg.width}x{cfg.height}",
        "steps": f"{cfg.steps} ({mode})",
        "strength": f"{cfg.strength:g}",
        "bank interval": str(cfg.bank.interval),
        "device": f"{engine.device} {str(engine.dtype).removeprefix('torch.')}",
    }
    if control is not None:
        scales = ", ".join(f"{c.scale:g}" for c in cfg.control)
        settings["control"] = f"{control} (canny) at {scales}, and off"
    for name in variants:
        engine.set_config(_variant_config(base, name))
        if control is None:
            yield _run_variant(engine, source, name)
            continue
        yield _run_variant(engine, source, name)
        engine.set_control_scales([0.0] * len(cfg.control))  # a tensor write: same engine
        yield _run_variant(engine, source, name, f"{name}, no control")


class Evaluation:
    """Measures output clips one at a time against one source; keeps only the figures and the
    strip frames of each, so memory does not grow with the number of variants."""

    def __init__(self, source: list[np.ndarray], skip: int, clip_model: str | None) -> None:
        self.source = source
        self.skip = skip
        self.variants: list[VariantReport] = []
        self.notes: list[str] = []
        self._motion = None
        self._edges = None
        self.indices = sample_indices(len(source), start=skip)
        self.source_strip: list[np.ndarray] = []
        self.source_mad = np.zeros(0)
        embedder = ClipEmbedder.load(clip_model)
        self._clip = None if isinstance(embedder, str) else embedder
        if isinstance(embedder, str):
            self.notes.append(f"CLIP consistency {embedder}.")

    def add(self, run: _Run) -> None:
        if len(run.outputs) != len(self.source):
            raise UserError(
                f"{run.name} has {len(run.outputs)} frames for the {len(self.source)} of the "
                "source: eval compares them frame by frame (a translation has one per input)"
            )
        h, w = run.outputs[0].shape[:2]
        if self._motion is None or self._motion.size != (w, h):
            fitted = [fit_to(f, w, h) for f in self.source]
            self._motion = source_motion(fitted)
            self._edges = source_edges(fitted)
            self.source_strip = [fitted[i] for i in self.indices]
            self.source_mad = frame_mad(fitted)
            floor = warp_errors(fitted, self._motion)[self.skip :]
            self.notes.append(
                f"For scale, the source itself: MAD {self.source_mad[self.skip :].mean():.4f}, "
                f"warp error {np.nanmean(floor):.4f} (noise, and flow errors, count there)."
            )
        quality = measure(
            run.outputs,
            self._motion,
            edges=self._edges,
            interval=run.interval,
            latency_frames=run.latency_frames,
            skip=self.skip,
        )
        clip = self._clip.consistency(run.outputs[self.skip :]) if self._clip else None
        fused = run.fused[self.skip :] if run.fused else []
        self.variants.append(
            VariantReport(
                name=run.name,
                quality=quality,
                strip=[run.outputs[i] for i in self.indices],
                description=run.description,
                fps=run.fps,
                ff_pass_rate=float(np.mean(fused)) if fused else None,
                clip=clip,
            )
        )

    def report(self, title: str, settings: dict[str, str]) -> Report:
        return Report(
            title,
            self.source_mad,
            self.indices,
            self.source_strip,
            self.variants,
            settings,
            self.notes,
            self.skip,
        )


def evaluate(
    source_path: Path,
    *,
    style: Style | None = None,
    output: Path | None = None,
    variants: Sequence[str] = tuple(VARIANTS),
    report_path: Path | None = None,
    frames: int | None = None,
    skip: int = DEFAULT_SKIP,
    clip_model: str | None = None,
    control: str | None = None,
    control_scale: float = 1.0,
    **options: Any,
) -> tuple[Report, list[str]]:
    """Measure the translations of ``source_path``: ``output`` (an existing translation, one
    frame per source frame) or, with ``style``, every variant in ``variants``, run here.
    ``options`` go to the engine (``device``, ``allow_pickle`` and :func:`engine_config`'s).
    Returns the report and the lines to print (the table, notes, where the report went)."""
    check_report_path(report_path)
    if (output is None) == (style is None):
        raise UserError("give either --output (a translation to measure) or a style to run")
    if control is not None and output is not None:
        raise UserError(
            "--control runs the engine with and without the ControlNet: give --prompt or "
            "--preset, not --output"
        )
    source = read_frames(source_path, frames)
    if len(source) < skip + 2:
        raise UserError(
            f"{source_path} has {len(source)} frame(s): eval needs at least {skip + 2} "
            f"(--skip {skip} warm-up frames, then two to compare)"
        )
    evaluation = Evaluation(source, skip, clip_model)
    settings = {"source": source_path.name, "frames": str(len(source))}
    runs: Iterable[_Run]
    if output is not None:
        clip = read_frames(output, len(source))
        runs = [_Run(output.name, clip, f"read from {output}")]
        evaluation.notes.append("The split at bank updates needs the engine: not shown for a file.")
    else:
        assert style is not None
        settings["style"] = style.label or repr(style.prompt)
        runs = _engine_runs(
            style,
            source,
            variants,
            settings,
            control=control,
            control_scale=control_scale,
            **options,
        )
    for run in runs:
        evaluation.add(run)
    report = evaluation.report(f"Temporal quality of {source_path.name}", settings)
    lines = [", ".join(f"{k}: {v}" for k, v in settings.items()), text_table(report)]
    lines += evaluation.notes
    if report_path is not None:
        written = write_report(report, report_path)
        lines.append(f"wrote the report to {written[0]}")
    return report, lines
