"""The install the README gives, checked as a user gets it: the built wheel in a clean venv.

``make`` installs the ``test`` extra, which pulls in every extra, so the rest of the suite never
sees an install without one. Here the wheel is built from this tree, installed into a fresh venv
with ``[app]`` only (torch pinned first through constraints.txt, as the Makefile does; packages
from pip's cache or the package index, nothing else), and ``streamv2v --help``, ``doctor`` and
a few seconds of ``run --demo`` must work there. Then each further extra the README names for a
feature (remote, eval, mask) is added alone into the same venv, and the command that uses it
goes from a one-line refusal naming the extra to working.

One venv serves every step (module fixture; the second test adds extras, so it runs second).
The venv is made without pip (``python -m venv --without-pip``) and filled by this
environment's pip through ``pip --python``: the same resolution and packages, ~10 s less than
ensurepip. ``--no-compile``: no byte-compiling of ~1.5 GB that the checks mostly never import.
The commands run from a folder outside the tree with no PYTHONPATH, offline for the hub
(HF_HUB_OFFLINE=1, a private HF_HOME, a proxy that answers nothing for anything but
127.0.0.1), in private XDG dirs; everything is deleted at the end. pip reaches only the package
indexes pip is configured with.

Cost (``-s`` prints it per step): ~107 s of CPU in all (installs ~25 s, the demo and the
[app] checks ~32 s, the extras' commands ~50 s; each command's first import compiles what it
needs, as --no-compile leaves that to it); 7 min of wall time on the 2 shared cores of a dev
box at load 17, so ~2 min on an idle 2-core CI machine.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
INSTALL_TIMEOUT = 900  # s, per pip command: generous, the index may be slow
#: The line of the demo that says styled frames flow (the engine loaded the shipped model).
ENGINE_RUNNING = "engine: running"


def _children_cpu() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


class Timings(dict[str, tuple[float, float]]):
    """Step -> (wall s, CPU s of the child processes it waited for): on a shared machine the
    CPU is the figure that carries over to CI's two cores."""

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        wall, cpu = time.monotonic(), _children_cpu()
        try:
            yield
        finally:
            self[name] = (time.monotonic() - wall, _children_cpu() - cpu)

    def line(self) -> str:
        steps = ", ".join(f"{k} {wall:.0f}/{cpu:.0f}" for k, (wall, cpu) in self.items())
        outer = [v for k, v in self.items() if not k.startswith("+")]  # "+x": inside a check
        total = [sum(v[i] for v in outer) for i in (0, 1)]
        return f"install test, wall/CPU s: {steps}; total {total[0]:.0f}/{total[1]:.0f}"


