"""The ``streamv2v`` command line: one parser, each subcommand a plain function in a registry.

A subcommand is registered with :func:`command` (its name, one-line help, and a function that adds
its arguments); :func:`main` parses, dispatches, and turns every expected failure into one line,
``streamv2v: error: ...`` on stderr, with exit code 2 and no traceback.

The engine (and with it torch) is imported only once a command needs it, after the cheap checks
on files and values, so ``--help`` and mistyped paths answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import ValidationError
from tqdm import tqdm

from daemon.video import (
    VideoError,
    VideoReader,
    VideoWriter,
    check_output_path,
    moving_test_pattern,
)

if TYPE_CHECKING:
    from streamv2v import EngineConfig, StreamV2V

PROG = "streamv2v"
EXIT_OK = 0
EXIT_DOCTOR_FAILED = 1  # a check FAILed
EXIT_ERROR = 2
EXIT_NOT_INSTALLED = 3  # `service status`: nothing installed (as systemctl's "inactive")
EXIT_INTERRUPTED = 130

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
#: SD1.5 needs the LCM-LoRA to make images in a few steps; other models bring their own.
DEFAULT_MODEL_LORA = "latent-consistency/lcm-lora-sdv1-5"
#: The special model name for the embedded random-weight model (works offline, makes noise).
TINY_MODEL = "tiny"
#: The tiny model TRAINED on synthetic scenes in four styles, shipped with the package: the
#: embedded default where no real model is at hand (see streamv2v/tiny_styles.py).
TINY_STYLES = "tiny-styles"
BUILTIN_MODELS = (TINY_MODEL, TINY_STYLES)

DEMO_SIZE = 256
DEMO_FPS = 15.0
DEMO_STEPS = 2
#: The prompts the built-in style model knows (streamv2v.scenes.STYLES).
STYLE_PROMPTS = ("a plain scene", "a warm scene", "a cool striped scene", "an outline drawing")


class CliError(Exception):
    """An expected failure; its message is printed as one line and the CLI exits with 2."""


# --- command registry -------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One subcommand: how to parse its arguments and the function that runs it."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def command(
    name: str, description: str, add_arguments: Callable[[argparse.ArgumentParser], None]
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Register the decorated function as the subcommand ``name``."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        if name in COMMANDS:
            raise ValueError(f"subcommand {name!r} is registered twice")
        COMMANDS[name] = Command(name, description, add_arguments, run)
        return run

    return register


class _PrintVersion(argparse.Action):
    """``--version``; imports the engine package (and torch) only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.update(nargs=0, default=argparse.SUPPRESS)
        super().__init__(option_strings, dest, help="Show the version and exit.", **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        from streamv2v import __version__

        print(f"{PROG} {__version__}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per registered command."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Real-time video restyling with diffusion (StreamV2V)."
    )
    parser.add_argument("--version", action=_PrintVersion)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        sub = subparsers.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default: ``sys.argv[1:]``) and return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        # argparse exits on --help/--version and usage errors; callers of main() want a code.
        return exit_.code if isinstance(exit_.code, int) else EXIT_ERROR
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    set_runtime_defaults()
    # A command may end the process itself only when it is the process (called with no argv).
    args.owns_process = argv is None
    try:
        return COMMANDS[args.command].run(args)
    except (CliError, VideoError) as err:
        return fail(str(err))
    except ValidationError as err:
        return fail(describe_validation_error(err))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def set_runtime_defaults() -> None:
    """Environment defaults for the libraries under the engine; the user's own settings win.

    They take effect only when set before the engine (torch, diffusers, transformers,
    huggingface_hub) is first imported, which is why commands import it lazily.
    """
    # OpenMP threads that spin while they wait collapse when the cores are shared (with our own
    # capture/output threads or another process): on 2 shared cores a ~100 ms tiny-model frame
    # took 4 s with spinning, ~0.1-0.25 s with passive waiting. On idle cores passive waiting
    # costs ~10% at 512x512 (more for tiny models); OMP_WAIT_POLICY=ACTIVE takes that back.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Keep the terminal for our own lines; e.g. DIFFUSERS_VERBOSITY=info brings theirs back.
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def fail(message: str) -> int:
    """Print one error line on stderr and return the error exit code."""
    one_line = " ".join(message.split())
    print(f"{PROG}: error: {one_line}", file=sys.stderr)
    return EXIT_ERROR


