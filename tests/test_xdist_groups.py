"""The suite's own scheduling (tests/conftest.py) under two real xdist workers: a module whose
tests share a module-scoped fixture runs in one worker, so the fixture (in the suite: a compiled
engine, minutes of compiling) is built once. pytest 9.2 silently broke xdist's own grouping once;
this catches it again."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

PROBE = """
import os, time, pytest

@pytest.fixture(scope="module")
def built():
    with open(os.environ["BUILDS_FILE"], "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(0.5)
    return True

@pytest.mark.parametrize("i", range(4))
def test_uses_the_module_fixture(built, i):
    assert built

@pytest.mark.parametrize("i", range(8))
def test_spread(i):
    time.sleep(0.1)
"""


def test_a_module_fixture_is_built_once_under_two_workers(tmp_path):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_probe.py").write_text(PROBE)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    builds = tmp_path / "builds.txt"
    args = ["-m", "pytest", "-n", "2", "--dist", "loadgroup", "-p", "no:cacheprovider"]
    result = subprocess.run(
        [sys.executable, *args, "-v", "test_probe.py"],
        cwd=tmp_path,
        env={**os.environ, "BUILDS_FILE": str(builds)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "12 passed" in result.stdout
    workers = {line.split("]")[0] for line in result.stdout.splitlines() if "PASSED" in line}
    assert len(workers) == 2, result.stdout  # both workers ran tests...
    assert len(builds.read_text().split()) == 1, result.stdout  # ...the fixture was built once
