"""Every optional extra stands alone: with aiortc/av, matplotlib and ai-edge-litert all made
unimportable (as in an install with ``[app]`` only), the CLI, the config and every daemon module
but the remote engine's own still import, and each feature of a missing extra is refused in one
line naming the extra and its install command. tests/test_install.py checks the same on the
real wheel in a clean venv (slow); this runs in a few seconds in one child process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = ("aiortc", "av", "matplotlib", "ai_edge_litert")
#: The remote engine's own modules: they may need the `remote` extra (aiortc/av) at import, as
#: only `serve` and `[engine] remote` import them (after checking it is there).
NEEDS_REMOTE = {
    "daemon.remote.protocol",
    "daemon.remote.client",
    "daemon.remote.server",
    "daemon.remote.session",
    # `serve`'s browser ways (WHIP/WHEP, the encoded-packet relay, the page): serve imports them
    "daemon.remote.browser",
    "daemon.remote.page",
    "daemon.remote.relay",
    "daemon.remote.whep",
    "daemon.remote.whip",
    "daemon.remote.serve_main",  # serve() itself
}

CHILD = r"""
import contextlib, importlib, io, json, pkgutil, sys
import daemon
from daemon.cli import main  # the CLI and, with it, daemon.config

failed = {}
for info in pkgutil.walk_packages(daemon.__path__, "daemon."):
    if info.name == "daemon.__main__":  # runs the CLI
        continue
    try:
        importlib.import_module(info.name)
    except ImportError as err:
        failed[info.name] = getattr(err, "name", None) or str(err)

results = {}
for name, argv in json.loads(sys.argv[1]).items():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except BaseException as exc:  # what a user would see as a traceback
            code = f"raised {exc!r}"
    results[name] = [code, out.getvalue(), err.getvalue()]
print(json.dumps({"failed": failed, "results": results}), file=sys.__stdout__)
"""


@pytest.mark.slow
def test_without_the_optional_extras_the_cli_runs_and_names_each_missing_one(tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()  # the extras made unimportable in the child, as if not installed
    hide = "".join(f"sys.modules[{name!r}] = None\n" for name in HIDDEN)
    (shim / "sitecustomize.py").write_text(f"import sys\n{hide}")
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"")  # eval refuses --report before it reads the clip
    remote = ["--set", "engine.remote=http://127.0.0.1:9"]
    cases = {
        "help": ["doctor", "--help"],
        "doctor": ["doctor", "--json", *remote],
        "serve": ["serve"],
        "run": ["run", *remote, "--duration", "1"],
        "eval": ["eval", str(clip), "--output", str(clip), "--report", str(tmp_path / "r.html")],
    }
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), str(ROOT)])}
    env.update(HF_HUB_OFFLINE="1", XDG_STATE_HOME=str(tmp_path / "state"))
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(cases)], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    # Only the remote engine's modules may need an extra at import; the shim bites (protocol).
    assert set(found["failed"]) <= NEEDS_REMOTE, found["failed"]
    assert found["failed"].get("daemon.remote.protocol") == "aiortc", found["failed"]
    results = found["results"]
    assert results["help"][0] == 0, results["help"]

    def refused(case: str, extra: str, feature: str) -> None:
        code, _out, err = results[case]
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, (case, code, err)
        expected = f"{feature} needs the '{extra}' extra: pip install 'streamv2v[{extra}]'"
        assert lines[0] == f"streamv2v: error: {expected}", lines

    refused("serve", "remote", "`streamv2v serve`")
    refused("run", "remote", "[engine] remote")
    refused("eval", "eval", "`streamv2v eval --report`")
    code, out, err = results["doctor"]
    assert code == 1 and "Traceback" not in err, (code, err)  # FAILs (no camera here), no crash
    checks = {c["name"]: c for c in json.loads(out)}
    assert checks["remote engine"]["status"] == "FAIL", checks
    assert "needs the 'remote' extra" in checks["remote engine"]["detail"]
    for name, extra in (("remote extra", "remote"), ("eval extra", "eval")):
        assert checks[name]["status"] == "WARN", checks[name]
        assert checks[name]["fix"] == f"pip install 'streamv2v[{extra}]'", checks[name]
    assert checks["person mask"]["status"] == "WARN", checks["person mask"]
    assert "pip install 'streamv2v[mask]'" in checks["person mask"]["fix"]


def test_doctor_reports_each_installed_extra_with_its_versions():
    from daemon.config import DaemonConfig
    from daemon.doctor import check_extras, check_mask

    lines = {c.name: c for c in [*check_extras(DaemonConfig()), *check_mask(DaemonConfig())]}
    assert lines["remote extra"].status == "OK" and "aiortc " in lines["remote extra"].detail
    assert "av " in lines["remote extra"].detail
    assert lines["eval extra"].status == "OK" and "matplotlib " in lines["eval extra"].detail
    assert lines["person mask"].status == "OK", lines["person mask"]
