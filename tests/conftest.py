"""Shared fixtures: real tiny models saved to disk and loaded through from_pretrained."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# OpenMP threads that sleep instead of spinning while waiting: with spinning threads, any other
# process on these 2 cores slows each torch op by a scheduler tick (tests 30x slower).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny random-weight SD-family model folder (built once per test session)."""
    from streamv2v.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def frames() -> list[np.ndarray]:
    """Six distinct 72x96 RGB frames (non-square, so crop and resize are exercised)."""
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (72, 96, 3), dtype=np.uint8) for _ in range(6)]
