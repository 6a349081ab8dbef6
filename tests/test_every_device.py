"""Every op a frame runs has a kernel on CUDA, MPS and CPU.

A Linux build of torch knows no MPS kernels at run time, but the wheel ships the op table its
dispatcher was generated from (``torchgen/packaged/ATen/native/native_functions.yaml``): every
op's dispatch keys, MPS included. The test runs frames of the engine on the CPU (the feature bank
in every mode, a LoRA switch with text-encoder weights, two ControlNets with the canny and depth
preprocessors, guidance) under a ``TorchDispatchMode`` that records every aten op that reaches
the backends, and looks each one up in that table: an op passes with an MPS kernel, or with a
composite implementation (CompositeImplicitAutograd / CompositeExplicitAutograd: built from
other ops, on every device). ``torch.segment_reduce`` (CPU and CUDA only) is what the bank's
merge used before: the kind of op this test exists to catch.

The same recording checks two more things a Mac and a GPU need: no float64 tensor (MPS has no
float64) and, in steady-state frames, no op that waits for the device (``.item()``, ``nonzero``,
``bool(tensor)``...): the hot path stays free of host syncs.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from streamv2v import EngineConfig, StreamV2V
from streamv2v.testing import save_tiny_controlnet, save_tiny_depth_model
from tests.lora_helpers import lora_factors, write_diffusers

#: Composite implementations: built from other ops, so they run wherever those do.
COMPOSITE = {
    "CompositeImplicitAutograd",
    "CompositeExplicitAutograd",
    "CompositeExplicitAutogradNonFunctional",
}

#: Ops the recording may see that have no MPS kernel, each with why it is there and what runs
#: on MPS instead (the fallback must itself have an MPS kernel: the test checks it).
EXCEPTIONS: dict[str, tuple[str, str]] = {
    "_scaled_dot_product_flash_attention_for_cpu": (
        "not called by the engine: the CPU backend that F.scaled_dot_product_attention "
        "(CompositeImplicitAutograd) chooses on the CPU; on a Mac it chooses its own",
        "_scaled_dot_product_attention_math_for_mps",
    ),
}

#: Ops that make the host wait for the device (a value read back, or an output whose size
#: depends on values), by their table names.
SYNCS = {
    "_local_scalar_dense",
    "is_nonzero",
    "item",
    "equal",
    "nonzero",
    "masked_select",
    "unique_dim",
    "_unique2",
    "unique_consecutive",
    "repeat_interleave.Tensor",
    "repeat_interleave.self_Tensor",
}

#: Callers (``file:function``) whose sync-looking ops do not wait for a device, and why.
HOST_READS = {
    "streamv2v/similar.py:skip": "the similar-image filter decides on the host whether a frame "
    "is skipped: one scalar read per frame by design, only with similar_filter = true",
}


@functools.cache
def op_table() -> dict[str, dict]:
    """``name.overload`` (``name`` for the default overload) -> its entry in the installed
    torch's native_functions.yaml; parsed once per session (~0.6 s)."""
    import torchgen
    import yaml

    path = Path(torchgen.__file__).parent / "packaged/ATen/native/native_functions.yaml"
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    entries = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)
    table: dict[str, dict] = {}
    for entry in entries:
        table[entry["func"].split("(", 1)[0]] = entry
    for entry in entries:  # ops generated from another's entry (``autogen: a.out, b``)
        for name in str(entry.get("autogen", "")).split(","):
            if name.strip():
                table.setdefault(name.strip(), {"generated_from": entry})
    return table


def dispatch_keys(name: str) -> set[str]:
    """The dispatch keys with a kernel for op ``name``; ``structured_delegate`` followed, an
    entry with no dispatch section is CompositeImplicitAutograd (torchgen's rule), a generated
    op (``autogen``) has the keys of the op it was generated from."""
    entry = op_table().get(name)
    if entry is None:
        return set()
    if "generated_from" in entry:
        return dispatch_keys(entry["generated_from"]["func"].split("(", 1)[0])
    if "structured_delegate" in entry:
        return dispatch_keys(entry["structured_delegate"])
    dispatch = entry.get("dispatch")
    if dispatch is None:
        return {"CompositeImplicitAutograd"}
    return {key.strip() for keys in dispatch for key in keys.split(",")}


def runs_on_mps(name: str) -> bool:
    keys = dispatch_keys(name)
    return "MPS" in keys or bool(keys & COMPOSITE)


def table_name(op: torch._ops.OpOverload) -> str:
    packet = op._schema.name.removeprefix("aten::")
    return packet if op._overloadname == "default" else f"{packet}.{op._overloadname}"


def caller() -> str:
    """``file:function`` of the innermost Python frame outside torch (who asked for the op)."""
    import traceback

    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" not in frame.filename and frame.filename != __file__:
            parts = Path(frame.filename).parts
            return f"{'/'.join(parts[-2:])}:{frame.name}"
    return "?"


