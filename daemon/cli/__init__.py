"""The ``streamv2v`` command line: parsing and dispatch only.

Each subcommand is a row of :data:`COMMANDS`: its name, one-line help, the function that adds
its arguments (daemon/cli/args.py) and a short function that hands the parsed values to the
module whose concern the work is (daemon/offline/, daemon/runner.py, daemon/control/,
daemon/integrations/, daemon/doctor.py). :func:`main` parses, dispatches, and turns every
expected failure into one line, ``streamv2v: error: ...`` on stderr, with exit code 2 and no
traceback.

The engine (and with it torch) is imported only once a command needs it, after the cheap checks
on files and values, so ``--help`` and mistyped paths answer at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from daemon.cli import args as arguments
from daemon.dataplane.video import VideoError
from daemon.errors import PROG, UserError

if TYPE_CHECKING:
    from daemon.config import DaemonConfig

EXIT_OK = 0
EXIT_DOCTOR_FAILED = 1  # a check FAILed
EXIT_ERROR = 2
EXIT_NOT_INSTALLED = 3  # `service status`: nothing installed (as systemctl's "inactive")
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Command:
    """One subcommand: how to parse its arguments and the function that runs it (whose
    docstring is the command's one-line help)."""

    name: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]

    @property
    def help(self) -> str:
        return " ".join((self.run.__doc__ or "").split())


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
    """The top-level parser with one subparser per command."""
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
    except (UserError, VideoError) as err:
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


def read_config(args: argparse.Namespace) -> DaemonConfig:
    """The effective configuration: file, then --set overrides; errors name the key (exit 2)."""
    from daemon.config import ConfigError, deep_merge, load_config, parse_override

    overrides: dict[str, Any] = {}
    try:
        for text in args.overrides:
            overrides = deep_merge(overrides, parse_override(text))
        if getattr(args, "demo", False):
            overrides = deep_merge(overrides, {"demo": True})
        if getattr(args, "log_level", None):
            overrides = deep_merge(overrides, {"log": {"level": args.log_level}})
        return load_config(args.config, overrides)
    except ConfigError as err:
        raise UserError(str(err)) from None


