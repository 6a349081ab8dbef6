"""`streamv2v models pull|list|rm` against a real Hugging Face-compatible hub on 127.0.0.1
(tests/hub_server.py) that serves the shipped tiny style model's real files, plus large files
the engine never reads. The CLI runs as a child process with HF_ENDPOINT pointing at the hub
and HF_HOME in a temporary folder; bytes are counted on the server side."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hub_server import HubServer

from daemon.models.needs import FetchError, Need, select_files
from daemon.models.registry import tiny_styles_dir

MODEL, VAE = "test-org/tiny-sd", "test-org/tiny-vae"
#: What the engine loads from each served repository (the shipped model's real files).
WANTED = {
    MODEL: [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ],
    VAE: ["config.json", "diffusion_pytorch_model.safetensors"],
}
UNET = f"{MODEL}/unet/diffusion_pytorch_model.safetensors"


def sparse(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.truncate(size)


def build_repos(root: Path) -> dict[str, Path]:
    """The tiny model as a hub repository holds it, with what the engine must NOT fetch: the
    single-file checkpoints at the root, pickle and flax copies, fp16 variants, the safety
    checker (sparse files: large in the listing, no disk used)."""
    sd, vae = root / "sd", root / "vae"
    shutil.copytree(tiny_styles_dir(), sd)
    shutil.copytree(sd / "vae", vae)
    sparse(sd / "v1-5-pruned.ckpt", 900_000_000)
    sparse(sd / "v1-5-pruned-emaonly.safetensors", 400_000_000)
    sparse(sd / "safety_checker" / "model.safetensors", 300_000_000)
    (sd / "safety_checker" / "config.json").write_text("{}")
    (sd / "unet" / "diffusion_pytorch_model.bin").write_bytes(os.urandom(2_000_000))
    (sd / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(os.urandom(1_500_000))
    (sd / "text_encoder" / "flax_model.msgpack").write_bytes(os.urandom(500_000))
    (vae / "taesd_decoder.pth").write_bytes(os.urandom(1_000_000))
    gated = {"test-org/gated401": sd, "test-org/gated403": sd, "test-org/stalls": sd}
    return {MODEL: sd, VAE: vae, **gated}


@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> dict[str, Path]:
    return build_repos(tmp_path_factory.mktemp("hub"))


@pytest.fixture
def hub(repos):
    with HubServer(repos) as server:
        server.status = {"test-org/gated401": 401, "test-org/gated403": 403}
        server.stall_after = {"test-org/stalls": 64 * 1024}
        yield server


def config_file(folder: Path) -> Path:
    path = folder / "config.toml"
    path.write_text(
        f'[engine]\nmodel = "{MODEL}"\nloras = []\n[engine.settings]\nvae = "{VAE}"\n'
        '[presets]\nbundled = "demo"\n'
    )
    return path


def cli_env(hub: HubServer, home: Path, **extra: str) -> dict[str, str]:
    return hub.online_env(
        home, **{"HF_HUB_DOWNLOAD_TIMEOUT": "1", "HF_HUB_ETAG_TIMEOUT": "2", **extra}
    )


def models(*args: str, env: dict[str, str], **kw) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "daemon", "models", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wanted_bytes(repos: dict[str, Path]) -> dict[str, int]:
    return {f"{r}/{f}": (repos[r] / f).stat().st_size for r, files in WANTED.items() for f in files}


def test_pull_fetches_only_what_the_engine_loads_with_a_progress_bar(hub, repos, tmp_path):
    hub.rate_bps = 1_500_000  # ~2.7 s for the 4 MB: the bar draws several times
    home, cfg = tmp_path / "hf", config_file(tmp_path)
    env = cli_env(hub, home)
    out, err = models("pull", "--config", str(cfg), env=env).communicate(timeout=60)
    assert "10 files fetched (4.0 MB), 0 already there" in out, (out, err)
    # Exactly the files from_pretrained reads, each once: not the 1.6 GB of extras beside them.
    assert dict(hub.served) == wanted_bytes(repos)
    assert "B/s" in err and "100%" in err and err.count("%|") >= 3, err  # bytes, rate, ETA
    # The cache is huggingface_hub's own: its loaders find every part offline.
    from diffusers import AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    cache = home / "hub"
    local = {"cache_dir": cache, "local_files_only": True}
    UNet2DConditionModel.from_pretrained(MODEL, subfolder="unet", **local)
    CLIPTextModel.from_pretrained(MODEL, subfolder="text_encoder", **local)
    CLIPTokenizer.from_pretrained(MODEL, subfolder="tokenizer", **local)
    AutoencoderTiny.from_pretrained(VAE, **local)
    # A second pull finds everything and fetches nothing; list shows both; rm removes one.
    hub.served.clear()
    out, err = models("pull", "--config", str(cfg), env=env).communicate(timeout=60)
    assert "0 files fetched (0 B), 10 already there" in out and not hub.served, (out, err)
    offline = models("pull", "--config", str(cfg), env=dict(env, HF_HUB_OFFLINE="1"))
    listing, _ = models("list", env=env).communicate(timeout=60)
    out, err = offline.communicate(timeout=60)
    assert "all in the cache" in out and not hub.served, (out, err)
    lines = {ln.split()[0]: ln for ln in listing.splitlines()}
    assert "3.4 MB" in lines[MODEL] and "569.2 KB" in lines[VAE], listing
    out, _ = models("rm", VAE, env=env).communicate(timeout=60)
    assert f"removed {VAE} (569." in out and not (cache / "models--test-org--tiny-vae").exists()


def test_a_killed_pull_resumes_where_it_stopped(hub, repos, tmp_path):
    hub.rate_bps = 1_000_000
    env = cli_env(hub, tmp_path / "hf")
    cfg = config_file(tmp_path)
    proc = models("pull", "--config", str(cfg), env=env)
    blobs = tmp_path / "hf/hub/models--test-org--tiny-sd/blobs"

    def partial_bytes() -> int:
        return sum(p.stat().st_size for p in blobs.glob("*.incomplete"))

    try:
        deadline = time.monotonic() + 30
        while partial_bytes() < 1_000_000 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert partial_bytes() >= 1_000_000, proc.stderr.read() if proc.poll() else hub.served
    finally:
        proc.kill()  # SIGKILL, in the middle of the UNet's weights: no clean-up runs
        proc.communicate()
    partial = list(blobs.glob("*.incomplete"))
    assert len(partial) == 1
    kept = partial[0].stat().st_size
    assert 0 < kept < (repos[MODEL] / "unet/diffusion_pytorch_model.safetensors").stat().st_size
    first_run = hub.served[UNET]
    hub.rate_bps, hub.ranges = None, []
    out, err = models("pull", "--config", str(cfg), env=env).communicate(timeout=60)
    assert "fetched" in out, err
    size = wanted_bytes(repos)[UNET]
    # The second run asked for the rest only, and the server sent only the rest.
    assert (UNET, f"bytes={kept}-") in hub.ranges
    assert hub.served[UNET] - first_run == size - kept
    blob = tmp_path / "hf/hub/models--test-org--tiny-sd/snapshots"
    got = next(blob.rglob("diffusion_pytorch_model.safetensors")).read_bytes()
    assert got == (repos[MODEL] / "unet/diffusion_pytorch_model.safetensors").read_bytes()


def test_failures_are_one_line_and_exit_2(hub, tmp_path):
    cfg = config_file(tmp_path)
    cases = {
        "404": (["test-org/no-such-model"], {}, "not found on"),
        "401": (["test-org/gated401"], {}, "access refused"),
        "403": (["test-org/gated403"], {}, "access refused"),
        "stall": (["test-org/stalls"], {}, "stalled (nothing for 1 s"),
        "no network": ([], {"HF_ENDPOINT": "http://127.0.0.1:9"}, "cannot reach"),
        "offline": ([], {"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
    }
    procs = {}
    for name, (ids, extra, _) in cases.items():
        env = cli_env(hub, tmp_path / name, **extra)
        procs[name] = models("pull", *ids, "--config", str(cfg), env=env)
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        # One error line, last; before it at most the progress bar of a download that began.
        lines = [ln for ln in err.splitlines() if ln.strip() and "%|" not in ln]
        assert proc.returncode == 2, (name, out, err)
        assert len(lines) == 1 and lines[0].startswith("streamv2v: error: "), (name, err)
        assert err.rstrip().endswith(lines[0]) and cases[name][2] in lines[0], (name, lines[0])
        assert "Traceback" not in err


def test_a_too_small_disk_is_refused_before_the_first_byte(hub, tmp_path):
    """A 2 MB tmpfs as the cache (the models need 4 MB): refused up front, nothing fetched."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)]).returncode:
        pytest.skip("needs `mount -t tmpfs` (root) for a small disk")
    try:
        env = cli_env(hub, mount)
        proc = models("pull", "--config", str(config_file(tmp_path)), env=env)
        out, err = proc.communicate(timeout=60)
    finally:
        subprocess.run(["umount", str(mount)], check=True)
    assert proc.returncode == 2, (out, err)
    assert err.startswith("streamv2v: error: not enough disk space in") and err.count("\n") == 1
    assert "free some space, or point HF_HOME at a larger disk" in err
    assert not any(k.endswith(".safetensors") for k in hub.served)