class OpRecorder(TorchDispatchMode):
    """Every aten op that reaches the backends (names as in the op table), the float64
    tensors seen, and (while ``watch_syncs``) the ops that would wait for the device."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, str] = {}  # table name -> the packet (for messages)
        self.float64: set[str] = set()
        self.syncs: set[str] = set()
        self.watch_syncs = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = table_name(func)
        self.ops.setdefault(name, func._schema.name)
        if self.watch_syncs and name in SYNCS and caller() not in HOST_READS:
            self.syncs.add(f"{name} in {caller()}")
        kwargs = kwargs or {}
        if func.has_kernel_for_dispatch_key(torch._C.DispatchKey.CompositeImplicitAutograd):
            with self:  # record the ops it is made of too (what a device really runs)
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        tensors = [
            t
            for t in (*args, *kwargs.values(), *(out if isinstance(out, tuple) else [out]))
            if isinstance(t, torch.Tensor)
        ]
        if any(t.dtype == torch.float64 for t in tensors):
            self.float64.add(name)
        return out


def test_the_op_table_reader_knows_mps_from_cpu_only_ops():
    """The reader against ops whose kernels are known: the bank's old segment_reduce and the
    CPU's SDPA backend have none on MPS; index_put_ (composite, over _index_put_impl_), add_
    (structured, delegated to add.out) and convolution (composite) run everywhere."""
    assert dispatch_keys("segment_reduce") == {"CPU", "CUDA"}
    assert not runs_on_mps("segment_reduce")
    assert not runs_on_mps("_scaled_dot_product_flash_attention_for_cpu")
    assert "MPS" in dispatch_keys("add_.Tensor")  # via structured_delegate add.out
    assert "MPS" in dispatch_keys("_index_put_impl_")
    assert runs_on_mps("index_put_") and runs_on_mps("convolution")
    assert runs_on_mps("linear")  # no dispatch section: CompositeImplicitAutograd
    assert runs_on_mps("_index_put_impl")  # generated (autogen) from _index_put_impl_
    assert dispatch_keys("no_such_op") == set()


@pytest.fixture(scope="module")
def parts(tiny_model, tmp_path_factory):
    """A canny ControlNet, a depth model, and a LoRA (UNet attention + convs, text encoder)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = tmp_path_factory.mktemp("every-device")
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    te = CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder")
    te_lora = lora_factors(te, seed=9, targets=["q_proj", "v_proj", "fc1"])
    return {
        "controlnet": save_tiny_controlnet(folder / "canny", tiny_model),
        "depth": save_tiny_depth_model(folder / "depth"),
        "lora": write_diffusers(folder / "style.safetensors", lora_factors(unet, seed=5), te_lora),
    }


def scenes(n: int) -> list[np.ndarray]:
    """Frames with shapes that move (so Canny finds edges and the bank sees change)."""
    out = []
    for i in range(n):
        f = np.full((64, 64, 3), 40, np.uint8)
        f[(7 * i) % 40 :][:20, 10:30] = (200, 90 + 20 * i, 60)
        f[40:60, (5 * i) % 50 :][:, :12] = (30, 160, 220)
        out.append(f)
    return out


def engine_configs(parts) -> list[EngineConfig]:
    """The bank in every mode, two ControlNets (canny, depth), guidance with and without a
    stream batch, the similar-image filter."""
    control = [
        {"model": str(parts["controlnet"]), "preprocess": "canny", "name": "edges"},
        {
            "model": str(parts["controlnet"]),
            "preprocess": "depth",
            "depth_model": str(parts["depth"]),
            "name": "depth",
        },
    ]
    common = {"vae": "model", "width": 64, "height": 64, "steps": 2}
    return [
        EngineConfig(**common, bank={"mode": "stable", "interval": 1}, control=control),
        EngineConfig(
            **common,
            bank={"mode": "dyme", "interval": 1, "max_frames": 2, "merge_ratio": 1 / 3},
            guidance="full",
            guidance_scale=1.5,
            stream_batch=False,
        ),
        EngineConfig(
            **common,
            bank={"mode": "fifo", "interval": 1, "max_frames": 2},
            guidance="self",
            guidance_scale=1.5,
            similar_filter=True,
        ),
    ]


@pytest.fixture(scope="module")
def recorded(tiny_model, parts) -> OpRecorder:
    """Each configuration loaded, a LoRA read, prompts encoded with and without its text-encoder
    part, and frames run with a LoRA switch between them, all under one recording (the last
    frames of each engine watched for syncs)."""
    recorder = OpRecorder()
    frames = scenes(6)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (the tiny models' ops: a second thread costs more than it gains)
    try:
        _record(recorder, tiny_model, parts, frames)
    finally:
        torch.set_num_threads(threads)
    return recorder


def _record(recorder: OpRecorder, tiny_model, parts, frames) -> None:
    for config in engine_configs(parts):
        engine = StreamV2V.from_pretrained(tiny_model, config=config, device="cpu")
        engine.adapters.load("style", parts["lora"])
        with recorder:
            engine.set_prompt_embeds(
                engine.encode_prompt("a glowing scene", loras={"style": 0.8}),
                engine.encode_prompt("a dull scene"),
            )
            for i, frame in enumerate(frames):
                if i == 2:
                    engine.set_loras({"style": 0.8})
                recorder.watch_syncs = i >= 3  # steady state: the bank full, the switch done
                engine(frame)
            recorder.watch_syncs = False
            engine.set_loras({})


@pytest.mark.slow
def test_every_op_of_a_frame_has_a_kernel_on_mps_or_a_composite_one(recorded):
    ops = recorded.ops
    assert "index_put_" in ops and "addmm_" in ops  # the bank's merge and a LoRA rewrite ran
    assert "convolution" in ops and "scaled_dot_product_attention" in ops
    missing = {
        name: sorted(dispatch_keys(name))
        for name in ops
        if not runs_on_mps(name) and name not in EXCEPTIONS
    }
    assert not missing, (
        f"ops with no MPS kernel and no composite implementation in torch {torch.__version__}'s "
        f"table (name: the keys it has): {missing}"
    )
    for name, (_, fallback) in EXCEPTIONS.items():
        assert "MPS" in dispatch_keys(fallback), f"{name}'s fallback {fallback} has no MPS kernel"


@pytest.mark.slow
def test_no_float64_and_no_host_sync_in_steady_frames(recorded):
    assert not recorded.float64, f"float64 tensors (MPS has none) in: {sorted(recorded.float64)}"
    assert not recorded.syncs, f"ops that wait for the device in a frame: {sorted(recorded.syncs)}"