def call_daemon(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    """One control-API call to the daemon the configuration names; its failure is a UserError."""
    from daemon.control.api import ControlClientError, call

    config = read_config(args)
    try:
        return call(method, path, body, control_file=config.control.token_file)
    except ControlClientError as err:
        raise UserError(str(err)) from None


# --- dispatch: each hands the parsed values to the module whose concern the work is ----------


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The engine options `translate` and `eval` share (arguments.add_engine_arguments)."""
    names = ("device", "allow_pickle", "size", "steps", "strength", "seed", "stream_batch", "vae")
    return {name: getattr(args, name) for name in names}


def translate(args: argparse.Namespace) -> int:
    """Restyle a video file into a new video file."""
    from daemon.models.registry import default_model
    from daemon.offline.pipeline import translate as translate_video

    line = translate_video(
        args.input,
        args.output,
        model=args.model if args.model is not None else default_model(),
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        **engine_options(args),
    )
    print(line)
    return EXIT_OK


def eval_command(args: argparse.Namespace) -> int:
    """Measure the temporal quality of a translation (flicker, warp error, the bank's update
    pulse) for each feature-bank variant; optionally write an HTML report."""
    from daemon.offline.eval import evaluate, style_for

    style = style_for(args.output, args.model, args.prompt, args.negative_prompt, args.preset)
    _report, lines = evaluate(
        args.input,
        style=style,
        output=args.output,
        variants=args.variants,
        report_path=args.report,
        frames=args.frames,
        skip=args.skip,
        clip_model=args.clip_model,
        control=args.control,
        control_scale=args.control_scale,
        **engine_options(args),
    )
    print("\n".join(lines))
    return EXIT_OK


def demo(args: argparse.Namespace) -> int:
    """Run the whole pipeline offline: a generated camera through the built-in model into a
    video."""
    from daemon.offline.demo import demo as write_demo

    print(write_demo(args.frames, args.output))
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    """Run the daemon in the foreground: camera -> engine -> virtual camera."""
    from daemon.runner import run_foreground

    run_foreground(lambda: read_config(args), args.duration, args.owns_process)
    return EXIT_OK


def config_command(args: argparse.Namespace) -> int:
    """Show the effective configuration (secrets masked)."""
    from daemon.config import default_config_path, dump_config

    if args.action == "path":
        print(args.config or default_config_path())
        return EXIT_OK
    print(dump_config(read_config(args), mask_secrets=True), end="")
    return EXIT_OK


def presets_command(args: argparse.Namespace) -> int:
    """List the presets; the running daemon's active one is marked with *."""
    from daemon.control.api import ControlClientError, call
    from daemon.control.tables import preset_table

    config = read_config(args)
    try:
        listing = call("GET", "/presets", control_file=config.control.token_file)
        running = True
    except ControlClientError as err:
        from daemon.app import local_preset_listing

        listing, running = local_preset_listing(config), False
        if not args.json:
            print(f"({err}; showing the preset files)", file=sys.stderr)
    if args.json:
        print(json.dumps({**listing, "daemon_running": running}, indent=2))
        return EXIT_OK
    lines, errors = preset_table(listing, running)
    for line in lines:
        print(line)
    for line in errors:
        print(line, file=sys.stderr)
    return EXIT_OK


def preset_command(args: argparse.Namespace) -> int:
    """Switch the running daemon to a preset: NAME, next or prev."""
    result = call_daemon(args, "POST", "/preset", {"name": args.name})
    print(f"active preset: {result['active']}")
    return EXIT_OK


def status_command(args: argparse.Namespace) -> int:
    """Show the running daemon's live figures."""
    from daemon.control.tables import status_table

    status = call_daemon(args, "GET", "/status")
    print(json.dumps(status, indent=2) if args.json else status_table(status))
    return EXIT_OK


def open_command(args: argparse.Namespace) -> int:
    """Open the running daemon's control page in the browser, logged in."""
    from daemon.control.api import open_page

    opened, link = open_page(call_daemon(args, "POST", "/login-code")["url"], args.no_browser)
    print("control page opened in the browser" if opened else link)
    return EXIT_OK


def service_command(args: argparse.Namespace) -> int:
    """Start the daemon at login: systemd user unit, launchd agent or Task Scheduler task."""
    from daemon.integrations.service import perform

    if args.config is not None and args.action == "install":
        args.overrides = []
        read_config(args)  # a broken file is refused now, not at every login (exit 2)
    outcome = perform(args.action, args.config, dry_run=args.dry_run)
    for line in outcome.lines:
        print(line)
    if outcome.ok:
        return EXIT_OK
    return EXIT_NOT_INSTALLED if args.action == "status" else EXIT_ERROR


def obs_script_command(args: argparse.Namespace) -> int:
    """Print the path of the OBS script that puts the presets on OBS's hotkeys (--install:
    copy it where OBS keeps its files)."""
    from daemon.integrations.obs_script import how_to_add, install, script_path

    path = install() if args.install else script_path()
    print(path)
    if args.install:
        print(how_to_add(path))
    return EXIT_OK


def haproxy_config_command(args: argparse.Namespace) -> int:
    """Print the HAProxy configuration for the boxes (--token-file: health checks send it)."""
    from daemon.remote.haproxy import haproxy_config
    from daemon.remote.server import ServeOptions, serve_token

    token = serve_token(ServeOptions(model="", token_file=args.token_file))
    try:
        print(haproxy_config(args.bind or "127.0.0.1:8780", args.box, token=token), end="")
    except ValueError as err:
        raise UserError(str(err)) from None
    return EXIT_OK


def serve_command(args: argparse.Namespace) -> int:
    """Serve the engine to daemons on other machines (WebRTC; run it on the GPU box)."""
    import logging

    from daemon.extras import require

    require("remote", "`streamv2v serve`")  # one line, not aiortc's ImportError
    if args.action == "haproxy-config":  # (prints a configuration; loads no engine)
        return haproxy_config_command(args)
    from daemon.remote.browser import add_browser_ways
    from daemon.remote.serve_main import serve
    from daemon.remote.server import ServeOptions

    logging.basicConfig(
        level=args.log_level or "INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    options = ServeOptions(
        model=args.model,
        listen=args.listen,
        port=args.port,
        token_file=args.token_file,
        max_sessions=args.max_sessions,
        device=args.device,
        vae=args.vae,
        loras=tuple(args.lora),
        allow_pickle=args.allow_pickle,
        presets=args.presets,
        ice_servers=tuple(args.ice_server),
        agent_port=args.agent_port,
    )
    serve(options, extend=add_browser_ways)
    return EXIT_OK


def doctor_command(args: argparse.Namespace) -> int:
    """Check this machine and the configuration before a run."""
    from daemon.doctor import FAIL, report, run_checks

    results = run_checks(read_config(args))
    print(report(results, as_json=args.json))
    return EXIT_DOCTOR_FAILED if any(r.status == FAIL for r in results) else EXIT_OK


def models_command(args: argparse.Namespace) -> int:
    """Fetch the models the configuration needs (pull), show the cache (list), delete (rm)."""
    from daemon.models import commands

    if args.action == "list":
        commands.list_command()
    elif args.action == "rm":
        commands.rm_command(args.models)
    else:
        from daemon.app import preset_library

        config = read_config(args)
        library = preset_library(config)
        library.scan()
        commands.pull_command(config, library.presets.values(), args.models)
    return EXIT_OK


#: The subcommands, in the order ``--help`` lists them.
COMMANDS: dict[str, Command] = {
    cmd.name: cmd
    for cmd in (
        Command("translate", arguments.translate, translate),
        Command("eval", arguments.evaluate, eval_command),
        Command("demo", arguments.demo, demo),
        Command("run", arguments.run, run),
        Command("config", arguments.config, config_command),
        Command("presets", arguments.with_json("Print JSON (for scripts)."), presets_command),
        Command("preset", arguments.preset, preset_command),
        Command("status", arguments.with_json("Print the figures as JSON."), status_command),
        Command("open", arguments.open_page, open_command),
        Command("service", arguments.service, service_command),
        Command("obs-script", arguments.obs_script, obs_script_command),
        Command("doctor", arguments.with_json("Print the checks as JSON."), doctor_command),
        Command("models", arguments.models, models_command),
        Command("serve", arguments.serve, serve_command),
    )
}
