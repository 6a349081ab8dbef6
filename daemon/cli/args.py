"""The arguments of each subcommand (parsing only: the work lives with its concern)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from daemon.config import DEFAULT_MODEL
from daemon.models.registry import STYLE_PROMPTS, TINY_MODEL, TINY_STYLES
from daemon.offline.demo import DEMO_FPS


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


def add_engine_arguments(parser: argparse.ArgumentParser, prompt_required: bool = True) -> None:
    """Options that choose the model and tune the engine (shared by commands that run one)."""
    parser.add_argument(
        "--prompt", required=prompt_required, help="What the video should look like."
    )
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


def translate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="Video file to restyle.")
    parser.add_argument(
        "output", type=Path, help="Video file to write (.mp4, .avi, or .mkv: lossless)."
    )
    add_engine_arguments(parser)


def parse_variants(text: str) -> tuple[str, ...]:
    """``'off,stable'`` -> ``('off', 'stable')``: known bank variants, each once."""
    from daemon.offline.eval import VARIANTS

    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown variant(s) {', '.join(unknown) or '(none given)'}; choose from "
            f"{', '.join(VARIANTS)}, comma-separated"
        )
    return names


def parse_count(text: str) -> int:
    """A whole number, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def evaluate(parser: argparse.ArgumentParser) -> None:
    from daemon.offline.eval import DEFAULT_SKIP, VARIANTS

    parser.add_argument("input", type=Path, help="The source video.")
    parser.add_argument(
        "--output",
        type=Path,
        help="A translation of INPUT to measure (e.g. from `streamv2v translate`), instead of "
        "running the engine.",
    )
    parser.add_argument(
        "--preset",
        help="Translate with a preset: a name (your presets folder, then the bundled ones) or "
        "a .toml file; instead of --prompt.",
    )
    add_engine_arguments(parser, prompt_required=False)
    parser.add_argument(
        "--variants",
        type=parse_variants,
        default=tuple(VARIANTS),
        metavar="A,B,...",
        help=f"Feature-bank variants to run, comma-separated (default: {','.join(VARIANTS)}).",
    )
    parser.add_argument(
        "--report", type=Path, metavar="PATH", help="Write a report: .html (one page) or .md."
    )
    parser.add_argument(
        "--frames", type=parse_positive_int, help="Use only the first N frames of INPUT."
    )
    parser.add_argument(
        "--skip",
        type=parse_count,
        default=DEFAULT_SKIP,
        help=f"Warm-up frames left out of the figures (default: {DEFAULT_SKIP}, the bank's "
        "first update cycle).",
    )
    parser.add_argument(
        "--control",
        metavar="CONTROLNET",
        help="Structure with and without a canny ControlNet (a diffusers ControlNetModel: hub "
        "id or folder; tiny-canny for the built-in model): every variant runs with it at "
        "--control-scale and again at scale 0 ('VARIANT, no control'), one engine.",
    )
    parser.add_argument(
        "--control-scale",
        type=float,
        default=1.0,
        help="The ControlNet's scale for --control (default 1; a preset's control_scales "
        "override it).",
    )
    parser.add_argument(
        "--clip-model",
        help="CLIP model (hub id or folder) for CLIP consistency; only read from the local "
        "cache, never downloaded (default: the first cached of openai/clip-vit-large-patch14, "
        "openai/clip-vit-base-patch32).",
    )


def demo(parser: argparse.ArgumentParser) -> None:
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


def run(parser: argparse.ArgumentParser) -> None:
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


def config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["show", "path"], help="show: the effective settings.")
    add_config_argument(parser)


def with_json(json_help: str) -> Callable[[argparse.ArgumentParser], None]:
    """The configuration options and ``--json`` (for commands that print a report)."""

    def add(parser: argparse.ArgumentParser) -> None:
        add_config_argument(parser)
        parser.add_argument("--json", action="store_true", help=json_help)

    return add


def preset(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="A preset name (see `streamv2v presets`), next or prev.")
    add_config_argument(parser)


def open_page(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    parser.add_argument(
        "--no-browser",
        action="store_true",
        help="Print the one-time login link (valid once, for a minute) instead of opening it.",
    )


def service(parser: argparse.ArgumentParser) -> None:
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


def obs_script(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--install",
        action="store_true",
        help="Copy it into OBS's config folder (scripts/streamv2v/) and say how to add it.",
    )


def models(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action",
        choices=["pull", "list", "rm"],
        help="pull: fetch what the configuration and every preset load (or the MODELs named, "
        "with the configured VAE); list: what the cache holds; rm: delete MODELs from it.",
    )
    parser.add_argument("models", nargs="*", metavar="MODEL", help="Hub ids (org/name).")
    add_config_argument(parser)


def serve(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action",
        nargs="?",
        choices=["haproxy-config"],
        help="haproxy-config: print an HAProxy configuration for several boxes and exit.",
    )
    parser.add_argument("--bind", metavar="HOST:PORT", help="haproxy-config: the front address.")
    parser.add_argument(
        "--box",
        action="append",
        default=[],
        metavar="HOST:PORT:AGENT_PORT",
        help="haproxy-config: a serve box (its --port and --agent-port); repeatable.",
    )
    parser.add_argument(
        "--model",
        default=TINY_STYLES,
        help=f"Hub id or local folder of an SD-family model, or '{TINY_STYLES}' (default).",
    )
    parser.add_argument(
        "--listen",
        default="127.0.0.1",
        metavar="ADDR",
        help="Address to listen on (default 127.0.0.1; any other needs --token-file).",
    )
    parser.add_argument("--port", type=int, default=8770, help="Signalling port (default 8770).")
    parser.add_argument(
        "--agent-port",
        type=int,
        metavar="N",
        help="Answer HAProxy's agent check on this port (see `serve haproxy-config`).",
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="File whose first line is the token daemons must send (never logged).",
    )
    parser.add_argument(
        "--max-sessions",
        type=parse_positive_int,
        default=4,
        metavar="N",
        help="Daemons served at once; more are refused with a reason (default 4).",
    )
    parser.add_argument("--vae", help="VAE hub id or folder, or 'model' for the model's own.")
    parser.add_argument(
        "--lora", action="append", default=[], metavar="ID", help="LoRA to fuse (repeatable)."
    )
    parser.add_argument(
        "--presets",
        type=Path,
        metavar="DIR",
        help="Presets for WHIP sessions and the page, beside the bundled ones that fit the model.",
    )
    parser.add_argument(
        "--ice-server",
        action="append",
        default=[],
        metavar="URL",
        help="STUN URL offered to WHIP/WHEP clients (Link header; repeatable).",
    )
    parser.add_argument("--device", help="Torch device such as cuda or cpu (default: best found).")
    parser.add_argument(
        "--allow-pickle", action="store_true", help="Allow pickle weights (trusted models only)."
    )
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
