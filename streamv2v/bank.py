"""The feature bank (StreamV2V section 2): per self-attention layer and per stream slot, banked
keys, values and attention outputs, kept at a constant size in preallocated buffers.

Layout. Each layer owns one buffer ``[slots, 3, M + N, C]``: K, V and O (the attention output,
before the residual) of ``M = max_frames * N`` banked tokens followed by the ``N`` tokens of the
frame being processed. The current frame's K/V are written into the tail, so Extended
self-Attention reads ``buf[:, 0]`` / ``buf[:, 1]`` as they are: bank and frame together, no
concatenation. The layers are packed by shape into one storage tensor per group when the engine
is prepared (fixed addresses from the start, what CUDA graphs need), so Dynamic Merging runs once
per group, batched over layers and slots, in place.

Pure tensor functions first (tested on hand-made tensors), then the stateful :class:`FeatureBank`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from streamv2v.config import BankConfig

#: Upper bound of the similarity matrix one merge chunk builds (bytes); bounds peak memory.
_MERGE_CHUNK_BYTES = 256 * 2**20


def merge_tokens(kvo: torch.Tensor, num_src: int, generator: torch.Generator) -> torch.Tensor:
    """Dynamic Merging: reduce ``T`` tokens to ``T - num_src`` by random bipartite soft matching.

    ``kvo`` is ``[G, 3, T, C]`` (G independent groups, e.g. layers x slots; K, V, O). In each
    group the tokens are split at random (seeded ``generator``) into ``num_src`` sources and the
    rest destinations, then merged by :func:`merge_pairs`. Returns ``[G, 3, T - num_src, C]``.
    """
    g, _, t, _ = kvo.shape
    return merge_pairs(kvo, *random_split(g, t, num_src, generator, kvo.device))


def random_split(
    groups: int, total: int, num_src: int, generator: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic Merging's split of ``total`` tokens: ``num_src`` sources and the rest
    destinations, drawn anew for each of ``groups`` (seeded)."""
    order = torch.rand((groups, total), generator=generator, device=device).argsort(dim=-1)
    return order[:, :num_src], order[:, num_src:]