#: Engine config fields -> the option that sets them, so an error tells the user what to change.
_OPTION_FOR_FIELD = {
    "width": "--size",
    "height": "--size",
    "steps": "--steps",
    "strength": "--strength",
    "seed": "--seed",
    "vae": "--vae",
    "stream_batch": "--no-stream-batch",
}


def describe_validation_error(err: ValidationError) -> str:
    """One line naming the first invalid setting, its value and what is wrong with it."""
    errors = err.errors()
    first = errors[0]
    reason = first["msg"].removeprefix("Value error, ")
    location = ".".join(str(part) for part in first["loc"])
    if location:
        option = _OPTION_FOR_FIELD.get(location)
        where = f"{location}={first.get('input')!r}" + (f" ({option})" if option else "")
        message = f"invalid {where}: {reason}"
    else:
        # A check across several fields: pydantic gives no location, the reason names them.
        message = f"invalid settings: {reason}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    return message


# --- shared option parsing --------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
    """``'512x512'`` -> ``(512, 512)`` (width, height)."""
    width, sep, height = text.lower().partition("x")
    if not sep or not width.strip().isdigit() or not height.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 512x512, got {text!r}")
    return int(width), int(height)


def parse_positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# --- model and engine -------------------------------------------------------------------------


def tiny_model_dir() -> Path:
    """The embedded tiny model's folder in the user cache, built on first use."""
    from platformdirs import user_cache_dir

    from streamv2v import testing

    folder = Path(user_cache_dir(PROG)) / "tiny-model"
    stamp = folder / ".streamv2v-build"
    # The stamp is written last and names the code that built the model, so a cached model is
    # used only if complete and made by the current builder (its layout may change between
    # versions).
    builder = hashlib.sha256(Path(testing.__file__).read_bytes()).hexdigest()[:16]
    if stamp.is_file() and stamp.read_text().strip() == builder:
        return folder
    print(f"{PROG}: building the tiny model in {folder} (once)", file=sys.stderr)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        # Build beside the final place and move it in, so an interrupted build never leaves a
        # half-written folder that later runs would trust.
        with tempfile.TemporaryDirectory(dir=folder.parent, prefix="tiny-model-build-") as tmp:
            built = testing.save_tiny_model(Path(tmp) / "model")
            (built / stamp.name).write_text(builder)
            shutil.rmtree(folder, ignore_errors=True)
            with contextlib.suppress(OSError):  # a concurrent build may have moved in first
                os.replace(built, folder)
    except OSError as err:
        raise CliError(f"cannot build the tiny model in {folder}: {err}") from None
    if not stamp.is_file():
        raise CliError(f"cannot build the tiny model in {folder}: it was not moved into place")
    return folder


def tiny_styles_dir() -> Path:
    """The trained tiny style model shipped inside the package."""
    from importlib import resources

    return Path(str(resources.files("streamv2v"))) / "models" / "tiny-styles"


def tiny_styles_available() -> bool:
    return (tiny_styles_dir() / "model_index.json").is_file()


def model_location(model: str) -> str:
    """What to hand to from_pretrained for ``model``; builds the tiny model when asked for."""
    if model == TINY_STYLES:
        if not tiny_styles_available():
            raise CliError(
                f"the built-in style model is missing from this installation ({tiny_styles_dir()}):"
                " reinstall streamv2v, or train one with `python -m streamv2v.tiny_styles --out "
                "DIR` and pass that folder as the model"
            )
        return str(tiny_styles_dir())
    if model != TINY_MODEL:
        return model
    from streamv2v.testing import TINY_MODEL_NOTE

    print(f"{PROG}: note: {TINY_MODEL_NOTE}", file=sys.stderr)
    return str(tiny_model_dir())


