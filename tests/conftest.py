"""Shared fixtures: real tiny models saved to disk and loaded through from_pretrained."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import pyvirtualcam

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Offline by default, in this process and every process a test starts (they inherit the
# environment): a regression that reaches for the hub fails at once instead of trying the network,
# and no test reads or fills the user's hub cache. Set here, before huggingface_hub is imported
# (it reads both once). The tests of the local hub (tests/hub_server.py) opt back in for their
# own processes with HubServer.online_env.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="streamv2v-test-hf-")
atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)
# OpenMP threads that sleep instead of spinning while waiting: with spinning threads, any other
# process on these 2 cores slows each torch op by a scheduler tick (tests 30x slower).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Under xdist the two workers share the two cores: one intra-op thread each (before torch is
# imported), or torch's two threads per worker oversubscribe them and the timing-bound tests
# (output rate, remote switch) see the other worker's load as scheduling delays. The tiny
# models' ops are too small to gain from a second thread anyway (see one_torch_thread).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config: pytest.Config) -> None:
    """One inductor cache for the whole run, shared by the xdist workers (they inherit the
    environment), so two compile tests of one graph compile it once; never the user's cache."""
    if "PYTEST_XDIST_WORKER" not in os.environ and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="streamv2v-inductor-")


def _group_of(item: pytest.Item) -> str | None:
    """The xdist group a test must run in (one worker, in order), or None to spread it.

    Tests of a module that uses a module-scoped fixture stay together, so the fixture (a compiled
    engine, a server, a browser) is built once; tests that start a real OBS (under
    ``xvfb-run -a``, whose free-display search races with a second one) run one after another."""
    module = getattr(item, "module", None)
    if module is not None and any(
        getattr(value, "__module__", None) == "obs_helpers" for value in vars(module).values()
    ):
        return "obs"
    info = getattr(item, "_fixtureinfo", None)
    for defs in info.name2fixturedefs.values() if info else ():
        if any(d.scope == "module" for d in defs):
            return item.nodeid.split("::")[0]
    return None


def _suffix_group(item: pytest.Item, group: str) -> None:
    """xdist's loadgroup scheduler groups by an ``@group`` suffix of the node id, which
    pytest-xdist 3.8 writes into ``item._nodeid``; pytest 9.2 derives ``nodeid`` from ``_id``
    instead, so the suffix is lost and a group's tests (and their module fixtures: a compiled
    engine built twice, ~5 min of both cores) spread over the workers. Set it where pytest reads
    it (xdist's own write then changes nothing). Older pytest: xdist's write works, no-op here."""
    if "_id" not in getattr(type(item), "__slots__", ()) and not hasattr(item, "_id"):
        return
    from _pytest.nodeid import coerce_node_id

    if "@" not in item.nodeid.rpartition("]")[2]:
        item._id = coerce_node_id(f"{item.nodeid}@{group}")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The xdist groups of :func:`_group_of`, and the slow units first (so the workers of
    ``-n 2 --dist loadgroup`` finish together instead of one starting a long test at the end).
    A group stays contiguous, so its module fixtures are built once in a plain run too."""
    units: dict[str, list[pytest.Item]] = {}
    on_worker = bool(config.getoption("loadgroup", default=False))  # xdist worker, loadgroup
    for item in items:
        mark = item.get_closest_marker("xdist_group")  # a module's own (the compile tests)
        group = mark.args[0] if mark is not None and mark.args else _group_of(item)
        if group is not None and mark is None:
            item.add_marker(pytest.mark.xdist_group(group))
        if group is not None and on_worker:
            _suffix_group(item, group)
        units.setdefault(group or item.nodeid, []).append(item)
    ordered = sorted(
        units.values(),
        key=lambda unit: all(i.get_closest_marker("slow") is None for i in unit),  # stable
    )
    items[:] = [item for unit in ordered for item in unit]


@pytest.fixture(autouse=True)
def private_user_dirs(tmp_path_factory, monkeypatch) -> Path:
    """Every test (and every daemon it starts) gets its own user config/runtime dirs, so the
    control file, user presets and config of the machine's user are never read or written."""
    home = tmp_path_factory.mktemp("xdg")
    for var, sub in (("XDG_CONFIG_HOME", "config"), ("XDG_RUNTIME_DIR", "run")):
        (home / sub).mkdir(mode=0o700)
        monkeypatch.setenv(var, str(home / sub))
    return home / "config"


@pytest.fixture
def one_torch_thread():
    """Run a test's torch ops on one thread. The tiny models' ops are so small that a second
    intra-op thread costs more than it gains: hundreds of frames run ~2.5x faster on one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny random-weight SD-family model folder (built once per test session)."""
    from streamv2v.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def cheap_inductor():
    """Inductor's cheapest correct CPU build for the compile tests (module scope: their engines
    compile in module fixtures and must not recompile in the tests).

    Compiling on the CPU is test scaffolding here (``compile = "auto"`` is off on the CPU; users
    compile on CUDA, where inductor writes Triton): the tests check our side of the compiled path
    (what is traced, warmed, guarded, never recompiled, and equal to eager), which does not
    depend on how inductor builds its C++. Its default build was the suite's largest single cost:
    the compile group's first fixture took 208 s alone (290 s of CPU) on this 2-core box, 175 s
    of it in 155 g++ runs at -O3 (one per kernel, ~1 s each even with the precompiled header).
    Here: the C++ wrapper (the kernels of a graph in one translation unit: 11 g++ runs), -O0
    (``TORCHINDUCTOR_DEBUG_COMPILE``, which also adds the wrapper's shape/stride checks), scalar
    kernels (``simdlen = 1``: less code to generate and build) and compiling in-process (no pool
    of compile workers to start): the same fixture took 110 s. Outputs are still compared with
    the eager engine at the same tolerance."""
    import torch._inductor.config as inductor

    with pytest.MonkeyPatch.context() as env:
        env.setenv("TORCHINDUCTOR_DEBUG_COMPILE", "1")  # read by cpp_builder at each build
        with inductor.patch({"cpp_wrapper": True, "cpp.simdlen": 1, "compile_threads": 1}):
            yield


@pytest.fixture
def frames() -> list[np.ndarray]:
    """Six distinct 72x96 RGB frames (non-square, so crop and resize are exercised)."""
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (72, 96, 3), dtype=np.uint8) for _ in range(6)]


class MemoryCamera:
    """A pyvirtualcam backend that keeps what it is sent (frames and their arrival times)."""

    instances: ClassVar[list[MemoryCamera]] = []

    def __init__(self, *, width, height, fps, fourcc, device, **kw):
        self.width, self.height, self.fps = width, height, fps
        self.frames: list[np.ndarray] = []
        self.times: list[float] = []
        self.closed = False
        self._device = device or "/dev/video-memory"
        self._lock = threading.Lock()
        MemoryCamera.instances.append(self)

    def send(self, frame: np.ndarray) -> None:
        with self._lock:
            self.times.append(time.monotonic())
            if len(self.frames) < 5000:
                self.frames.append(frame.copy())

    def close(self) -> None:
        self.closed = True

    def device(self) -> str:
        return self._device

    def native_fourcc(self):
        return None


@pytest.fixture
def memory_vcam():
    """Replace pyvirtualcam's default Linux backend with MemoryCamera for one test."""
    name = "v4l2loopback"
    original = pyvirtualcam.camera.BACKENDS.get(name)
    MemoryCamera.instances.clear()
    pyvirtualcam.register_backend(name, MemoryCamera)
    yield MemoryCamera
    if original is not None:
        pyvirtualcam.register_backend(name, original)
