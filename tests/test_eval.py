"""``streamv2v eval`` on the shipped tiny style model: the acceptance figures of the stable bank
mode on the witness clips, a finished translation read back, and the errors of bad input."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.cli import main
from daemon.dataplane.video import VideoWriter
from streamv2v.scenes import SIZE, witness_clips

ROOT = Path(__file__).resolve().parents[1]
#: The witness (bench/temporal.py's): 48 frames, one step at the demo presets' strength.
STYLE = ["--model", "tiny-styles", "--prompt", "a warm scene", "--strength", "0.3", "--steps", "1"]


def write_clip(path: Path, frames) -> Path:
    with VideoWriter(path, 15, (SIZE, SIZE)) as writer:  # .mkv: lossless, the frames as made
        for f in frames:
            writer.write(f)
    return path


@pytest.fixture(scope="module")
def witness(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("witness")
    return {
        name.split()[0]: write_clip(folder / f"{name.split()[0]}.mkv", clip)
        for name, clip in witness_clips(48).items()
    }


def table(stdout: str) -> dict[str, dict[str, float | None]]:
    """The figures `streamv2v eval` prints, by variant and column ('-' is None)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("variant"))
    header = re.split(r"\s{2,}", lines[start].strip())
    rows = {}
    for line in lines[start + 1 :]:
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) != len(header):
            break
        rows[cells[0]] = {
            h: None if c == "-" else float(c.rstrip("x%")) for h, c in zip(header[1:], cells[1:])
        }
    return rows


@pytest.mark.parametrize("clip", ["static", "moving"])
def test_the_stable_bank_has_no_update_pulse_and_flickers_no_more_than_no_bank(
    witness, clip, tmp_path, capsys
):
    report = tmp_path / "report.html"
    code = main(["eval", str(witness[clip]), *STYLE, "--variants", "off,stable", "--report",
                 str(report)])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    figures = table(out)
    off, stable = figures["off"], figures["stable"]
    assert stable["MAD after update"] <= 1.2 * stable["MAD other"], figures
    assert stable["MAD"] <= off["MAD"], figures
    assert off["MAD after update"] is None  # no bank: no update to split at
    assert stable["warp error"] is not None and stable["FF pass"] > 50
    # The structure figure: at strength 0.3 the tiny model alone keeps few of the shapes' edges.
    assert 0.0 <= off["edge F1"] < 0.5 and 0.0 <= stable["edge F1"] < 0.5, figures
    assert "edge F1" in report.read_text() and "within 2 px" in report.read_text()
    text = report.read_text()
    assert text.count("data:image/png;base64,") == 2 + 2 * 2  # summary plot and strip, each
    assert f"wrote the report to {report}" in out


def test_a_finished_translation_measures_as_the_same_run_does(tmp_path, capsys):
    source = write_clip(tmp_path / "clip.mkv", witness_clips(12)["moving"])
    translated = tmp_path / "warm.mkv"
    assert main(["translate", str(source), str(translated), *STYLE]) == 0
    capsys.readouterr()
    assert main(["eval", str(source), "--output", str(translated)]) == 0
    read_back = table(capsys.readouterr().out)["warm.mkv"]
    assert main(["eval", str(source), *STYLE, "--variants", "stable"]) == 0  # translate's bank
    ran = table(capsys.readouterr().out)["stable"]
    assert read_back["MAD"] == ran["MAD"] and read_back["warp error"] == ran["warp error"]
    assert read_back["edge F1"] == ran["edge F1"]
    assert read_back["MAD after update"] is None  # a file does not say when the bank updated


def test_a_preset_gives_the_style_and_its_settings(witness, capsys):
    # The bundled demo preset "warm": the tiny model's prompt at strength 0.8, 1 step.
    args = ["--preset", "warm", "--model", "tiny-styles", "--frames", "8", "--variants", "stable"]
    assert main(["eval", str(witness["moving"]), *args]) == 0
    out = capsys.readouterr().out
    assert "style: preset warm" in out and "strength: 0.8" in out and "steps: 1" in out
    assert table(out)["stable"]["MAD"] > 0


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args], capture_output=True, text=True, cwd=ROOT
    )


def test_a_missing_or_unreadable_input_is_one_clear_error_and_exit_2(tmp_path):
    missing = run_cli("eval", str(tmp_path / "nope.mkv"), "--prompt", "a warm scene")
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"streamv2v: error: input video not found: {tmp_path}/nope.mkv"
    garbage = tmp_path / "notes.mp4"
    garbage.write_text("not a video")
    unreadable = run_cli("eval", str(garbage), "--prompt", "a warm scene")
    assert unreadable.returncode == 2
    assert "cannot decode input video" in unreadable.stderr and "Traceback" not in unreadable.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prompt", "x", "--variants", "off,bogus"], "unknown variant(s) bogus"),
        (["--prompt", "x", "--output", "y.mkv"], "give one of --prompt or --preset"),
        ([], "give one of --prompt or --preset"),
        (["--prompt", "x", "--report", "r.pdf"], "use a .html"),
        (["--preset", "no-such-style"], "no preset named 'no-such-style'; there are:"),
    ],
)
def test_bad_options_are_refused_before_any_work(witness, extra, message, capsys):
    assert main(["eval", str(witness["moving"]), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