def engine_config(
    *,
    model: str,
    size: tuple[int, int] | None = None,
    steps: int | None = None,
    strength: float | None = None,
    seed: int | None = None,
    stream_batch: bool = True,
    vae: str | None = None,
) -> EngineConfig:
    """An EngineConfig from the options given; whatever is not given keeps the engine default."""
    from streamv2v import EngineConfig, LoraSpec

    fields: dict[str, Any] = {"stream_batch": stream_batch}
    if size is None and model == TINY_STYLES:
        size = (128, 128)  # the size it was trained at
    if size is not None:
        fields["width"], fields["height"] = size
    optional = {"steps": steps, "strength": strength, "seed": seed}
    fields.update({name: value for name, value in optional.items() if value is not None})
    if vae is None and model in BUILTIN_MODELS:
        vae = "model"  # the tiny models' own small VAE; a real one would not match their latents
    if vae is not None:
        fields["vae"] = vae
    if model == DEFAULT_MODEL:
        fields["loras"] = (LoraSpec(id=DEFAULT_MODEL_LORA, scale=1.0),)
    return EngineConfig(**fields)


def load_engine(
    model: str, config: EngineConfig, *, device: str | None = None, allow_pickle: bool = False
) -> StreamV2V:
    """Load the engine for ``model`` (a hub id, a folder or ``tiny``), with one-line errors."""
    from streamv2v import ModelLoadError, StreamV2V, UnsafeWeightsError

    location = model_location(model)
    # Loading can take a while (a first download, or the hub's retries when offline): say so.
    print(f"{PROG}: loading model {model}", file=sys.stderr, flush=True)
    try:
        engine = StreamV2V.from_pretrained(
            location, config=config, device=device, allow_pickle=allow_pickle
        )
    except UnsafeWeightsError as err:
        raise CliError(f"{err} (pass --allow-pickle to load them anyway)") from None
    except ModelLoadError as err:
        raise CliError(str(err)) from None
    return engine


# --- the frame loop ---------------------------------------------------------------------------


@dataclass
class StreamStats:
    """What one pass of frames through the engine did and how long each call took."""

    frames_in: int = 0
    frames_out: int = 0
    call_seconds: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.call_seconds) * 1000 if self.call_seconds else 0.0


def stream_frames(
    engine: StreamV2V,
    frames: Iterable[np.ndarray],
    write: Callable[[np.ndarray], None],
    progress: Callable[[int], object] | None = None,
) -> StreamStats:
    """Feed every frame to the engine and ``write`` every output, one output per input frame."""
    stats = StreamStats()

    def step(frame: np.ndarray) -> None:
        start = time.perf_counter()
        out = engine(frame)
        stats.call_seconds.append(time.perf_counter() - start)
        if out is not None:  # None while the stream batch is still filling
            write(out)
            stats.frames_out += 1

    last = None
    for frame in frames:
        step(frame)
        stats.frames_in += 1
        last = frame
        if progress is not None:
            progress(1)
    # In stream-batch mode an input's output appears latency_frames calls later; feeding the last
    # frame that many more times flushes the batch, so the output has one frame per input frame.
    if last is not None:
        for _ in range(engine.latency_frames):
            step(last)
    return stats


def run_engine_on(
    engine: StreamV2V,
    frames: Iterable[np.ndarray],
    output: Path,
    fps: float,
    total: int | None,
) -> StreamStats:
    """Write the engine's output for ``frames`` to ``output`` with a progress bar on stderr."""
    from streamv2v import StreamV2VError

    size = (engine.config.width, engine.config.height)
    with (
        VideoWriter(output, fps, size) as writer,
        tqdm(total=total or None, unit="frame", file=sys.stderr, desc=output.name) as bar,
    ):
        try:
            stats = stream_frames(engine, frames, writer.write, bar.update)
        except StreamV2VError as err:
            raise CliError(str(err)) from None
    if stats.frames_out != stats.frames_in:
        print(
            f"{PROG}: warning: the engine returned {stats.frames_out} frames for "
            f"{stats.frames_in} input frames",
            file=sys.stderr,
        )
    return stats


