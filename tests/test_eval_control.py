"""``streamv2v eval --control``: the structure figure (edge F1 with and without a ControlNet)
from the command line, on the shipped tiny style model and its canny ControlNet."""

from __future__ import annotations

import pytest

from daemon.cli import main
from streamv2v.tiny.control import held_aside_clip
from tests.test_eval import table, write_clip

STYLE = ["--model", "tiny-styles", "--prompt", "a warm scene", "--strength", "0.8", "--steps", "1"]


@pytest.mark.slow
def test_eval_control_prints_and_plots_the_structure_with_and_without(tmp_path, capsys):
    source = write_clip(tmp_path / "held.mkv", held_aside_clip(8))
    report = tmp_path / "report.html"
    args = ["--control", "tiny-canny", "--variants", "off", "--skip", "2", "--report", str(report)]
    assert main(["eval", str(source), *STYLE, *args]) == 0
    out = capsys.readouterr().out
    rows = table(out)
    assert set(rows) == {"off", "off, no control"}, out
    on, off = rows["off"]["edge F1"], rows["off, no control"]["edge F1"]
    assert on >= off + 0.1, (on, off)  # the ControlNet keeps the shapes at strength 0.8
    assert "control: tiny-canny (canny) at 1, and off" in out
    page = report.read_text()
    assert "edge F1" in page and "off, no control" in page


def test_eval_control_needs_the_engine(tmp_path, capsys):
    source = write_clip(tmp_path / "held.mkv", held_aside_clip(6))
    code = main(["eval", str(source), "--output", str(source), "--control", "tiny-canny"])
    assert code == 2
    assert "--control runs the engine" in capsys.readouterr().err
