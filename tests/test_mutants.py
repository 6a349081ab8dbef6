"""The mutants files of `make mutants` (tests/mutants/*.toml) stay runnable: each breakage's `old`
text is found exactly once in its file and its tests exist, so a change to the code that moves
a mutant's text is caught here, by `make test`, not at the next `make mutants`. (Running the
mutants is `make mutants`: minutes, not part of the suite.)"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_SPEC = importlib.util.spec_from_file_location("mutants_run", ROOT / "tests" / "mutants" / "run.py")
run = sys.modules["mutants_run"] = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(run)


def test_every_mutant_applies_once_and_names_tests_that_exist():
    mutants = run.read_mutants(sorted((ROOT / "tests" / "mutants").glob("*.toml")))
    assert mutants
    for m in mutants:
        text = (ROOT / m.file).read_text()
        assert text.count(m.old) == 1, f"{m.name}: `old` occurs {text.count(m.old)} times"
        for test in m.tests:
            path, _, name = test.partition("::")
            assert (ROOT / path).is_file(), f"{m.name}: no test file {path}"
            function = re.sub(r"\[.*\]$", "", name.split("::")[-1])
            if function:
                source = (ROOT / path).read_text()
                assert f"def {function}(" in source, f"{m.name}: no test {test}"


def test_a_bad_mutants_file_is_refused_naming_the_entry(tmp_path, capsys):
    entry = 'name = "x"\nfile = "a.py"\nold = "a"\nnew = "b"\ntests = ["t.py"]\nwhy = "w"\n'
    good = tmp_path / "good.toml"
    good.write_text(f"[[mutant]]\n{entry}")
    twice = tmp_path / "twice.toml"
    twice.write_text(f"[[mutant]]\n{entry}")
    missing = tmp_path / "missing.toml"
    missing.write_text('[[mutant]]\nname = "y"\nfile = "a.py"\n')
    with pytest.raises(run.MutantError, match=r"'x' is also in good\.toml"):
        run.read_mutants([good, twice])
    with pytest.raises(run.MutantError, match=r"missing\.toml mutant #1 \(y\): missing \['old'"):
        run.read_mutants([missing])
    assert run.main([str(good), "--only", "nope"]) == 2
    assert "no mutant named ['nope']" in capsys.readouterr().err
    assert run.main([str(good), "--list"]) == 0
    assert "x  (good.toml: a.py)" in capsys.readouterr().out