def oldest_frame_split(
    total: int, tokens: int, oldest: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed split of the "stable" bank update, over ``total`` = bank + frame tokens laid out
    as the bank buffer is (``max_frames`` banked frames of ``tokens``, then the new frame).

    Sources: the oldest banked frame (ring position ``oldest``). Destinations, in the order the
    merged tokens are written back: every other banked frame where it is, and the new frame in
    the oldest one's place. No random draw: a bank position keeps its identity across updates,
    so the bank changes only by what the new frame brings (no wholesale re-pairing).
    """
    m = total - tokens
    start = oldest * tokens
    src = torch.arange(start, start + tokens, device=device)
    dst = torch.cat(
        [
            torch.arange(0, start, device=device),
            torch.arange(m, total, device=device),
            torch.arange(start + tokens, m, device=device),
        ]
    )
    return src, dst


def merge_pairs(
    kvo: torch.Tensor,
    src_idx: torch.Tensor,
    dst_idx: torch.Tensor,
    threshold: float | None = None,
) -> torch.Tensor:
    """Bipartite soft matching of a given split: every source token (``src_idx`` [G, S]) is
    matched to its most similar destination (``dst_idx`` [G, D]) by cosine similarity of the
    keys, and each destination becomes the mean of itself and its matched sources. The same
    matching is applied to K, V and O of ``kvo`` [G, 3, T, C], so they stay aligned. With a
    ``threshold``, a source whose best similarity is below it joins no destination (it is
    dropped). Returns ``[G, 3, D, C]`` in ``dst_idx`` order and ``kvo``'s dtype.

    Precision. Keys are normalised in float32 (a float16 norm overflows past |k| ~ 256), then
    matched in the model's precision on accelerators (a half matmul: the similarity is the
    merge's whole cost) and in float32 on the CPU (whose half matmul is slower, not faster).
    The means are summed in float32 by one accumulating ``index_put_`` (each token added to its
    destination's row): thousands of tokens landing on one destination (flat image regions)
    cannot overflow float16, and counts (integers in float32) are exact. The op has kernels on
    CPU, CUDA and MPS (``segment_reduce``, used before, has none on MPS); on the CPU it adds in
    token order, on CUDA it sorts the indices first (no atomics): the same bits on every run.
    """
    g, _, t, c = kvo.shape
    m = dst_idx.shape[-1]
    dev = kvo.device
    sim_dtype = torch.float32 if dev.type == "cpu" else kvo.dtype
    keys = F.normalize(kvo[:, 0].float(), dim=-1).to(sim_dtype)
    src_keys = keys.gather(1, src_idx[..., None].expand(-1, -1, c))
    dst_keys = keys.gather(1, dst_idx[..., None].expand(-1, -1, c))
    best, match = (src_keys @ dst_keys.transpose(1, 2)).max(dim=-1)  # [G, S] -> dest. rank
    if threshold is not None:
        # Dropped sources go to one extra segment past the destinations, discarded below (a
        # mask, not a branch on values: the update stays capturable).
        match = torch.where(best >= threshold, match, m)
    # Where every token goes: destination j to its own rank j, a source to its match.
    target = torch.empty((g, t), dtype=torch.long, device=dev)
    target.scatter_(1, dst_idx, torch.arange(m, device=dev).expand(g, m))
    target.scatter_(1, src_idx, match)
    # Sums and counts per destination (and the dropped sources' extra row). Every destination
    # counts itself, so no count is zero.
    segments = m + 1
    rows = torch.arange(g, device=dev)[:, None].expand(g, t)
    sums = torch.zeros((g, segments, 3, c), dtype=torch.float32, device=dev)
    sums.index_put_((rows, target), kvo.transpose(1, 2).float(), accumulate=True)
    counts = torch.zeros((g, segments), dtype=torch.float32, device=dev)
    counts.scatter_add_(1, target, torch.ones((), dtype=torch.float32, device=dev).expand(g, t))
    mean = sums[:, :m] / counts[:, :m, None, None]
    return mean.transpose(1, 2).to(kvo.dtype)


def fuse_features(
    out: torch.Tensor, bank_out: torch.Tensor, threshold: float, strength: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature Fusion: each token of ``out`` [B, N, C] finds its most similar (cosine, top-1) token
    in ``bank_out`` [B, M, C]; where that similarity is at least ``threshold`` the token becomes
    ``(1 - strength) * own + strength * banked``, elsewhere it is left as it is.

    Returns the fused tokens and the boolean mask [B, N] of the tokens that were fused.
    """
    a = F.normalize(out.float(), dim=-1)
    b = F.normalize(bank_out.float(), dim=-1)
    best, idx = (a @ b.transpose(1, 2)).max(dim=-1)
    matched = bank_out.gather(1, idx[..., None].expand(-1, -1, out.shape[-1]))
    fused = best >= threshold
    weight = (fused.to(out.dtype) * strength)[..., None]
    return torch.lerp(out, matched, weight), fused


def multihead_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
):
    """Scaled dot-product attention of ``q`` [B, Nq, C] over ``k``/``v`` [B, Nk, C], with the
    layer's own ``scale`` (None: 1/sqrt(head_dim)) and an optional additive ``bias`` on the
    logits, broadcastable to [B, heads, Nq, Nk].

    Heads are split into 4-D [B, heads, tokens, head_dim] views: PyTorch's fused CPU kernels take
    those; 3-D [B*heads, tokens, dim] inputs fall back to a slow unfused path.
    """
    b, nq, c = q.shape
    d = c // heads

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(b, x.shape[1], heads, d).transpose(1, 2)

    o = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=bias, scale=scale)
    return o.transpose(1, 2).reshape(b, nq, c)


@dataclass
class _Group:
    """Layers whose buffers share a shape, packed into one storage tensor [L, S, 3, T, C]."""

    names: list[str]
    storage: torch.Tensor


@dataclass
class _Call:
    """What the processors need to know about the UNet call in flight (set by the engine).

    Only ``rows`` is Python state, and it is fixed per planned call; everything that changes
    from frame to frame lives in tensors at fixed addresses (``FeatureBank.fill_mask``), so a
    compiled or captured UNet replays every frame with the same graph.
    """

    rows: slice = field(default_factory=lambda: slice(0, 0))  #: bank slots of the call's batch rows