# --------------------------------------------------------------------------- the selection
#: The stable-diffusion-v1-5 repository's layout (file sizes as the hub lists them, rounded).
SD15 = {
    "model_index.json": 541,
    "v1-5-pruned.ckpt": 7_703_807_346,
    "v1-5-pruned.safetensors": 7_703_324_286,
    "v1-5-pruned-emaonly.ckpt": 4_265_380_512,
    "v1-5-pruned-emaonly.safetensors": 4_265_146_304,
    "feature_extractor/preprocessor_config.json": 342,
    "safety_checker/config.json": 4_723,
    "safety_checker/model.safetensors": 1_215_981_830,
    "safety_checker/model.fp16.safetensors": 608_018_440,
    "safety_checker/pytorch_model.bin": 1_216_064_769,
    "scheduler/scheduler_config.json": 308,
    "text_encoder/config.json": 617,
    "text_encoder/model.safetensors": 492_265_168,
    "text_encoder/model.fp16.safetensors": 246_144_152,
    "text_encoder/pytorch_model.bin": 492_305_335,
    "text_encoder/flax_model.msgpack": 492_249_960,
    "tokenizer/merges.txt": 524_619,
    "tokenizer/special_tokens_map.json": 472,
    "tokenizer/tokenizer_config.json": 806,
    "tokenizer/vocab.json": 1_059_962,
    "unet/config.json": 743,
    "unet/diffusion_pytorch_model.safetensors": 3_438_167_536,
    "unet/diffusion_pytorch_model.fp16.safetensors": 1_719_125_304,
    "unet/diffusion_pytorch_model.bin": 3_438_375_973,
    "unet/diffusion_flax_model.msgpack": 3_438_110_013,
    "vae/config.json": 547,
    "vae/diffusion_pytorch_model.safetensors": 334_643_268,
    "vae/diffusion_pytorch_model.fp16.safetensors": 167_335_342,
    "vae/diffusion_pytorch_model.bin": 334_707_217,
}


