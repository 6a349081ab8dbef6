"""``streamv2v translate`` and ``demo`` with real parts: OpenCV video files and the tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from daemon.cli import main
from daemon.dataplane.video import VideoReader, VideoWriter

REPO_ROOT = Path(__file__).resolve().parents[1]
CLIP_FPS = 16
CLIP_FRAMES = 32  # 2 seconds
CLIP_SIZE = (96, 80)  # width, height: deliberately not the engine's size or aspect


def write_clip(path: Path, frames: int = CLIP_FRAMES) -> Path:
    """A clip of a white rectangle moving across a dark-blue background, written by OpenCV."""
    width, height = CLIP_SIZE
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), CLIP_FPS, CLIP_SIZE)
    assert writer.isOpened()
    for i in range(frames):
        frame = np.zeros((height, width, 3), np.uint8)
        frame[:] = (90, 30, 10)  # BGR
        x = 2 * i
        frame[20:50, x : x + 20] = 255
        writer.write(frame)
    writer.release()
    return path


def read_frames(path: Path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_clip(tmp_path_factory.mktemp("clip") / "clip.mp4")
    assert len(read_frames(path)) == CLIP_FRAMES  # the round trip the tests rely on
    return path


def translate_argv(source: Path, output: Path, model: Path | str, *extra: str) -> list[str]:
    return [
        "translate",
        str(source),
        str(output),
        "--prompt",
        "x",
        "--model",
        str(model),
        "--vae",
        "model",
        "--size",
        "64x64",
        "--steps",
        "3",
        *extra,
    ]


def single_error_line(stderr: str) -> str:
    """The one ``streamv2v: error:`` line of a failed run (progress bars aside)."""
    errors = [line for line in stderr.splitlines() if line.startswith("streamv2v: error: ")]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr
    return errors[0]


@pytest.mark.parametrize("suffix", [".mp4", ".avi", ".mkv"])
def test_video_files_hold_rgb_frames_both_ways(tmp_path: Path, suffix: str) -> None:
    red = np.zeros((48, 64, 3), np.uint8)
    red[..., 0] = 220  # RGB red: OpenCV's BGR order must be converted on write and on read
    path = tmp_path / f"red{suffix}"
    with VideoWriter(path, 10, (64, 48)) as writer:
        for _ in range(3):
            writer.write(red)
        with pytest.raises(ValueError, match="does not fit"):
            writer.write(np.zeros((64, 64, 3), np.uint8))  # OpenCV would drop it silently

    with VideoReader(path) as reader:
        frames = list(reader)
        assert (reader.size, reader.fps) == ((64, 48), pytest.approx(10))

    assert len(frames) == 3
    red_mean, green_mean, blue_mean = frames[0].reshape(-1, 3).mean(axis=0)
    assert red_mean > 180
    assert green_mean < 40
    assert blue_mean < 40
    if suffix == ".mkv":  # FFV1: lossless, the frames come back bit for bit
        assert all(np.array_equal(f, red) for f in frames)


@pytest.mark.parametrize(
    ("suffix", "extra"),
    [(".mp4", ()), (".mp4", ("--no-stream-batch",)), (".avi", ())],
    ids=["mp4-stream-batch", "mp4-no-stream-batch", "avi-stream-batch"],
)
def test_translate_writes_one_engine_sized_frame_per_input_frame(
    clip: Path,
    tiny_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    suffix: str,
    extra: tuple[str, ...],
) -> None:
    output = tmp_path / f"out{suffix}"

    assert main(translate_argv(clip, output, tiny_model, *extra)) == 0

    frames = read_frames(output)
    assert len(frames) == CLIP_FRAMES
    assert {frame.shape for frame in frames} == {(64, 64, 3)}
    assert np.std(np.stack(frames)) > 1.0  # real decoded images, not a blank or constant video
    capture = cv2.VideoCapture(str(output))
    assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(CLIP_FPS, rel=0.01)
    capture.release()
    assert f"{CLIP_FRAMES} frames" in capsys.readouterr().out


def test_without_a_model_and_no_cached_sd15_the_shipped_style_model_is_used(
    clip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    output = tmp_path / "out.mp4"
    argv = ["translate", str(clip), str(output), "--prompt", "a warm scene", "--steps", "1"]
    assert main(argv) == 0
    assert "using the built-in tiny style model" in capsys.readouterr().err
    frames = read_frames(output)
    assert len(frames) == CLIP_FRAMES and frames[0].shape == (128, 128, 3)  # its trained size


def test_missing_input_is_one_clear_error_naming_the_file(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-such-clip.mp4"

    assert main(translate_argv(missing, tmp_path / "out.mp4", tiny_model)) == 2

    assert str(missing) in single_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out.mp4").exists()


def test_undecodable_input_is_one_clear_error(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    not_a_video = tmp_path / "notes.mp4"
    not_a_video.write_text("this is not a video")

    assert main(translate_argv(not_a_video, tmp_path / "out.mp4", tiny_model)) == 2

    line = single_error_line(capsys.readouterr().err)
    assert "cannot decode" in line
    assert str(not_a_video) in line


def test_missing_output_folder_is_one_clear_error(
    clip: Path, tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "missing-dir" / "out.mp4"

    assert main(translate_argv(clip, output, tiny_model)) == 2

    assert str(output.parent) in single_error_line(capsys.readouterr().err)


def test_unknown_output_extension_is_one_clear_error(
    clip: Path, tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(translate_argv(clip, tmp_path / "out.webm", tiny_model)) == 2

    line = single_error_line(capsys.readouterr().err)
    assert ".webm" in line
    assert ".mp4" in line  # says what would work


def test_output_over_the_input_is_refused(
    clip: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    size_before = clip.stat().st_size

    assert main(translate_argv(clip, clip, tiny_model)) == 2

    assert "overwrite the input" in single_error_line(capsys.readouterr().err)
    assert clip.stat().st_size == size_before


def test_missing_model_is_one_clear_error_naming_the_model(
    clip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "no-such-model"

    assert main(translate_argv(clip, tmp_path / "out.mp4", model)) == 2

    assert str(model) in single_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out.mp4").exists()  # no empty video left behind


def test_bad_steps_names_the_setting_before_any_model_loads(
    clip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The model does not exist either: the cheap value check must answer first.
    argv = translate_argv(clip, tmp_path / "out.mp4", tmp_path / "no-such-model", "--steps", "0")

    assert main(argv) == 2

    line = single_error_line(capsys.readouterr().err)
    assert "steps" in line
    assert "no-such-model" not in line


def test_malformed_size_is_a_usage_error(
    clip: Path, tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = translate_argv(clip, tmp_path / "out.mp4", tiny_model, "--size", "big")

    assert main(argv) == 2

    assert "WIDTHxHEIGHT" in capsys.readouterr().err


def test_console_entry_point_exits_2_without_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "absent.mp4"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}

    argv = ["translate", str(missing), str(tmp_path / "out.mp4"), "--prompt", "x"]

    result = subprocess.run(
        [sys.executable, "-m", "daemon", *argv],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert str(missing) in single_error_line(result.stderr)


def test_demo_runs_the_pipeline_offline_into_a_video(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The tiny model is cached under the user cache dir: keep this test's cache in tmp_path.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    output = tmp_path / "demo.mp4"

    assert main(["demo", "--frames", "8", "--output", str(output)]) == 0

    frames = read_frames(output)
    assert len(frames) == 8
    assert frames[0].shape == (128, 128, 3)  # the shipped style model's own size
    out = capsys.readouterr().out
    assert "moving scene" in out and "built-in tiny style model" in out
    assert "median" in out
    # The style changes every quarter: warm (orange on brown), then cool (blue on navy).
    warm, cool = (frames[i][..., ::-1].reshape(-1, 3).mean(0) for i in (0, 2))  # BGR -> RGB
    assert warm[0] > warm[2] + 20 and cool[2] > cool[0] + 40, (warm, cool)
    assert not (tmp_path / "cache" / "streamv2v" / "tiny-model").exists()  # nothing built
