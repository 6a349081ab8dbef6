"""Style files switched in place: LoRA/LoCon, LoHa, LoKr and DoRA, from kohya/LyCORIS and
diffusers/peft files, as deltas rewritten into the model's own weights.

    files      find the file (file, folder, hub id) and read it: safetensors, never a pickle
               unless ``allow_pickle``; the format is told from the header's keys
    kohya      the kohya/LyCORIS reader (``lora_unet_...`` names, per-layer ``alpha``)
    peft       the diffusers/peft reader (module paths, ``lora_alpha``/``alpha_pattern``)
    formats    one layer's tensors -> one delta description; what is refused and why
    deltas     the delta descriptions (LowRank, Hadamard, Kronecker, Dora), float32 math
    reader     a file -> :class:`LoraWeights` (deltas per layer, on the model's device/dtype)
    writer     the in-place writer: base copies, ``W = W_base + sum of terms``, transactional
    library    :class:`AdapterLibrary`: the loaded LoRAs of one engine, switched by name

A frame costs what it costs with the weights fused (no extra matmuls); a compiled graph or a
captured CUDA graph reads the rewritten weights with no recompile; a restore copies the base
back, bit for bit. ``[engine] loras`` are fused at load through the same reader and sum
(:func:`fuse`), so one file gives one set of weights whichever way it is applied.
"""

from streamv2v.adapters.deltas import Dora, Hadamard, Kronecker, LowRank
from streamv2v.adapters.files import PICKLE_SUFFIXES, LoraError, LoraFile, read_file
from streamv2v.adapters.library import (
    AdapterLibrary,
    LoraBase,
    UnknownLoraError,
    choose_lora_base,
)
from streamv2v.adapters.reader import LoraWeights, load_lora, lora_weights
from streamv2v.adapters.writer import LoraSwitchError, fuse

__all__ = [
    "PICKLE_SUFFIXES",
    "AdapterLibrary",
    "Dora",
    "Hadamard",
    "Kronecker",
    "LoraBase",
    "LoraError",
    "LoraFile",
    "LoraSwitchError",
    "LoraWeights",
    "LowRank",
    "UnknownLoraError",
    "choose_lora_base",
    "fuse",
    "load_lora",
    "lora_weights",
    "read_file",
]