def test_the_selection_takes_one_set_of_weights_per_part():
    repo = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    files = select_files(Need(repo, "pipeline"), SD15)
    assert [f for f in files if "safetensors" in f or f.endswith(".bin")] == [
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ]
    assert sum(SD15[f] for f in files) < 3.94e9 < sum(SD15.values()) / 10
    fp16 = select_files(Need(repo, "pipeline", own_vae=True, variant="fp16"), SD15)
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in fp16
    assert "vae/diffusion_pytorch_model.fp16.safetensors" in fp16
    assert not any(f.endswith((".bin", ".ckpt", ".msgpack")) for f in fp16)
    pickles = {k: v for k, v in SD15.items() if not k.startswith("unet/diffusion_pytorch_model.s")}
    with pytest.raises(FetchError, match=r"only pickle weights.*allow_pickle"):
        select_files(Need(repo, "pipeline"), pickles)
    assert "unet/diffusion_pytorch_model.bin" in select_files(
        Need(repo, "pipeline", allow_pickle=True), pickles
    )
    lora = {"README.md": 1, "pytorch_lora_weights.safetensors": 9, "checkpoint-5/x.safetensors": 9}
    assert select_files(Need("a/b", "lora"), lora) == ["pytorch_lora_weights.safetensors"]
    with pytest.raises(FetchError, match=r"no file 'other\.safetensors'"):
        select_files(Need("a/b", "lora", weight_name="other.safetensors"), lora)