class FeatureBank:
    """Banked K/V/O of every self-attention layer, updated every ``interval`` frames.

    The engine drives it: :meth:`allocate` once when it is prepared (every layer's buffer, packed
    per shape, at fixed addresses from the start), ``begin_frame`` / ``begin_call`` before each
    UNet call and ``end_frame`` after a frame's calls. The attention processors read and write
    through :meth:`buffer` and :attr:`fill_mask`, and add their Feature Fusion counts into
    :attr:`fused_stats`; the update (merge or FIFO step) runs eagerly in ``end_frame``, between
    frames, with its own generator.
    """

    def __init__(self, config: BankConfig, slots: int, seed: int, device: torch.device) -> None:
        self.config = config
        self.slots = slots
        self._seed = seed
        self._device = device
        self._buffers: dict[str, torch.Tensor] = {}  # name -> [S, 3, M + N, C] (storage views)
        self._tokens: dict[str, int] = {}  # name -> N (tokens of one frame)
        self._groups: list[_Group] = []
        self.call = _Call()
        #: [S, 1, 1, 1] bool: slots whose first real frame the current call holds (their bank
        #: becomes a copy of it inside the processors, as a tensor select)
        self.fill_mask = torch.zeros((slots, 1, 1, 1), dtype=torch.bool, device=device)
        self._fill_host = [False] * slots  # what fill_mask holds (written only when it changes)
        #: [fused tokens, tokens] of the FF layers over the frame's calls (float32, in place)
        self.fused_stats = torch.zeros(2, dtype=torch.float32, device=device)
        self.has_fusion = False  # set by the processors that apply FF
        self._fused_fraction = torch.zeros((), dtype=torch.float32, device=device)
        # A FIFO of several frames starts as copies of its first frame. Each copy would weigh in
        # attention as a frame of its own, so EA gets a bias of -log(copies) on every banked
        # frame's logits: each distinct frame then counts once, at static shapes.
        self._weigh_copies = config.mode == "fifo" and config.max_frames > 1
        self._contents = [[-1] * config.max_frames for _ in range(slots)]  # frame id per position
        self._content_ids = 0
        self._attn_bias: dict[int, torch.Tensor] = {}  # tokens per frame -> [S, 1, 1, M + N]
        self._splits: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.reset()

    @torch.inference_mode()
    def reset(self) -> None:
        """Forget the banked frames (buffers stay allocated: shapes do not change)."""
        # The merge's generator lives outside any compiled region: it advances eagerly, so a
        # captured UNet can never freeze its permutation.
        self._generator = torch.Generator(device=self._device).manual_seed(self._seed)
        self._frame = 0
        self._fifo_pos = 0
        self._frame_fill: set[int] = set()
        self.last_fused_fraction: torch.Tensor | None = None
        for slot in range(self.slots):
            self._contents[slot] = [-1] * self.config.max_frames
        self._refresh_bias()

    @torch.inference_mode()
    def allocate(self, layers: dict[str, tuple[int, int]], dtype: torch.dtype) -> None:
        """Allocate the buffers of ``layers`` (name -> (tokens per frame, channels)), packed into
        one storage tensor per shape, so the merge runs once per shape over layers and slots and
        every buffer keeps its address for the engine's lifetime."""
        by_shape: dict[tuple[int, int], list[str]] = {}
        for name, shape in layers.items():
            if name not in self._buffers:
                by_shape.setdefault(shape, []).append(name)
        for (tokens, channels), names in by_shape.items():
            t = (self.config.max_frames + 1) * tokens
            storage = torch.zeros(
                (len(names), self.slots, 3, t, channels), device=self._device, dtype=dtype
            )
            for i, n in enumerate(names):
                self._buffers[n] = storage[i]
                self._tokens[n] = tokens
            self._groups.append(_Group(names=names, storage=storage))
            if self._weigh_copies and tokens not in self._attn_bias:
                bias = torch.zeros((self.slots, 1, 1, t), device=self._device, dtype=dtype)
                self._attn_bias[tokens] = bias
        self._refresh_bias()

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the processors read or write (for marking static addresses)."""
        return [
            *(g.storage for g in self._groups),
            self.fill_mask,
            self.fused_stats,
            *self._attn_bias.values(),
        ]

    # ---------------------------------------------------------------- driven by the engine
    def begin_frame(self, frame: int) -> None:
        self._frame = frame
        self._frame_fill = set()
        if self.has_fusion:
            self.fused_stats.zero_()

    def begin_call(self, rows: slice, fill_rows: tuple[int, ...]) -> None:
        self.call.rows = rows
        self._frame_fill.update(rows.start + r for r in fill_rows)
        for r in range(rows.stop - rows.start):
            slot, want = rows.start + r, r in fill_rows
            if self._fill_host[slot] != want:  # a device write only when the mask changes
                self.fill_mask[slot].fill_(want)
                self._fill_host[slot] = want
        if fill_rows and self._weigh_copies:
            for r in fill_rows:
                self._contents[rows.start + r] = [self._new_content()] * self.config.max_frames
            self._refresh_bias()

    def _updates_now(self) -> bool:
        return self._frame > 0 and self._frame % self.config.interval == 0

    @torch.inference_mode()
    def end_frame(self) -> None:
        """Fold the frame just processed into the bank when an update is due (eagerly, between
        frames: never inside a compiled or captured region)."""
        if self.has_fusion:
            torch.div(self.fused_stats[0], self.fused_stats[1], out=self._fused_fraction)
            self.last_fused_fraction = self._fused_fraction
        if not self._updates_now():
            return
        for group in self._groups:
            s = group.storage  # [L, S, 3, T, C]
            n = self._tokens[group.names[0]]
            m = s.shape[3] - n
            if self.config.mode in ("dyme", "stable"):
                self._merge_into(s.flatten(0, 1), n)
            else:  # FIFO ring of max_frames frames: the oldest slot takes the new frame
                pos = self._fifo_pos * n
                s[:, :, :, pos : pos + n].copy_(s[:, :, :, m:])
            # A slot that got its first real frame during this frame keeps exactly that frame.
            for slot in self._frame_fill:
                self.fill(s[:, slot], n)
        if self._weigh_copies:
            new = self._new_content()
            for slot in range(self.slots):
                if slot not in self._frame_fill:
                    self._contents[slot][self._fifo_pos] = new
            self._refresh_bias()
        self._fifo_pos = (self._fifo_pos + 1) % self.config.max_frames

    def _new_content(self) -> int:
        self._content_ids += 1
        return self._content_ids

    def _refresh_bias(self) -> None:
        """Rewrite the EA logit bias (in place) from which banked positions hold the same frame.
        Runs on the host at fills and updates only, never per call."""
        if not self._weigh_copies:
            return
        per_frame = torch.zeros((self.slots, self.config.max_frames + 1))  # the tail: 0
        for slot, ids in enumerate(self._contents):
            for pos, ident in enumerate(ids):
                per_frame[slot, pos] = -math.log(ids.count(ident))
        for tokens, bias in self._attn_bias.items():
            bias.copy_(per_frame.repeat_interleave(tokens, dim=1).view(bias.shape))

    def attn_bias(self, tokens: int, dtype: torch.dtype) -> torch.Tensor | None:
        """The ``[S, 1, 1, M + N]`` additive EA bias of a layer with ``tokens`` per frame, or
        None when every banked position holds a frame of its own (the bank needs none).
        Allocated with the layer's buffer; rewritten in place at fills and updates."""
        if not self._weigh_copies:
            return None
        return self._attn_bias[tokens]

    def _merge_into(self, kvo: torch.Tensor, n: int) -> None:
        """Merge ``kvo`` [G, 3, M + N, C] (bank and a frame of ``n`` tokens) down to its first M
        tokens, in place, in chunks of groups so the similarity matrices stay under a memory
        bound."""
        g, _, t, _ = kvo.shape
        m = t - n
        chunk = max(1, _MERGE_CHUNK_BYTES // (n * m * 4))
        if self.config.mode == "stable":
            src, dst = self._stable_split(t, n)
        for i in range(0, g, chunk):
            part = kvo[i : i + chunk]
            k = part.shape[0]
            if self.config.mode == "stable":
                split = (src.expand(k, -1), dst.expand(k, -1))
                merged = merge_pairs(part, *split, self.config.merge_threshold)
            else:
                merged = merge_pairs(part, *random_split(k, t, n, self._generator, self._device))
            part[:, :, :m].copy_(merged)

    def _stable_split(self, total: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`oldest_frame_split` for the ring position due now (built once per position)."""
        key = (total, tokens, self._fifo_pos)
        split = self._splits.get(key)
        if split is None:
            split = oldest_frame_split(total, tokens, self._fifo_pos, self._device)
            self._splits[key] = split
        return split

    # ---------------------------------------------------------------- used by the processors
    def buffer(self, name: str, tokens: int, channels: int, dtype: torch.dtype) -> torch.Tensor:
        """The layer's ``[S, 3, M + N, C]`` buffer. The engine allocates every layer when it is
        prepared; a bank driven by hand (tests) gets a layer's buffer on its first use."""
        buf = self._buffers.get(name)
        if buf is None:
            self.allocate({name: (tokens, channels)}, dtype)
            buf = self._buffers[name]
        return buf

    def fill(self, x: torch.Tensor, tokens: int) -> None:
        """``x`` [..., M + N, C]: the current frame (the tail) becomes every banked frame. With
        the bank a copy of the frame, EA equals plain attention and FF leaves every token as it
        is: the reference's "empty bank" semantics, at a constant shape."""
        m = x.shape[-2] - tokens
        cur = x[..., m:, :]
        for f in range(m // tokens):
            x[..., f * tokens : (f + 1) * tokens, :].copy_(cur)

    # ---------------------------------------------------------------- reporting
    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def tokens_per_layer(self) -> dict[str, int]:
        """Banked tokens per layer and slot (constant: max_frames frames of tokens)."""
        return {n: self.config.max_frames * t for n, t in self._tokens.items()}
