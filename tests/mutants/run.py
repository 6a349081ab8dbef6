"""`make mutants`: break the code on purpose, one named breakage at a time, and check that the
tests that claim to guard it fail.

Each ``tests/mutants/*.toml`` lists mutants::

    [[mutant]]
    name = "kebab-case-name"        # unique over all the files
    file = "streamv2v/x.py"         # repo-relative
    old = "text that occurs exactly once in the file"
    new = "the broken replacement"
    tests = ["tests/test_x.py::test_y"]   # pytest node ids or files
    why = "what the breakage does"

The tree (tracked and untracked-not-ignored files) is copied to a scratch folder once; for each
mutant the replacement is applied there, only its tests run (this interpreter, ``-x -q``, the
scratch first on PYTHONPATH), and the file is restored. A mutant is *killed* when its tests fail,
*survived* when they pass; a mutant whose ``old`` is not found exactly once, or whose tests do not
collect, is an *error*. The exit status is non-zero when any mutant survived or errored.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
FOLDER = Path(__file__).resolve().parent
FIELDS = ("name", "file", "old", "new", "tests", "why")
#: pytest's exit codes: 1 tests failed, 2 interrupted (a collection error: the mutant broke an
#: import); 3 internal error, 4 usage error (a node id not found), 5 no tests collected.
KILLED_CODES = {1, 2}


class MutantError(Exception):
    """A mutants file or entry that can not be run as written."""


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    why: str
    source: str  # the .toml it came from


def read_mutants(paths: list[Path]) -> list[Mutant]:
    """Every mutant of ``paths``, checked for the fields and for unique names."""
    out: list[Mutant] = []
    seen: dict[str, str] = {}
    for path in paths:
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise MutantError(f"{path}: {err}") from None
        entries = data.get("mutant", [])
        if not isinstance(entries, list) or not entries:
            raise MutantError(f"{path}: no [[mutant]] entries")
        for i, entry in enumerate(entries):
            where = f"{path.name} mutant #{i + 1} ({entry.get('name', '?')})"
            missing = [f for f in FIELDS if f not in entry]
            extra = sorted(set(entry) - set(FIELDS))
            if missing or extra:
                raise MutantError(f"{where}: missing {missing}, unknown {extra}; fields: {FIELDS}")
            tests = entry["tests"]
            if isinstance(tests, str) or not tests or not all(isinstance(t, str) for t in tests):
                raise MutantError(f"{where}: tests must be a non-empty list of node ids")
            if entry["old"] == entry["new"]:
                raise MutantError(f"{where}: old and new are the same text")
            name = entry["name"]
            if name in seen:
                raise MutantError(f"{where}: the name {name!r} is also in {seen[name]}")
            seen[name] = path.name
            out.append(Mutant(**{f: entry[f] for f in FIELDS if f != "tests"},
                              tests=tuple(tests), source=path.name))  # fmt: skip
    return out


def copy_tree(dest: Path) -> int:
    """Copy the working tree's tracked and untracked-not-ignored files to ``dest``."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    n = 0
    for raw in filter(None, listed):
        rel = os.fsdecode(raw)
        src, dst = ROOT / rel, dest / rel
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the working tree, not yet in git
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dst.symlink_to(os.readlink(src))
        elif src.is_file():
            shutil.copy2(src, dst)
        n += 1
    return n


def scratch_env(scratch: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(scratch), env.get("PYTHONPATH")]))
    # No .pyc: a mutant and its restored original can share a size and an mtime second, and a
    # stale cached module would then run the mutant's code in the next mutant's tests.
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def check_imports(scratch: Path, env: dict[str, str]) -> None:
    """The scratch copy's packages are the ones imported (not an installed or editable one)."""
    code = "import daemon, streamv2v; print(daemon.__file__); print(streamv2v.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=scratch, env=env, capture_output=True, text=True
    )
    files = out.stdout.split()
    if out.returncode != 0 or not all(Path(f).is_relative_to(scratch) for f in files):
        raise MutantError(f"the scratch copy's packages are not the ones imported: {out}")


def run_one(mutant: Mutant, scratch: Path, env: dict[str, str], timeout: float, verbose: bool):
    """Apply, run the tests, restore: ('killed'|'survived'|'error', seconds, detail)."""
    target = scratch / mutant.file
    if not target.is_file():
        return "error", 0.0, f"no file {mutant.file}"
    original = target.read_text()
    count = original.count(mutant.old)
    if count != 1:
        return "error", 0.0, f"`old` occurs {count} times in {mutant.file} (must be once)"
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests]
    target.write_text(original.replace(mutant.old, mutant.new))
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            cmd, cwd=scratch, env=env, capture_output=True, text=True, timeout=timeout
        )
        code, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        code, output = None, f"timed out after {timeout:.0f} s\n{err.stdout or ''}"
    finally:
        target.write_text(original)
    took = time.monotonic() - t0
    tail = "\n".join(output.strip().splitlines()[-15:])
    if verbose:
        print(output)
    if code is None:
        return "killed", took, "the tests hung (timeout)"
    if code in KILLED_CODES:
        summary = output.strip().splitlines()[-1] if output.strip() else ""
        return "killed", took, summary
    if code == 0:
        return "survived", took, "the tests passed with the breakage in place"
    return "error", took, f"pytest exit {code}:\n{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="mutants files (default: all)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="run only this mutant (repeatable)")  # fmt: skip
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant")
    parser.add_argument("-v", "--verbose", action="store_true", help="print pytest's output")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy")
    args = parser.parse_args(argv)

    try:
        mutants = read_mutants(args.files or sorted(FOLDER.glob("*.toml")))
    except MutantError as err:
        print(f"mutants: {err}", file=sys.stderr)
        return 2
    unknown = sorted(set(args.only) - {m.name for m in mutants})
    if unknown:
        print(f"mutants: no mutant named {unknown}; see --list", file=sys.stderr)
        return 2
    if args.only:
        mutants = [m for m in mutants if m.name in args.only]
    if args.list:
        for m in mutants:
            print(f"{m.name}  ({m.source}: {m.file})\n    {m.why}\n    {' '.join(m.tests)}")
        return 0

    start = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="streamv2v-mutants-"))
    results = []
    try:
        copied = copy_tree(scratch)
        env = scratch_env(scratch)
        check_imports(scratch, env)
        print(f"{len(mutants)} mutants; {copied} files copied to {scratch}", flush=True)
        for m in mutants:
            outcome, took, detail = run_one(m, scratch, env, args.timeout, args.verbose)
            results.append((m, outcome, took))
            print(f"{outcome.upper():9s} {took:6.1f} s  {m.name}: {detail}", flush=True)
    except MutantError as err:
        print(f"mutants: {err}", file=sys.stderr)
        return 2
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    total = time.monotonic() - start
    counts = {k: sum(o == k for _, o, _ in results) for k in ("killed", "survived", "error")}
    print(
        f"\n{counts['killed']} killed, {counts['survived']} survived, {counts['error']} errors "
        f"in {total:.0f} s"
    )
    for m, outcome, _ in results:
        if outcome != "killed":
            print(f"  {outcome}: {m.name} ({m.source}): {m.why}")
    return 0 if counts["killed"] == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