# --- translate --------------------------------------------------------------------------------


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that choose the model and tune the engine (shared by commands that run one)."""
    parser.add_argument("--prompt", required=True, help="What the video should look like.")
    parser.add_argument("--negative-prompt", default="", help="What it should not look like.")
    parser.add_argument(
        "--model",
        default=None,
        help=f"Hub id or local folder of an SD-family model; '{TINY_STYLES}' for the built-in "
        f"tiny style model (prompts: {', '.join(repr(p) for p in STYLE_PROMPTS)}), '{TINY_MODEL}' "
        f"for the random-weight one (default: {DEFAULT_MODEL} with the LCM-LoRA when it is in "
        f"the local cache, else {TINY_STYLES}).",
    )
    parser.add_argument("--steps", type=int, help="Denoising steps per frame (engine default: 4).")
    parser.add_argument("--strength", type=float, help="How much to change each frame (0-1].")
    parser.add_argument(
        "--size", type=parse_size, metavar="WxH", help="Working size (engine default: 512x512)."
    )
    parser.add_argument("--seed", type=int, help="Seed of the fixed noise.")
    parser.add_argument(
        "--no-stream-batch",
        dest="stream_batch",
        action="store_false",
        help="Denoise each frame fully before the next (no output lag, slower).",
    )
    parser.add_argument(
        "--vae", help="Hub id or folder of the VAE, or 'model' for the model's own VAE."
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="Allow loading pickle (.bin/.ckpt) weights; only for models you trust.",
    )
    parser.add_argument("--device", help="Torch device such as cpu or cuda (default: best found).")


def add_translate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="Video file to restyle.")
    parser.add_argument("output", type=Path, help="Video file to write (.mp4 or .avi).")
    add_engine_arguments(parser)


def default_model() -> str:
    """SD1.5 when its weights are in the local cache; else the built-in style model (the
    embedded default: it works offline on any machine), said on stderr."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(DEFAULT_MODEL, "model_index.json"), str):
        return DEFAULT_MODEL
    print(
        f"{PROG}: note: {DEFAULT_MODEL} is not in the local cache: using the built-in tiny "
        f"style model ({TINY_STYLES}; it knows only synthetic shapes and 4 styles). Pass --model "
        "to choose another.",
        file=sys.stderr,
    )
    return TINY_STYLES


@command("translate", "Restyle a video file into a new video file.", add_translate_arguments)
def translate(args: argparse.Namespace) -> int:
    if args.model is None:
        args.model = default_model()
    with VideoReader(args.input) as reader:
        check_output_path(args.output)
        if args.output.resolve() == reader.path.resolve():
            raise CliError(f"output would overwrite the input video: {args.output}")
        config = engine_config(
            model=args.model,
            size=args.size,
            steps=args.steps,
            strength=args.strength,
            seed=args.seed,
            stream_batch=args.stream_batch,
            vae=args.vae,
        )
        engine = load_engine(args.model, config, device=args.device, allow_pickle=args.allow_pickle)
        engine.set_prompt(args.prompt, args.negative_prompt)
        stats = run_engine_on(engine, reader, args.output, reader.fps, reader.frame_count)
    print(summary(args.output, stats, engine, reader.fps))
    return EXIT_OK


def summary(output: Path, stats: StreamStats, engine: StreamV2V, fps: float) -> str:
    cfg = engine.config
    mode = "stream batch" if cfg.stream_batch else "no stream batch"
    return (
        f"wrote {output}: {stats.frames_out} frames, {cfg.width}x{cfg.height} at {fps:g} fps; "
        f"median {stats.median_ms:.1f} ms per engine call (steps {cfg.steps}, {mode})"
    )