@dataclass
class Venv:
    root: Path  # the temporary folder: src/, dist/, venv/, work/
    python: Path
    wheel: Path
    env: dict[str, str]  # for the installed commands: offline, private dirs, no PYTHONPATH
    timings: Timings

    @property
    def work(self) -> Path:
        return self.root / "work"

    def streamv2v(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        command = [str(self.python.parent / "streamv2v"), *args]
        return subprocess.run(
            command, cwd=self.work, env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def pip_install(self, step: str, *requirements: str) -> None:
        """Install into the venv as the Makefile does (quiet, torch pinned by constraints.txt)."""
        command = [sys.executable, "-m", "pip", "--python", str(self.python), "install", "-q"]
        command += ["--no-compile", "--no-input", "-c", str(ROOT / "constraints.txt")]
        with self.timings.step(step):
            done = subprocess.run(
                [*command, *requirements], env=_pip_env(), capture_output=True, text=True,
                timeout=INSTALL_TIMEOUT, cwd=self.root,
            )  # fmt: skip
        assert done.returncode == 0, f"{step}: pip failed\n{done.stdout}\n{done.stderr}"

    def has(self, module: str) -> bool:
        probe = f"import importlib.util as u, sys; sys.exit(u.find_spec({module!r}) is None)"
        return subprocess.run([str(self.python), "-c", probe], env=self.env).returncode == 0


def _pip_env() -> dict[str, str]:
    """pip as the user runs it: this machine's index configuration, no project on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONNOUSERSITE": "1"}


def _command_env(root: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONSTARTUP")
        and not k.startswith(("XDG_", "HF_", "HUGGINGFACE_"))
    }
    dirs = {name: root / "home" / name.lower() for name in ("XDG_CONFIG_HOME", "XDG_STATE_HOME")}
    dirs |= {"XDG_CACHE_HOME": root / "home" / "cache", "XDG_RUNTIME_DIR": root / "home" / "run"}
    dirs |= {"HF_HOME": root / "home" / "hf"}
    for path in dirs.values():
        path.mkdir(parents=True, mode=0o700)
    env.update({name: str(path) for name, path in dirs.items()})
    # Nothing beyond this machine: the hub offline, and any other HTTP(S) client pointed at a
    # closed port (the daemon's own listeners on 127.0.0.1 stay reachable).
    closed = "http://127.0.0.1:9"
    env.update(HF_HUB_OFFLINE="1", HTTP_PROXY=closed, HTTPS_PROXY=closed, ALL_PROXY=closed)
    env.update(http_proxy=closed, https_proxy=closed, NO_PROXY="127.0.0.1,localhost")
    env.update(no_proxy="127.0.0.1,localhost", PYTHONNOUSERSITE="1", PYTHONUNBUFFERED="1")
    return env


def _scratch_parent() -> str | None:
    """tmpfs (/dev/shm) when it and the memory have room for the ~1.6 GB venv: writing and
    deleting its 40,000 files there takes seconds, on a busy disk minutes. Else the temp dir."""
    try:
        free = shutil.disk_usage("/dev/shm").free
        meminfo = Path("/proc/meminfo").read_text()
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
        available = int(re.search(r"MemAvailable:\s+(\d+) kB", meminfo)[1]) * 1024  # type: ignore[index]
    except (OSError, TypeError):
        return None
    roomy = free >= 8 * 2**30 and available >= 8 * 2**30 and os.access("/dev/shm", os.W_OK)
    # The venv's scripts and torch's libraries must be executable there (Docker: noexec).
    runs = [m for m in mounts if len(m) > 3 and m[1] == "/dev/shm"]
    roomy = roomy and bool(runs) and all("noexec" not in m[3].split(",") for m in runs)
    return "/dev/shm" if roomy else None


def _has_setuptools(major: int) -> bool:
    from importlib import metadata

    try:
        return int(metadata.version("setuptools").split(".")[0]) >= major
    except (metadata.PackageNotFoundError, ValueError):
        return False


def _source_copy(target: Path) -> Path:
    """The tree's files as git sees them (tracked and new, not ignored: no build/, .venv/),
    so a stale build/ of the checkout never leaks into the wheel; every file when not a
    git checkout (a scratch copy), less what .gitignore names."""
    git = ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    listed = subprocess.run(git, capture_output=True) if (ROOT / ".git").exists() else None
    if listed is not None and listed.returncode == 0 and listed.stdout:
        for name in filter(None, listed.stdout.decode().split("\0")):
            source = ROOT / name
            if source.is_file():  # a tracked file deleted in the work tree is not copied
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target / name)
    else:
        junk = ("build", "dist", ".venv", ".git", "__pycache__", "*.egg-info", ".*_cache", "out")
        shutil.copytree(ROOT, target, ignore=shutil.ignore_patterns(*junk), dirs_exist_ok=True)
    return target


@pytest.fixture(scope="module")
def venv() -> Iterator[Venv]:
    root = Path(tempfile.mkdtemp(prefix="streamv2v-install-", dir=_scratch_parent()))
    timings = Timings()
    try:
        with timings.step("wheel"):
            source = _source_copy(root / "src")
            build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-input"]
            if _has_setuptools(77):  # pyproject's build requirement is here: no isolated env
                build.append("--no-build-isolation")
            built = subprocess.run(
                [*build, "-w", str(root / "dist"), str(source)], env=_pip_env(), cwd=root,
                capture_output=True, text=True, timeout=INSTALL_TIMEOUT,
            )  # fmt: skip
            assert built.returncode == 0, f"building the wheel failed\n{built.stdout}{built.stderr}"
            (wheel,) = (root / "dist").glob("streamv2v-*.whl")
            subprocess.run(
                [sys.executable, "-m", "venv", "--without-pip", str(root / "venv")],
                check=True, timeout=120, env=_pip_env(),
            )  # fmt: skip
        (root / "work").mkdir()
        env = _command_env(root)
        made = Venv(root, root / "venv" / "bin" / "python", wheel, env, timings)
        made.pip_install("torch", "torch==2.13.0")
        made.pip_install("[app]", f"{wheel}[app]")
        yield made
    finally:
        with timings.step("clean up"):
            shutil.rmtree(root, ignore_errors=True)
        print(f"\n{timings.line()}")


def _one_line_refusal(done: subprocess.CompletedProcess, extra: str, what: str) -> None:
    """Exit 2 and one line on stderr naming the extra and its install command, no traceback."""
    assert done.returncode == 2, f"{what}: exit {done.returncode}\n{done.stderr}"
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr + done.stdout, done.stderr
    assert f"needs the '{extra}' extra: pip install 'streamv2v[{extra}]'" in lines[0], lines[0]


def _doctor(venv: Venv, *args: str) -> dict[str, list[str]]:
    """doctor's lines by check name (it exits 1 here: no GPU, camera or v4l2loopback)."""
    done = venv.streamv2v("doctor", "--json", *args)
    assert done.returncode in (0, 1) and "Traceback" not in done.stderr, done.stderr
    import json

    checks: dict[str, list[str]] = {}
    for check in json.loads(done.stdout):
        checks.setdefault(check["name"], []).append(f"{check['status']} {check['detail']}")
    return checks


def _run_demo_until_frames_flow(venv: Venv) -> tuple[str, bytes, list[str]]:
    """``run --demo`` in the venv until the engine runs; the preview's newest frame; the log."""
    command = [str(venv.python.parent / "streamv2v"), "run", "--demo"]
    command += ["--set", "output.preview.port=0", "--set", "control.port=0"]
    command += ["--set", "hotkeys.enabled=false"]
    proc = subprocess.Popen(
        command, cwd=venv.work, env=venv.env, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []
    arrived: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in proc.stderr:  # type: ignore[union-attr]
            lines.append(line)
            arrived.put(line)
        arrived.put(None)

    threading.Thread(target=read, daemon=True).start()

    def wait_line(pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = arrived.get(timeout=left)
            except queue.Empty:
                break
            assert line is not None, "the demo ended:\n" + "".join(lines)
            if found := re.search(pattern, line):
                return found
        raise AssertionError(f"no {pattern!r} in {timeout} s:\n" + "".join(lines))

    try:
        url = wait_line(r"preview: (http://127\.0\.0\.1:\d+)/", 120)[1]
        wait_line(re.escape(ENGINE_RUNNING), 180)
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
            f"{url}/frame.jpg", timeout=30
        ) as answer:
            frame = answer.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert code == 0, f"the demo exited {code}:\n" + "".join(lines)
    return url, frame, lines


def test_the_wheel_with_app_only_runs_help_doctor_and_the_demo(venv):
    with venv.timings.step("app checks"):
        _app_checks(venv)


def _app_checks(venv: Venv) -> None:
    # The venv is the wheel's alone: no extra, nothing from this tree.
    assert not any(venv.has(m) for m in ("aiortc", "av", "matplotlib", "ai_edge_litert"))
    source = "import daemon, streamv2v; print(daemon.__file__, streamv2v.__file__)"
    where = subprocess.run(
        [str(venv.python), "-c", source],
        cwd=venv.work, env=venv.env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert all(Path(p).is_relative_to(venv.root / "venv") for p in where.stdout.split()), where

    helped = venv.streamv2v("--help")
    assert helped.returncode == 0 and "run" in helped.stdout and "doctor" in helped.stdout, (
        helped.stderr
    )
    checks = _doctor(venv)
    assert checks["remote extra"][0].startswith("WARN not installed"), checks
    assert checks["eval extra"][0].startswith("WARN not installed"), checks
    assert checks["person mask"][0].startswith("WARN ai-edge-litert not installed"), checks
    assert checks["presets"][0].startswith("OK"), checks  # the shipped presets are found

    _url, frame, lines = _run_demo_until_frames_flow(venv)
    assert frame[:2] == b"\xff\xd8" and len(frame) > 500, frame[:20]  # a JPEG, not an error
    log = "".join(lines)
    assert "Traceback" not in log and "stopped:" in log, log
    # The shipped demo model and LoRA load from the installed package, not from this tree.
    loaded = re.search(r"LoRA (\S+) loaded", log)
    assert loaded and Path(loaded[1]).is_relative_to(venv.root / "venv"), log


def test_each_further_extra_added_alone_turns_its_feature_on(venv):
    with venv.timings.step("extras checks"):
        _extras_checks(venv)


def _extras_checks(venv: Venv) -> None:
    work = venv.work
    # A short clip to measure and a preset with a person mask.
    clip = work / "clip.mp4"
    subprocess.run(
        [str(venv.python), "-c",
         "import cv2, numpy as np, sys\n"
         "w = cv2.VideoWriter(sys.argv[1], cv2.VideoWriter_fourcc(*'mp4v'), 10, (64, 64))\n"
         "for i in range(10):\n"
         "    f = np.zeros((64, 64, 3), np.uint8)\n"
         "    cv2.rectangle(f, (3 * i, 10), (3 * i + 20, 40), (0, 200, 255), -1)\n"
         "    w.write(f)\n"
         "w.release()\n", str(clip)],
        check=True, env=venv.env, timeout=60,
    )  # fmt: skip
    presets = work / "presets"
    presets.mkdir()
    (presets / "room.toml").write_text('prompt = "a painting"\nmask = "person"\n')
    at_presets = ["--set", f"presets.dir={presets}", "--set", "control.port=1"]
    remote = ["--set", "engine.remote=http://127.0.0.1:9"]
    report = work / "report.html"
    evaluate = ["eval", str(clip), "--output", str(clip), "--skip", "1", "--report", str(report)]

    # [app] only: each feature of a missing extra is refused in one line that names it.
    _one_line_refusal(venv.streamv2v("serve"), "remote", "serve")
    _one_line_refusal(venv.streamv2v("run", *remote, "--duration", "1"), "remote", "run")
    _one_line_refusal(venv.streamv2v(*evaluate), "eval", "eval --report")
    listed = venv.streamv2v("presets", *at_presets)
    assert listed.returncode == 0 and "room" not in listed.stdout, listed
    assert "mask: a person mask needs ai-edge-litert" in listed.stderr, listed.stderr
    assert "pip install 'streamv2v[mask]'" in listed.stderr, listed.stderr

    # + remote: serve answers, the client loads and probes the (absent) server.
    venv.pip_install("+remote", f"{venv.wheel}[app,remote]")
    assert not venv.has("matplotlib") and not venv.has("ai_edge_litert")  # alone
    served = venv.streamv2v("serve", "--help")
    assert served.returncode == 0 and "--listen" in served.stdout, served.stderr
    imported = subprocess.run(
        [str(venv.python), "-c", "import daemon.remote.server, daemon.remote.client"],
        cwd=work, env=venv.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    checks = _doctor(venv, *remote)
    assert checks["remote extra"][0].startswith("OK aiortc "), checks
    assert "needs the" not in checks["remote engine"][0], checks  # the probe ran instead
    assert checks["eval extra"][0].startswith("WARN"), checks

    # + eval: the report with its plots.
    venv.pip_install("+eval", f"{venv.wheel}[app,eval]")
    helped = venv.streamv2v("eval", "--help")
    assert helped.returncode == 0 and "--report" in helped.stdout, helped.stderr
    measured = venv.streamv2v(*evaluate)
    assert measured.returncode == 0, measured.stderr
    assert "<img" in report.read_text(), "the report has no plot"

    # + mask: the masked preset is valid, and doctor says the runtime is there.
    venv.pip_install("+mask", f"{venv.wheel}[app,mask]")
    listed = venv.streamv2v("presets", *at_presets)
    assert listed.returncode == 0 and "room" in listed.stdout, listed.stderr
    assert "ai-edge-litert" not in listed.stderr, listed.stderr
