"""`streamv2v doctor`: a preflight report, one line per check, OK / WARN / FAIL with the fix.

Every check is a small function of the configuration that returns :class:`Check` results and
never raises: a check that cannot run says so as its own FAIL. Nothing here loads a model (only
the local cache is looked at), so the report takes a second or two.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.config import CONFIG_PRESET, DaemonConfig

if TYPE_CHECKING:
    from daemon.models.needs import Need

OK, WARN, FAIL = "OK", "WARN", "FAIL"
_TORCH_RANGE = ((2, 3), (3, 0))  # the range pyproject.toml declares


@dataclass(frozen=True)
class Check:
    status: str  #: OK, WARN or FAIL
    name: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.status:<4}  {self.name:<15} {self.detail}"
        return f"{text}\n      {'':<15} fix: {self.fix}" if self.fix else text


# --------------------------------------------------------------------------- runtime
def check_python(_: DaemonConfig) -> Iterable[Check]:
    # (Python < 3.10 cannot install the package at all: no check needed for it.)
    yield Check(OK, "python", ".".join(map(str, sys.version_info[:3])))


def check_torch(config: DaemonConfig) -> Iterable[Check]:
    try:
        import torch
    except ImportError as err:
        yield Check(
            FAIL, "torch", f"not importable ({err})", "pip install -c constraints.txt torch"
        )
        return
    version = torch.__version__
    parts = tuple(int(p) for p in version.split("+")[0].split(".")[:2] if p.isdigit())
    low, high = _TORCH_RANGE
    status = OK if low <= parts < high else WARN
    fix = "" if status == OK else "install torch>=2.3,<3 (the tested range)"
    yield Check(status, "torch", version, fix)
    yield from _accelerator(torch, config)


def _accelerator(torch, config: DaemonConfig) -> Iterable[Check]:
    wanted = config.engine.device
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        name = torch.cuda.get_device_name(index)
        free, total = torch.cuda.mem_get_info(index)
        detail = f"cuda:{index} {name}, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free"
        if free < 3 * 2**30:
            yield Check(
                WARN,
                "gpu",
                detail,
                "SD1.5 in fp16 with the feature bank needs ~3 GiB: close other GPU programs",
            )
        else:
            yield Check(OK, "gpu", detail)
        return
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        yield Check(OK, "gpu", "Apple MPS")
        return
    status = FAIL if wanted and wanted.startswith("cuda") else WARN
    yield Check(
        status,
        "gpu",
        "no CUDA or MPS device: CPU only. Expect ~7 s per 512x512 frame with SD1.5 on a "
        "2-core CPU (the tiny demo model: ~10 frames/s at 256x256)",
        "real time needs an NVIDIA GPU with a CUDA build of torch: pip install torch "
        "--index-url https://download.pytorch.org/whl/cu128 (then check `nvidia-smi`)",
    )


# --------------------------------------------------------------------------- weights
def check_weights(config: DaemonConfig) -> Iterable[Check]:
    from daemon.models.registry import TINY_MODEL

    engine = config.engine
    if engine.model == TINY_MODEL:
        yield Check(OK, "model", "tiny: the built-in demo model (random weights, made locally)")
        return
    from daemon.models.needs import Need
    from daemon.models.registry import model_family

    family = model_family(engine.model)  # (SD1.5/SD2.1 or SDXL: its VAE and text encoders)
    pickle, vae = engine.allow_pickle, engine.settings.vae
    if "vae" not in engine.settings.model_fields_set:
        vae = family.vae_for(vae)
    found = _weights("model", Need(engine.model, "pipeline", vae == "model", None, pickle))
    yield Check(found.status, found.name, f"{found.detail}; {family.label} family", found.fix)
    if vae == "model":
        yield Check(OK, "vae", "the model's own VAE")
    else:
        yield _weights("vae", Need(vae, "component", allow_pickle=pickle))
    for lora in engine.loras:
        yield _weights("lora", Need(lora.id, "lora", weight_name=lora.weight_name))


def _weights(name: str, need: Need) -> Check:
    """A local folder or file that exists, or a hub id whose files the engine loads are all in
    the cache (daemon/models/needs.py says which)."""
    from daemon.models.fetch import missing_from_cache

    ref = need.repo
    path = Path(ref).expanduser()
    if ref.startswith((".", "/", "~")) or path.exists():
        if path.exists():
            return Check(OK, name, f"{ref} (local)")
        return Check(FAIL, name, f"{ref}: not found", "fix the path in the configuration")
    try:
        missing = missing_from_cache([need])
    except Exception as err:  # a malformed id
        return Check(FAIL, name, f"{ref}: {err}", "give a hub id (org/name) or a local folder")
    if not missing:
        return Check(OK, name, f"{ref} (in the local cache)")
    return Check(
        FAIL,
        name,
        f"{ref}: not in the local cache, so the daemon would download it at start (and fail "
        "offline)",
        "streamv2v models pull   (fetches only the files the engine loads; or set a local folder)",
    )


# --------------------------------------------------------------------------- devices
def check_virtual_camera(config: DaemonConfig, sysfs: Path = Path("/sys")) -> Iterable[Check]:
    vc = config.output.virtual_camera
    if not vc.enabled:
        yield Check(OK, "virtual camera", "disabled (output.virtual_camera.enabled = false)")
        return
    if sys.platform.startswith("linux"):
        yield _v4l2loopback(sysfs, vc.device)
        return
    try:
        import pyvirtualcam

        with pyvirtualcam.Camera(64, 64, 30, backend="obs") as cam:
            device = cam.device
        yield Check(OK, "virtual camera", f"OBS virtual camera: {device}")
    except Exception as err:
        yield Check(
            FAIL,
            "virtual camera",
            f"OBS virtual camera not usable ({err})",
            "install OBS Studio and start its virtual camera once (macOS: allow its camera "
            "extension in System Settings)",
        )


def _v4l2loopback(sysfs: Path, wanted: str | None) -> Check:
    modprobe = "sudo modprobe v4l2loopback devices=1 exclusive_caps=1 card_label=streamv2v"
    module = sysfs / "module" / "v4l2loopback"
    devices = sorted((sysfs / "devices" / "virtual" / "video4linux").glob("video*"))
    if not module.exists() or not devices:
        return Check(
            FAIL,
            "virtual camera",
            "no v4l2loopback device (the module is not loaded)",
            f"{modprobe}   (if modprobe finds no module: sudo apt install v4l2loopback-dkms)",
        )
    names = [f"/dev/{d.name}" for d in devices]
    if wanted and wanted not in names:
        return Check(
            FAIL,
            "virtual camera",
            f"{wanted} is not a v4l2loopback device (those are: {', '.join(names)})",
            "set output.virtual_camera.device to one of them",
        )
    caps_file = module / "parameters" / "exclusive_caps"
    caps = caps_file.read_text().strip() if caps_file.exists() else ""
    detail = f"{', '.join(names)} (exclusive_caps={caps or '?'})"
    if "Y" not in caps and "1" not in caps:
        return Check(
            WARN,
            "virtual camera",
            detail,
            "Chrome, Zoom and other WebRTC apps list the camera only with exclusive_caps=1: "
            f"sudo modprobe -r v4l2loopback && {modprobe}",
        )
    return Check(OK, "virtual camera", detail)


def check_camera(config: DaemonConfig, timeout_s: float = 5.0) -> Iterable[Check]:
    from daemon.dataplane.camera import describe_source, open_capture, quiet_opencv

    source = config.camera.source
    if source in ("testpattern", "scene"):
        yield Check(OK, "camera", f"generated ({source})")
        return
    quiet_opencv()
    what = describe_source(source)
    capture = open_capture(config.camera)
    if capture is None:
        yield Check(
            FAIL,
            "camera",
            f"{what}: cannot open",
            "check camera.source (`v4l2-ctl --list-devices` lists cameras on Linux), that no "
            "other program holds the camera, and your permission (group `video`)",
        )
        return
    try:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            ok, image = capture.read()
            if ok and image is not None:
                h, w = image.shape[:2]
                yield Check(OK, "camera", f"{what}: delivers {w}x{h} frames")
                return
        yield Check(
            FAIL,
            "camera",
            f"{what}: opened, but no frame in {timeout_s:g} s",
            "another program may be using it, or the format is unsupported: try camera.fourcc = ''",
        )
    finally:
        capture.release()


def check_ndi(config: DaemonConfig) -> Iterable[Check]:
    """The optional NDI extra: needed when the output or the camera uses NDI."""
    from daemon.dataplane.ndi import INSTALL_HINT, ndi_problem

    wanted = config.output.ndi.enabled or str(config.camera.source).startswith("ndi:")
    problem = ndi_problem()
    if problem is None:
        from importlib.metadata import version

        yield Check(OK, "ndi", f"cyndilib {version('cyndilib')} (the NDI runtime it bundles)")
    elif wanted:
        yield Check(FAIL, "ndi", problem, INSTALL_HINT)
    else:
        yield Check(OK, "ndi", "not installed (optional: output.ndi, camera.source = 'ndi:NAME')")


# --------------------------------------------------------------------------- services
def check_obs(config: DaemonConfig) -> Iterable[Check]:
    obs = config.obs
    if not obs.enabled:
        yield Check(OK, "obs", "disabled (obs.enabled = false)")
        return
    from daemon.config import ConfigError
    from daemon.integrations.obs import probe

    try:
        password = obs.resolve_password()
    except ConfigError as err:
        yield Check(FAIL, "obs", str(err), "fix the password setting named above")
        return
    status, detail = probe(obs, password)
    fixes = {
        "unreachable": "start OBS and tick Tools > WebSocket Server Settings > Enable "
        f"WebSocket server (port {obs.port}), or fix obs.host/obs.port",
        "auth": "set the password shown in OBS Tools > WebSocket Server Settings in "
        "obs.password, obs.password_env or obs.password_file",
    }
    yield Check(OK if status == "ok" else FAIL, "obs", detail, fixes.get(status, ""))


def check_remote(config: DaemonConfig) -> Iterable[Check]:
    """[engine] remote: the server answers, accepts our token, and how far away it is."""
    engine = config.engine
    if not engine.remote:
        return
    from daemon.extras import install_command, message, missing_modules

    if missing_modules("remote"):
        fix = f"{install_command('remote')}, or unset engine.remote to run the engine here"
        yield Check(FAIL, "remote engine", message("remote", "[engine] remote"), fix)
        return
    from daemon.remote.client import probe

    try:
        token = engine.resolve_token()
    except ValueError as err:
        yield Check(FAIL, "remote engine", str(err), "fix the token setting named above")
        return
    status, detail, _ = probe(engine.remote, token)
    fixes = {
        "unreachable": "start `streamv2v serve` on the GPU machine (with --listen ADDR for "
        "other machines), or fix engine.remote; through an SSH tunnel see the README",
        "refused": "use the server's token file as engine.token_file (or engine.token_env)",
    }
    yield Check(OK if status == "ok" else FAIL, "remote engine", detail, fixes.get(status, ""))


def check_presets(config: DaemonConfig) -> Iterable[Check]:
    from daemon.app import preset_library

    library = preset_library(config)
    library.scan()
    presets = library.presets
    for error in library.errors.values():
        yield Check(FAIL, "preset", error, "fix the file; the daemon keeps its last good version")
    startup = config.presets.startup
    if startup not in presets:
        yield Check(
            FAIL,
            "presets",
            f"presets.startup = {startup!r} names no preset",
            f"use one of: {', '.join(presets)} (or {CONFIG_PRESET!r})",
        )
        return
    yield Check(OK, "presets", f"{len(presets)} valid ({', '.join(presets)})")


def check_extras(_: DaemonConfig) -> Iterable[Check]:
    """Each optional extra but ``mask`` (check_mask's): installed, or what its absence costs."""
    from daemon.extras import EXTRAS, install_command, missing_modules, versions

    for extra in EXTRAS.values():
        if extra.name == "mask":
            continue
        name = f"{extra.name} extra"
        if missing_modules(extra.name):
            detail = f"not installed: {extra.features} unavailable"
            yield Check(WARN, name, detail, install_command(extra.name))
        else:
            yield Check(OK, name, versions(extra.name))


def check_mask(_: DaemonConfig) -> Iterable[Check]:
    """The person mask's runtime (extra ``mask``) and the shipped model file."""
    from daemon.extras import missing_modules
    from daemon.masking.runtime import EXTRA_HINT, runtime_problem, runtime_version

    problem = runtime_problem()
    if problem is None:
        yield Check(OK, "person mask", f"ai-edge-litert {runtime_version()}, model file intact")
    elif missing_modules("mask"):
        yield Check(
            WARN,
            "person mask",
            "ai-edge-litert not installed (the 'mask' extra): presets with a mask are refused",
            EXTRA_HINT,
        )
    else:
        yield Check(FAIL, "person mask", problem, "reinstall streamv2v")


def check_ports(config: DaemonConfig) -> Iterable[Check]:
    control = config.control
    if control.enabled:
        yield _port("control port", control.host, control.port, FAIL, config, "control.port")
    preview = config.output.preview
    if preview.enabled:
        yield _port("preview port", preview.host, preview.port, WARN, config, "output.preview.port")


def _port(name: str, host: str, port: int, severity: str, config: DaemonConfig, key: str) -> Check:
    if port == 0:
        return Check(OK, name, "any free port (0)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe_socket:
        try:
            probe_socket.bind((host.strip("[]"), port))
            return Check(OK, name, f"{host}:{port} is free")
        except OSError:
            pass
    if _our_daemon_answers(config):
        return Check(OK, name, f"{host}:{port} is used by the running streamv2v daemon")
    return Check(
        severity, name, f"{host}:{port} is in use by another program", f"set {key} to a free port"
    )


def _our_daemon_answers(config: DaemonConfig) -> bool:
    from daemon.control.api import ControlClientError, call

    try:
        call("GET", "/status", control_file=config.control.token_file)
        return True
    except ControlClientError:
        return False


def check_log(config: DaemonConfig) -> Iterable[Check]:
    from daemon.logs import default_log_file

    path = config.log.file or default_log_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8"):
            pass
        yield Check(OK, "log file", str(path))
    except OSError as err:
        yield Check(WARN, "log file", f"{path}: {err.strerror or err}", "set log.file")


CHECKS: tuple[Callable[[DaemonConfig], Iterable[Check]], ...] = (
    check_python,
    check_torch,
    check_weights,
    check_virtual_camera,
    check_camera,
    check_obs,
    check_presets,
    check_extras,
    check_mask,
    check_ports,
    check_log,
    check_remote,
    check_ndi,
)


def run_checks(config: DaemonConfig) -> list[Check]:
    """Every check's results; a check that crashes is reported as a FAIL of its own."""
    results: list[Check] = []
    for check in CHECKS:
        name = check.__name__.removeprefix("check_")
        try:
            results.extend(check(config))
        except Exception as err:
            results.append(Check(FAIL, name, f"the check itself failed: {err!r}"))
    return results


def report(results: list[Check], as_json: bool = False) -> str:
    if as_json:
        return json.dumps([r.__dict__ for r in results], indent=2)
    counts = {s: sum(r.status == s for r in results) for s in (OK, WARN, FAIL)}
    summary = f"{counts[OK]} OK, {counts[WARN]} WARN, {counts[FAIL]} FAIL"
    return "\n".join([*(r.line() for r in results), summary])
