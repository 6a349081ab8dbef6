"""From one layer's tensors (as a file names them) to one delta description.

A reader groups a file's tensors by layer: ``{suffix: tensor}`` with the suffixes of its
family (kohya/LyCORIS ``lora_down.weight``, ``hada_w1_a``, ``lokr_w1``, ``dora_scale``,
``alpha``; peft/diffusers ``lora_A.weight``, ``lora_magnitude_vector``, and the same LyCORIS
names). :func:`build` tells the kind from the suffixes a group holds, so one file may mix
kinds layer by layer. Alpha: the layer's own ``alpha`` tensor when the file has one, else the
reader's (peft: ``lora_alpha``/``alpha``, ``alpha_pattern``), else the rank (a scale of 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from streamv2v.adapters.deltas import Dora, Hadamard, Kronecker, LowRank, _Delta
from streamv2v.adapters.files import LoraError

#: The model parts a file may adapt, by key prefix. kohya/LyCORIS: ``lora_unet_<flat path>``;
#: diffusers/peft: ``<part>.<module path>`` (a file with no part prefix is the UNet's). A second
#: text encoder (SDXL) is one more entry in each ("lora_te1_"/"lora_te2_", "text_encoder_2"); an
#: engine without that part (SD1.5) refuses such a file, naming the family.
KOHYA_PARTS: dict[str, str] = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
PEFT_PARTS: tuple[str, ...] = ("unet", "text_encoder", "text_encoder_2")
#: Keys of parts no engine of this kind has (named in the refusal).
FOREIGN_PARTS: dict[str, str] = {
    "lora_transformer_": "a LoRA for a transformer model (SD3/Flux)",
    "transformer.": "a LoRA for a transformer model (SD3/Flux)",
}

LORA = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")
PEFT_LORA = ("lora_A.weight", "lora_B.weight")
LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
EXTRA = ("alpha", "dora_scale", "lora_magnitude_vector")
SUPPORTED = LORA + PEFT_LORA + LOHA + LOKR + EXTRA

#: Tensors of file types the in-place path does not apply, and why (named in the refusal).
REFUSED: dict[str, str] = {
    "diff": "a full-weight difference (LyCORIS 'full'): a whole copy of the layer, not a "
    "low-rank style; merge it into the model instead",
    "diff_b": "a bias difference (LyCORIS 'full'): only weights are rewritten in place",
    "lora_up.bias": "LoRA bias terms: only weights are rewritten in place",
    "lora_B.bias": "LoRA bias terms: only weights are rewritten in place",
    "a1.weight": "GLoRA: its delta needs the input-side product a1 @ a2 @ W, not supported",
    "a2.weight": "GLoRA: its delta needs the input-side product a1 @ a2 @ W, not supported",
    "b1.weight": "GLoRA: its delta needs the input-side product a1 @ a2 @ W, not supported",
    "b2.weight": "GLoRA: its delta needs the input-side product a1 @ a2 @ W, not supported",
    "on_input": "(IA)^3: it scales activations, not a weight delta",
    "weight": "(IA)^3 or a whole weight: not a low-rank delta",
    "ia3_l": "(IA)^3: it scales activations, not a weight delta",
    "oft_blocks": "OFT: an orthogonal rotation of the weight, not a delta",
    "oft_diag": "OFT/BOFT: an orthogonal rotation of the weight, not a delta",
    "oft_R.weight": "OFT: an orthogonal rotation of the weight, not a delta",
    "boft_R": "BOFT: an orthogonal rotation of the weight, not a delta",
    "w_norm": "a norm-layer difference: only Linear/Conv weights are rewritten",
    "b_norm": "a norm-layer difference: only Linear/Conv weights are rewritten",
    "lora_embedding_A": "an embedding LoRA: only Linear/Conv weights are rewritten",
    "lora_embedding_B": "an embedding LoRA: only Linear/Conv weights are rewritten",
}

KINDS = "LoRA/LoCon, LoHa, LoKr and DoRA (kohya/LyCORIS and diffusers/peft files)"


@dataclass
class AlphaRule:
    """How a family gives a layer its alpha when the layer has no ``alpha`` tensor."""

    family: str  #: "kohya" (LyCORIS too) or "peft"
    alpha: float | None = None  #: peft's lora_alpha (LoHa/LoKr: alpha); None: the rank
    rank: int | None = None  #: peft's r (only needed where no factor shows the rank: LoKr)
    rslora: bool = False  #: peft's use_rslora: alpha / sqrt(rank)


def split_suffix(key: str) -> tuple[str, str] | None:
    """``(module, suffix)`` of a key ending in a known (or refused) suffix, else None."""
    for suffix in sorted((*SUPPORTED, *REFUSED), key=len, reverse=True):
        if key.endswith(f".{suffix}"):
            return key[: -len(suffix) - 1], suffix
    return None


def refuse_kinds(source: str, unknown: Mapping[str, str]) -> None:
    """Raise the one message naming every unsupported kind of tensor found (key -> suffix)."""
    if not unknown:
        return
    reasons: dict[str, str] = {}
    for key, suffix in unknown.items():
        reasons.setdefault(REFUSED.get(suffix, "an unknown tensor"), key)
    listed = "; ".join(f"{why} (e.g. {key})" for why, key in reasons.items())
    raise LoraError(
        f"LoRA {source!r} holds tensors the in-place path cannot apply: {listed}. "
        f"Supported: {KINDS}"
    )


def _scale(alpha: float | None, rank: int | None, rslora: bool = False) -> float:
    if alpha is None or not rank:
        return 1.0
    return alpha / rank**0.5 if rslora else alpha / rank


def build(g: Mapping[str, torch.Tensor], rule: AlphaRule, weight: torch.Tensor) -> _Delta:
    """The delta of one layer's group of tensors ``g`` for a layer whose weight is ``weight``.
    Raises ValueError (the caller names the layer) when the group is not one known kind."""
    own = g.get("alpha")
    alpha = float(own.float().reshape(-1)[0]) if own is not None else rule.alpha
    kinds = [k for k, names in (("lora", LORA + PEFT_LORA), ("loha", LOHA), ("lokr", LOKR))
             if any(n in g for n in names)]  # fmt: skip
    if len(kinds) != 1:
        raise ValueError("no factors" if not kinds else f"factors of {' and '.join(kinds)}")
    kind = kinds[0]
    if kind == "lora":
        down = g.get("lora_down.weight", g.get("lora_A.weight"))
        up = g.get("lora_up.weight", g.get("lora_B.weight"))
        if down is None or up is None:
            raise ValueError("a LoRA needs both its down (A) and up (B) factors")
        rank = down.shape[0]
        delta: _Delta = LowRank(
            down, up, _scale(alpha, rank, rule.rslora), mid=g.get("lora_mid.weight")
        )
    elif kind == "loha":
        need = [n for n in LOHA[:4] if n not in g]
        if need or (("hada_t1" in g) != ("hada_t2" in g)):
            raise ValueError(f"LoHa factors missing: {need or ['hada_t1/hada_t2']}")
        rank = g["hada_w1_b"].shape[0]
        delta = Hadamard(
            g["hada_w1_a"], g["hada_w1_b"], g["hada_w2_a"], g["hada_w2_b"],
            scale=_scale(alpha, rank), t1=g.get("hada_t1"), t2=g.get("hada_t2"),
        )  # fmt: skip
    else:
        has_w1 = "lokr_w1" in g or ("lokr_w1_a" in g and "lokr_w1_b" in g)
        has_w2 = "lokr_w2" in g or ("lokr_w2_a" in g and "lokr_w2_b" in g)
        if not (has_w1 and has_w2):
            raise ValueError("LoKr needs lokr_w1 (or lokr_w1_a/_b) and lokr_w2 (or _a/_b)")
        factored = g.get("lokr_w1_b", g.get("lokr_w2_b"))
        rank = factored.shape[0] if factored is not None else None
        if rule.family == "peft":  # peft: alpha / r always (r from the config when all whole)
            rank = rank or rule.rank
        # LyCORIS (and ComfyUI, A1111): alpha / dim of the factored part; scale 1 when whole
        delta = Kronecker(
            w1=g.get("lokr_w1"), w1a=g.get("lokr_w1_a"), w1b=g.get("lokr_w1_b"),
            w2=g.get("lokr_w2"), w2a=g.get("lokr_w2_a"), w2b=g.get("lokr_w2_b"),
            t2=g.get("lokr_t2"), scale=_scale(alpha, rank),
        )  # fmt: skip
    magnitude = g.get("dora_scale", g.get("lora_magnitude_vector"))
    if magnitude is not None:
        delta = Dora(delta, magnitude, _side(magnitude, weight, peft="dora_scale" not in g))
    _check_shapes(delta, weight)
    return delta


def _side(magnitude: torch.Tensor, weight: torch.Tensor, peft: bool) -> str:
    """Which channels a DoRA magnitude normalises: peft's are the output channels ([out] or
    [1, out, 1, 1]); kohya/LyCORIS ``dora_scale`` says by its shape ([out, 1..]: output,
    LyCORIS ``wd_on_out``; [1, in, ..]: input, LyCORIS 2.x/kohya)."""
    out, inp = weight.shape[0], weight.shape[1]
    if peft:
        if magnitude.numel() != out:
            raise ValueError(f"DoRA magnitude of {magnitude.numel()} values for {out} outputs")
        return "out"
    shape = tuple(magnitude.shape)
    if shape[0] == out and magnitude.numel() == out and (out != 1 or inp == 1):
        return "out"
    if len(shape) > 1 and shape[0] == 1 and shape[1] == inp and magnitude.numel() == inp:
        return "in"
    raise ValueError(f"dora_scale of shape {shape} fits neither side of {tuple(weight.shape)}")


def _check_shapes(delta: _Delta, weight: torch.Tensor) -> None:
    """Compute the delta on shapes only (meta tensors): factors that do not make the layer's
    shape raise here, at load, not at the first switch."""
    meta = delta.to(torch.device("meta"), torch.float32)
    try:
        meta.term(torch.empty(weight.shape, device="meta"), 1.0)
    except RuntimeError as exc:
        raise ValueError(
            f"its factors do not make the layer's shape {tuple(weight.shape)} "
            f"({str(exc).splitlines()[0]})"
        ) from None
