"""A bench-only feature bank computed the way the reference StreamV2V computes it, so a run can
measure "ours / reference semantics" instead of claiming it:

- heads folded into the batch (3-D ``[B*heads, tokens, head_dim]`` tensors, as
  ``attn.head_to_batch_dim`` makes them), and the banked K/V concatenated to the frame's per call
  (a new ``[B*heads, M + N, d]`` tensor in every layer of every frame);
- Feature Fusion by a cosine top-1 against the banked outputs;
- Dynamic Merging in the model's dtype (float16 on a GPU): random bipartite split, fp16
  similarity, ``scatter_reduce(mean)`` in fp16, every ``interval`` frames.

One UNet call per frame (1 step), every self-attention layer; not used by the engine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

from streamv2v.attention import self_attention_layers
from streamv2v.config import BankConfig


class ReferenceBankProcessor:
    def __init__(self, name: str, cfg: BankConfig, fusion: bool, state: dict) -> None:
        self.name, self.cfg, self.fusion, self.state = name, cfg, fusion, state
        self.bank: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # 3-D k, v, o
        self.current: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):  # fmt: skip
        if encoder_hidden_states is not None:
            return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask)
        residual = hidden_states
        b, ch, h, w = hidden_states.shape if hidden_states.ndim == 4 else (0, 0, 0, 0)
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.view(b, ch, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(hidden_states))
        v = attn.head_to_batch_dim(attn.to_v(hidden_states))
        ck, cv = (k, v) if self.bank is None else (
            torch.cat([k, self.bank[0]], dim=1), torch.cat([v, self.bank[1]], dim=1)
        )  # fmt: skip
        out = F.scaled_dot_product_attention(q, ck, cv, scale=attn.scale)
        out = attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(out)))
        o3 = attn.head_to_batch_dim(out)
        if self.fusion and self.bank is not None:
            bo = attn.batch_to_head_dim(self.bank[2])
            sim = F.normalize(out, dim=-1) @ F.normalize(bo, dim=-1).transpose(1, 2)
            best, idx = sim.max(dim=-1)
            matched = bo.gather(1, idx[..., None].expand(-1, -1, out.shape[-1]))
            w_ = (best >= self.cfg.fusion_threshold).to(out.dtype)[..., None]
            out = torch.lerp(out, matched, w_ * self.cfg.fusion_strength)
        self.current = (k, v, o3)
        if self.state["update"]:
            self._update()
        if b:
            out = out.transpose(-1, -2).reshape(b, ch, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _update(self) -> None:
        cur = self.current
        if self.bank is None:
            self.bank = cur
            return
        kvo = [torch.cat([c, m], dim=1) for c, m in zip(cur, self.bank)]
        g, t, _ = kvo[0].shape
        n_src = t - cur[0].shape[1]  # keep one frame of tokens
        order = torch.rand((g, t), device=kvo[0].device).argsort(dim=-1)
        src, dst = order[:, :n_src], order[:, n_src:]
        keys = F.normalize(kvo[0], dim=-1)
        sk = keys.gather(1, src[..., None].expand(-1, -1, keys.shape[-1]))
        dk = keys.gather(1, dst[..., None].expand(-1, -1, keys.shape[-1]))
        match = (sk @ dk.transpose(1, 2)).argmax(dim=-1)
        merged = []
        for x in kvo:  # float16 mean, as the reference
            c = x.shape[-1]
            d = x.gather(1, dst[..., None].expand(-1, -1, c))
            s = x.gather(1, src[..., None].expand(-1, -1, c))
            merged.append(d.scatter_reduce(1, match[..., None].expand(-1, -1, c), s, "mean"))
        self.bank = tuple(merged)


def install_reference_bank(unet, cfg: BankConfig) -> dict:
    """Reference-semantics processors on ``unet``'s self-attention layers. Returns the shared
    state: set ``state["update"] = True`` for the frames that update the bank."""
    layers, state, procs = self_attention_layers(unet), {"update": True}, {}
    for key in unet.attn_processors:
        name = key.removesuffix(".processor")
        if name in layers:
            fusion = cfg.feature_fusion and any(t in name for t in cfg.fusion_layers)
            procs[key] = ReferenceBankProcessor(name, cfg, fusion, state)
        else:
            procs[key] = AttnProcessor2_0()
    unet.set_attn_processor(procs)
    return state