# --- demo -------------------------------------------------------------------------------------


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--frames",
        type=parse_positive_int,
        default=int(4 * DEMO_FPS),
        help=f"Frames of the generated camera to restyle (default: 4 s at {DEMO_FPS:g} fps).",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("streamv2v-demo.mp4"),
        help="Video file to write (default: ./streamv2v-demo.mp4).",
    )


@command(
    "demo",
    "Run the whole pipeline offline: a generated camera through the built-in model into a video.",
    add_demo_arguments,
)
def demo(args: argparse.Namespace) -> int:
    check_output_path(args.output)
    if tiny_styles_available():
        return styles_demo(args)
    # Without the trained style model (a source tree where it was not built), the random one.
    print(
        f"{PROG} demo: no camera, virtual camera or downloaded model is needed; it uses\n"
        f"  camera         -> a generated moving test pattern "
        f"({args.frames} frames, {DEMO_SIZE}x{DEMO_SIZE} at {DEMO_FPS:g} fps)\n"
        f"  model          -> the embedded tiny random-weight model (noise-like images)\n"
        f"  virtual camera -> the video file {args.output}",
        flush=True,
    )
    config = engine_config(model=TINY_MODEL, size=(DEMO_SIZE, DEMO_SIZE), steps=DEMO_STEPS)
    engine = load_engine(TINY_MODEL, config)
    engine.set_prompt("an oil painting of colorful shapes")
    frames = moving_test_pattern(args.frames, DEMO_SIZE, DEMO_SIZE)
    stats = run_engine_on(engine, frames, args.output, DEMO_FPS, args.frames)
    print(summary(args.output, stats, engine, DEMO_FPS))
    return EXIT_OK