def test_readiness_reports_rate_eta_and_compiling_estimates(caplog):
    import logging

    from daemon.models.progress import Readiness

    now = [1000.0]  # the readiness's clock: the test moves it
    ready = Readiness(log_every_s=0.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="streamv2v"):
        ready.begin(1_000_000, 2)
        ready.file("org/x/unet/w.safetensors", 900_000, 1)
        now[0] += 0.3
        ready.advance(300_000)
    snap = ready.snapshot()
    assert snap["phase"] == "download" and snap["bytes_done"] == 300_000
    # 300 kB in 0.3 s: 1 MB/s, so 0.7 s left for the other 700 kB.
    assert snap["rate_bps"] == pytest.approx(1e6) and snap["eta_s"] == pytest.approx(0.7)
    assert "models: 300.0 KB of 1.0 MB (1/2: org/x/unet/w.safetensors)" in caplog.text
    # The connection slows to 10 kB/s: after the rate window (5 s) the estimate is that rate,
    # not the average since the start (38 kB/s).
    for _ in range(10):
        now[0] += 1.0
        ready.advance(10_000)
    snap = ready.snapshot()
    assert snap["rate_bps"] == pytest.approx(10_000) and snap["eta_s"] == pytest.approx(60.0)
    with caplog.at_level(logging.INFO, logger="streamv2v"):
        ready.compiling(2, 5, now[0] - 10.0)  # 2 done in 10 s: 3 left, 15 s
    snap = ready.snapshot()
    assert snap["phase"] == "compiling" and snap["done"] == 2 and snap["total"] == 5
    assert snap["eta_s"] == 15.0
    assert "engine: compiling 3 of 5, about 15 s left" in caplog.text
    ready.clear()
    assert ready.snapshot() is None


def test_needs_name_every_lora_controlnet_and_depth_model_the_presets_read():
    """What `models pull` fetches with no argument: the model, each preset's LoRAs, and each
    ControlNet with its depth preprocessor's model (local folders and files need no fetch)."""
    from daemon.models.needs import needs_of
    from streamv2v import EngineConfig
    from streamv2v.config import ControlSpec, LoraSpec

    canny = ControlSpec(model="lllyasviel/sd-controlnet-canny", preprocess="canny")
    depth = ControlSpec(
        model="lllyasviel/sd-controlnet-depth",
        preprocess="depth",
        depth_model="depth-anything/Depth-Anything-V2-Small-hf",
    )
    configs = [
        EngineConfig(control=[canny]),
        EngineConfig(
            control=[depth],
            loras=[LoraSpec(id="a/ink", weight_name="ink.safetensors"), LoraSpec(id="./x.st")],
        ),
    ]
    found = {(n.repo, n.kind, n.weight_name) for n in needs_of("sd/base", configs)}
    assert found == {
        ("sd/base", "pipeline", None),
        ("madebyollin/taesd", "component", None),  # the default VAE
        ("lllyasviel/sd-controlnet-canny", "component", None),
        ("lllyasviel/sd-controlnet-depth", "component", None),
        ("depth-anything/Depth-Anything-V2-Small-hf", "component", None),
        ("a/ink", "lora", "ink.safetensors"),
    }
    # A transformers depth model's folder: its configs and model.safetensors, not the pickle.
    files = {"config.json": 1, "preprocessor_config.json": 1, "model.safetensors": 9,
             "pytorch_model.bin": 9, "README.md": 1}  # fmt: skip
    picked = select_files(Need("depth-anything/Depth-Anything-V2-Small-hf", "component"), files)
    assert sorted(picked) == ["config.json", "model.safetensors", "preprocessor_config.json"]