def styles_demo(args: argparse.Namespace) -> int:
    """A moving scene restyled by the built-in style model, switching style every quarter."""
    import numpy as np

    from streamv2v.scenes import SIZE, moving_scene, random_scene, render

    print(
        f"{PROG} demo: no camera, virtual camera or downloaded model is needed; it uses\n"
        f"  camera         -> a generated moving scene ({args.frames} frames at {DEMO_FPS:g} fps)\n"
        f"  model          -> the built-in tiny style model; the style changes every quarter:\n"
        f"                    {', '.join(STYLE_PROMPTS[1:])}, then back to plain\n"
        f"  virtual camera -> the video file {args.output}",
        flush=True,
    )
    config = engine_config(model=TINY_STYLES, size=(SIZE, SIZE), steps=1, strength=0.3)
    engine = load_engine(TINY_STYLES, config)
    prompts = [*STYLE_PROMPTS[1:], STYLE_PROMPTS[0]]
    embeds = [(engine.encode_prompt(p), engine.encode_prompt("")) for p in prompts]
    scene = random_scene(np.random.default_rng(7))

    def frames():
        for i in range(args.frames):
            quarter = min(3, 4 * i // args.frames)
            if i == 0 or quarter != min(3, 4 * (i - 1) // args.frames):
                engine.set_prompt_embeds(*embeds[quarter])  # pre-encoded: no encoder call
            yield render(moving_scene(scene, i / DEMO_FPS), "plain", SIZE)

    stats = run_engine_on(engine, frames(), args.output, DEMO_FPS, args.frames)
    print(summary(args.output, stats, engine, DEMO_FPS))
    return EXIT_OK


# --- the daemon -------------------------------------------------------------------------------


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML configuration file (default: config.toml in the user config dir, if present).",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Override one setting, e.g. --set camera.source=1 --set engine.settings.steps=2.",
    )


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    parser.add_argument(
        "--demo",
        action="store_true",
        help="Embedded default: a generated test pattern as the camera and the tiny local model.",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help="Stop after this many seconds (default: run until SIGINT/SIGTERM).",
    )
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def read_config(args: argparse.Namespace):
    """The effective configuration: file, then --set overrides; errors name the key (exit 2)."""
    from daemon.config import ConfigError, load_config, parse_override

    overrides: dict[str, Any] = {}
    try:
        for text in args.overrides:
            merge_dicts(overrides, parse_override(text))
        if getattr(args, "demo", False):
            merge_dicts(overrides, {"demo": True})
        if getattr(args, "log_level", None):
            merge_dicts(overrides, {"log": {"level": args.log_level}})
        return load_config(args.config, overrides)
    except ConfigError as err:
        raise CliError(str(err)) from None


def merge_dicts(into: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge_dicts(into[key], value)
        else:
            into[key] = value


@command(
    "run",
    "Run the daemon in the foreground: camera -> engine -> virtual camera.",
    add_run_arguments,
)
def run(args: argparse.Namespace) -> int:
    import signal
    import threading

    from daemon.app import apply_demo
    from daemon.logs import setup_logging

    config = read_config(args)
    notes: list[str] = []
    if config.demo:
        config, notes = apply_demo(config)
    log_file = setup_logging(config.log.level, config.log.file)
    logger = logging.getLogger("streamv2v")
    for note in notes:
        logger.warning("%s", note)
    logger.info("log file: %s", log_file or "(none)")

    stop = threading.Event()
    reload_requested = threading.Event()

    def on_stop(signum: int, _frame: Any) -> None:
        logger.info("signal %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGTERM, on_stop)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda *_: reload_requested.set())

    daemon = start_daemon(config)
    deadline = None if args.duration is None else time.monotonic() + args.duration
    try:
        while not stop.is_set():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            stop.wait(0.2 if remaining is None else min(0.2, remaining))
            if reload_requested.is_set():
                reload_requested.clear()
                daemon = reload_daemon(daemon, args, logger)
    finally:
        daemon.stop()
        logger.info("stopped: %s", daemon.status())
    if args.owns_process:
        exit_now_if_threads_linger()
    return EXIT_OK


def start_daemon(config: Any) -> Any:
    """A started Daemon; a startup preset that does not exist is a configuration error."""
    from daemon.app import Daemon
    from daemon.presets import UnknownPreset

    try:
        daemon = Daemon(config)
    except UnknownPreset as err:
        raise CliError(f"presets.startup = {config.presets.startup!r}: {err}") from None
    daemon.start()
    return daemon


def exit_now_if_threads_linger() -> None:
    """End the process at once when a worker is still inside native code (a model load, a long
    engine call): letting the interpreter finalise under a running torch thread can abort it.
    Everything that needed closing (camera, virtual camera, preview, log) is closed by now."""
    import threading

    if any(t.is_alive() for t in threading.enumerate() if t is not threading.main_thread()):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_OK)


def reload_daemon(daemon: Any, args: argparse.Namespace, logger: logging.Logger) -> Any:
    """SIGHUP: read the configuration again; a bad file keeps the running configuration."""
    from daemon.app import apply_demo

    try:
        config = read_config(args)
    except CliError as err:
        logger.error("reload refused, keeping the running configuration: %s", err)
        return daemon
    if config.demo:
        config, _ = apply_demo(config)
    if config == daemon.config:
        logger.info("reload: configuration unchanged")
        return daemon
    if without_prompt(config) == without_prompt(daemon.config):
        # Only the [engine] prompt changed: a preset switch, not a restart.
        from daemon.presets import config_preset

        daemon.library.set_config_preset(
            config_preset(config.engine.prompt, config.engine.negative_prompt)
        )
        daemon.config = config
        logger.info("reload: new [engine] prompt (preset 'config')")
        return daemon
    logger.info("reload: configuration changed, restarting the daemon")
    daemon.stop()
    try:
        return start_daemon(config)
    except CliError as err:
        logger.error("reload: %s; restarting with the previous configuration", err)
        return start_daemon(daemon.config)


def without_prompt(config: Any) -> Any:
    engine = config.engine.model_copy(update={"prompt": "", "negative_prompt": ""})
    return config.model_copy(update={"engine": engine})


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["show", "path"], help="show: the effective settings.")
    add_config_argument(parser)


@command("config", "Show the effective configuration (secrets masked).", add_config_arguments)
def config_command(args: argparse.Namespace) -> int:
    from daemon.config import default_config_path, dump_config

    if args.action == "path":
        print(args.config or default_config_path())
        return EXIT_OK
    print(dump_config(read_config(args), mask_secrets=True), end="")
    return EXIT_OK


# --- presets ----------------------------------------------------------------------------------


def add_presets_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    parser.add_argument("--json", action="store_true", help="Print JSON (for scripts).")


@command(
    "presets",
    "List the presets; the running daemon's active one is marked with *.",
    add_presets_arguments,
)
def presets_command(args: argparse.Namespace) -> int:
    import json

    from daemon.control import ControlClientError, call

    config = read_config(args)
    try:
        listing = call("GET", "/presets", control_file=config.control.token_file)
        running = True
    except ControlClientError as err:
        listing, running = local_preset_listing(config), False
        if not args.json:
            print(f"({err}; showing the preset files)", file=sys.stderr)
    if args.json:
        print(json.dumps({**listing, "daemon_running": running}, indent=2))
        return EXIT_OK
    rows = listing["presets"]
    width = max(len(r["name"]) for r in rows)
    keys = max([len(r["hotkey"] or "") for r in rows] + [6])
    for r in rows:
        mark = "*" if r["active"] and running else " "
        what = "(camera unchanged) " if r["passthrough"] else ""
        scenes = f"  [OBS: {', '.join(r['obs_scenes'])}]" if r["obs_scenes"] else ""
        line = f"{mark} {r['name']:<{width}}  {r['hotkey'] or '-':<{keys}}  {what}"
        print(f"{line}{r['description']}{scenes}".rstrip())
    for file, error in listing["errors"].items():
        print(f"error: {error}" if file in error else f"error: {file}: {error}", file=sys.stderr)
    return EXIT_OK


def local_preset_listing(config: Any) -> dict[str, Any]:
    """The preset files as the daemon would read them (when no daemon is running)."""
    from daemon.app import preset_library
    from daemon.presets import PresetManager

    library = preset_library(config)
    library.scan()
    startup = config.presets.startup if config.presets.startup in library.presets else "config"
    manager = PresetManager(library, startup)
    return {"active": startup, "presets": manager.listing(), "errors": library.errors}


def call_daemon(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    """One control-API call to the daemon the configuration names; its failure is a CliError."""
    from daemon.control import ControlClientError, call

    config = read_config(args)
    try:
        return call(method, path, body, control_file=config.control.token_file)
    except ControlClientError as err:
        raise CliError(str(err)) from None


def add_preset_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="A preset name (see `streamv2v presets`), next or prev.")
    add_config_argument(parser)


@command(
    "preset", "Switch the running daemon to a preset: NAME, next or prev.", add_preset_arguments
)
def preset_command(args: argparse.Namespace) -> int:
    result = call_daemon(args, "POST", "/preset", {"name": args.name})
    print(f"active preset: {result['active']}")
    return EXIT_OK


# --- status -----------------------------------------------------------------------------------


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    parser.add_argument("--json", action="store_true", help="Print the figures as JSON.")


@command("status", "Show the running daemon's live figures.", add_status_arguments)
def status_command(args: argparse.Namespace) -> int:
    import json

    status = call_daemon(args, "GET", "/status")
    print(json.dumps(status, indent=2) if args.json else status_table(status))
    return EXIT_OK


def status_table(s: dict[str, Any]) -> str:
    """The figures of GET /status as a compact table."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f} ms"

    def num(value: float | None, unit: str = "") -> str:
        return "-" if value is None else f"{value:.1f}{unit}"

    state = s["state"]
    steps = "-" if s["steps"] is None else f"{s['steps']}{' (stream batch)' * s['stream_batch']}"
    control = s["controller"]
    if control["active"]:
        budget = "" if s["latency_budget_ms"] is None else f", budget {s['latency_budget_ms']:g} ms"
        fps = "" if s["target_fps"] is None else f", target {s['target_fps']:g} fps"
        why = f"; last change: {control['reason']}" if control["reason"] else ""
        steps += f"   predicted p95 {ms(control['predicted_p95_ms'])}{budget}{fps}{why}"
    else:
        steps += "   (fixed: latency controller off)"
    fps, lat, kinds, bank, dev = s["fps"], s["latency_ms"], s["kinds"], s["bank"], s["device"]
    memory = "" if dev["memory_bytes"] is None else f", {dev['memory_bytes'] / 2**30:.2f} GiB used"
    rows = [
        ("preset", f"{s['preset']}{'  (switching)' * s['switching']}"),
        ("state", "   ".join(f"{part} {value}" for part, value in state.items())),
        ("steps", steps),
        (
            "fps",
            f"input {num(fps['input'])}   engine {num(fps['engine'])}   "
            f"output {num(fps['output'])}",
        ),
        (
            "latency",
            f"p50 {ms(lat['p50'])}   p95 {ms(lat['p95'])}   p99 {ms(lat['p99'])}   "
            f"deadline misses {s['deadline_misses']}",
        ),
        (
            "frames",
            f"published {s['published']}   styled {kinds.get('styled', 0)}   "
            f"passthrough {kinds.get('passthrough', 0)}   "
            f"dropped input {s['dropped_input_frames']}",
        ),
        (
            "bank",
            f"{bank['bytes'] / 2**20:.1f} MB, {bank['tokens']} tokens"
            if bank["enabled"]
            else "off",
        ),
        ("device", f"{dev['name'] or '-'} {dev['dtype'] or ''}{memory}".rstrip()),
    ]
    return "\n".join(f"{name:<8} {value}" for name, value in rows)


# --- service and doctor -----------------------------------------------------------------------


def add_service_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["install", "uninstall", "status"])
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="Configuration the service runs with (default: the user config file, if any).",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="Print the file install would write; change nothing."
    )


@command(
    "service",
    "Start the daemon at login: systemd user unit, launchd agent or Task Scheduler task.",
    add_service_arguments,
)
def service_command(args: argparse.Namespace) -> int:
    from daemon import service
    from daemon.logs import default_log_file

    if args.config is not None and args.action == "install":
        args.overrides = []
        read_config(args)  # a broken file is refused now, not at every login (exit 2)
    try:
        kind = service.service_for(sys.platform, Path.home())
    except ValueError as err:
        raise CliError(str(err)) from None
    launch = service.default_launch(args.config, default_log_file().parent)
    if args.dry_run:
        if args.action != "install":
            raise CliError("--dry-run goes with install")
        print(f"# would write {kind.path}")
        print(kind.render(launch), end="")
        return EXIT_OK
    actions = {
        "install": lambda: service.install(kind, launch),
        "uninstall": lambda: service.uninstall(kind),
        "status": lambda: service.status(kind),
    }
    outcome = actions[args.action]()
    for line in outcome.lines:
        print(line)
    if outcome.ok:
        return EXIT_OK
    return EXIT_NOT_INSTALLED if args.action == "status" else EXIT_ERROR


def add_doctor_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    parser.add_argument("--json", action="store_true", help="Print the checks as JSON.")


@command("doctor", "Check this machine and the configuration before a run.", add_doctor_arguments)
def doctor_command(args: argparse.Namespace) -> int:
    from daemon.doctor import FAIL, report, run_checks

    config = read_config(args)
    results = run_checks(config)
    print(report(results, as_json=args.json))
    return EXIT_DOCTOR_FAILED if any(r.status == FAIL for r in results) else EXIT_OK
