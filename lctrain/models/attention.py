"""Softmax attention block: global causal ("A") or causal sliding window ("S", `window` tokens
including the current one), RoPE at global positions.

Under context parallelism (cp_group of size > 1):
- global attention goes through Ulysses (`lctrain.parallel.ulysses.ulysses_attention`): each rank sees
  the full sequence for heads/P heads;
- sliding-window attention prepends the previous rank's last window-1 keys/values
  (`lctrain.parallel.halo.prepend_halo`); halo keys sit at positions offset-halo .. offset-1 and the
  zeros rank 0 receives (negative positions) are masked out.
The parallel modules are imported lazily, only when CP is on.

Packed documents (`docs`, lctrain.models.documents.Documents): a query attends only to keys of its own
document, at any length and without a T x T mask: FlexAttention with a document block mask on CUDA;
on CPU exact SDPA per document (global) or per block of queries over the keys in reach (sliding
window). Under CP the Ulysses path and the halo path look the documents of the full sequence / of
the halo keys up in the same global boundaries (no extra communication).

`conv_size` > 0 adds a short causal depthwise conv on q, k and v after their projections, as a
residual (q = q + conv(q), ...), before RoPE: each key then carries the tokens just before it, so
one attention layer can match "the token after an earlier occurrence of what I just read" (an
induction head) without first composing with a previous-token head in an earlier layer. Under CP
each conv gets the previous rank's last conv_size-1 inputs (halo); decoding caches their tails.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lctrain.parallel.mesh import group_size
from lctrain.parallel.tensor_parallel import column_linear, local_size, mark_split, row_linear

from .layers import ShortConv, run_short_conv
from .rope import RotaryEmbedding


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean [Tq, Tk], True where query at q_pos may attend key at k_pos: causal, key position >= 0,
    and within the last `window` positions (including its own) when window is given."""
    qp, kp = q_pos[:, None], k_pos[None, :]
    allowed = (kp <= qp) & (kp >= 0)
    if window is not None:
        allowed &= kp > qp - window
    return allowed


def expand_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Grouped-query attention: k or v [B, T, Hkv, D] with each head repeated for the n_heads / Hkv
    query heads of its group (query head h reads kv head h // (n_heads / Hkv)); unchanged if Hkv == n_heads."""
    if x.shape[2] == n_heads:
        return x
    if n_heads % x.shape[2]:
        raise ValueError(f"{x.shape[2]} key/value heads do not divide {n_heads} query heads")
    return x.repeat_interleave(n_heads // x.shape[2], dim=2)


def masked_attention(q, k, v, q_pos, k_pos, window=None):
    """SDPA on [B, T, H, D] tensors with the mask of `window_mask`. Returns [B, Tq, H, D]."""
    k, v = expand_kv(k, q.shape[2]), expand_kv(v, q.shape[2])
    mask = window_mask(q_pos, k_pos, window)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def windowed_attention(q, k, v, q_start: int, k_start: int, window: int | None, q_docs=None, k_docs=None,
                       block: int = 256):
    """Exact causal attention of `window_mask` (+ documents) on [B, T, H, D] without a Tq x Tk mask:
    each block of queries attends over the keys it can reach. Query i sits at position q_start + i,
    key j at k_start + j (keys at negative positions are masked); q_docs [B, Tq] / k_docs [B, Tk]
    (optional) hold each token's document. The CPU path of sliding-window and halo attention."""
    k, v = expand_kv(k, q.shape[2]), expand_kv(v, q.shape[2])
    Tq, Tk = q.shape[1], k.shape[1]
    block = max(block, window or 0)
    outs = []
    for i0 in range(0, Tq, block):
        i1 = min(Tq, i0 + block)
        first_key = k_start if window is None else q_start + i0 - window + 1
        j0, j1 = max(0, first_key - k_start), min(Tk, q_start + i1 - k_start)
        q_pos = torch.arange(q_start + i0, q_start + i1, device=q.device)
        k_pos = torch.arange(k_start + j0, k_start + j1, device=q.device)
        mask = window_mask(q_pos, k_pos, window)
        if q_docs is not None:
            mask = (mask[None] & (q_docs[:, i0:i1, None] == k_docs[:, None, j0:j1]))[:, None]
        out = F.scaled_dot_product_attention(q[:, i0:i1].transpose(1, 2), k[:, j0:j1].transpose(1, 2),
                                             v[:, j0:j1].transpose(1, 2), attn_mask=mask)
        outs.append(out.transpose(1, 2))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def document_causal_attention(q, k, v, bounds: list[list[int]]):
    """Causal attention inside each document of the whole sequence (q, k, v [B, T, H, D] at positions
    0 .. T-1; bounds[b] the document boundaries of row b): plain causal SDPA per document."""
    rows = []
    for b, cuts in enumerate(bounds):
        parts = [causal_attention(q[b:b + 1, s:e], k[b:b + 1, s:e], v[b:b + 1, s:e])
                 for s, e in zip(cuts[:-1], cuts[1:])]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def causal_attention(q, k, v):
    """Plain causal SDPA (flash on CUDA) on [B, T, H, D]."""
    k, v = expand_kv(k, q.shape[2]), expand_kv(v, q.shape[2])
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2)


_FLEX = None
_BLOCK_MASKS: dict = {}


def _flex_sliding_window(q, k, v, window: int | None, halo: int = 0, first_valid: int = 0,
                         q_docs=None, k_docs=None, mask_cache: dict | None = None):
    """FlexAttention on CUDA (no T x T mask in memory): causal, within `window` (None: global).
    Key j sits at local position j - halo, query i at i; keys j < first_valid (the zeros CP rank 0
    receives as halo) are excluded. q_docs [B, Tq] / k_docs [B, Tk]: a query sees only keys of its
    document; the block mask then depends on the batch and is kept in `mask_cache` (the forward's
    Documents.cache), else in a module-level cache by geometry."""
    k, v = expand_kv(k, q.shape[2]), expand_kv(v, q.shape[2])
    global _FLEX
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _FLEX is None:
        _FLEX = torch.compile(flex_attention)
    Tq, Tk = q.shape[1], k.shape[1]
    key = ("flex", Tq, Tk, window, halo, first_valid, str(q.device))
    store = _BLOCK_MASKS if q_docs is None else mask_cache if mask_cache is not None else {}
    block_mask = store.get(key)
    if block_mask is None:
        def mask_mod(b, h, qi, kj):
            kpos = kj - halo
            allowed = (kpos <= qi) & (kj >= first_valid)
            if window is not None:
                allowed = allowed & (kpos > qi - window)
            if q_docs is not None:
                allowed = allowed & (q_docs[b, qi] == k_docs[b, kj])
            return allowed

        batch = None if q_docs is None else q.shape[0]
        block_mask = create_block_mask(mask_mod, B=batch, H=None, Q_LEN=Tq, KV_LEN=Tk, device=q.device, _compile=True)
        store[key] = block_mask
    out = _FLEX(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask)
    return out.transpose(1, 2)


class Attention(nn.Module):
    """Multi-head softmax attention with RoPE (`rope=None`: no positions, NoPE); `window=None` for
    global causal attention; `conv_size` > 0: short convs on q, k, v (module doc); `kv_heads` < n_heads:
    grouped-query attention (1 = MQA), k and v (and the decoding cache) have kv_heads heads."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int, *, window: int | None,
                 rope: RotaryEmbedding | None, conv_size: int = 0,
                 cp_group=None, tp_group=None, use_flex: bool = True, kv_heads: int | None = None):
        """tp_group (size tp > 1): this rank owns n_heads / tp query heads and kv_heads / tp key/value
        heads (column-parallel q/k/v and their conv channels, row-parallel output; contiguous chunks
        keep every query head with its kv head); under CP Ulysses splits those local heads."""
        super().__init__()
        if window is not None and window < 1:
            raise ValueError(f"model.window must be >= 1, got {window}")
        kv_heads = n_heads if kv_heads is None else kv_heads
        if kv_heads < 1 or n_heads % kv_heads:
            raise ValueError(f"model.attn_kv_heads={kv_heads} must divide model.attn_heads={n_heads}")
        local_heads = local_size(n_heads, tp_group, "model.attn_heads")
        local_kv = local_size(kv_heads, tp_group, "model.attn_kv_heads")
        self.n_heads, self.head_dim, self.window, self.kv_heads = local_heads, head_dim, window, local_kv
        self.q_proj = column_linear(d_model, n_heads * head_dim, tp_group)
        self.k_proj = column_linear(d_model, kv_heads * head_dim, tp_group)
        self.v_proj = column_linear(d_model, kv_heads * head_dim, tp_group)
        self.o_proj = row_linear(n_heads * head_dim, d_model, tp_group)
        self.o_proj.is_output_projection = True
        self.conv_size = conv_size
        if conv_size > 0:
            self.q_conv = ShortConv(local_heads * head_dim, conv_size, activation=False)
            self.k_conv = ShortConv(local_kv * head_dim, conv_size, activation=False)
            self.v_conv = ShortConv(local_kv * head_dim, conv_size, activation=False)
            for conv in (self.q_conv, self.k_conv, self.v_conv):
                mark_split(conv.weight, 0)
        self.rope = rope
        self.cp_group = cp_group if group_size(cp_group) > 1 else None
        self.use_flex = use_flex

    # ------------------------------------------------------------------ cache
    def new_cache(self, batch_size: int, device) -> dict:
        return {"k": None, "v": None, "pos": None}

    def forward(self, x: torch.Tensor, position_offset: int = 0, cache: dict | None = None,
                docs=None) -> torch.Tensor:
        """docs (optional, not with a cache; lctrain.models.documents.Documents): a query attends only
        to keys of its own document (packed documents do not see each other)."""
        B, T, _ = x.shape
        H, D = self.n_heads, self.head_dim
        pos = torch.arange(position_offset, position_offset + T, device=x.device)
        q = self._project(self.q_proj, "q_conv", x, cache, docs).view(B, T, H, D)
        k = self._project(self.k_proj, "k_conv", x, cache, docs).view(B, T, self.kv_heads, D)
        rerope = self.rope is not None and self.rope.rerope is not None and self.window is None
        if self.rope is not None and not rerope:
            cos, sin = self.rope.cos_sin_range(position_offset, T, x.device)
            q, k = self.rope.rotate(q, cos, sin), self.rope.rotate(k, cos, sin)
        v = self._project(self.v_proj, "v_conv", x, cache, docs).view(B, T, self.kv_heads, D)
        if rerope:  # eval-time (Leaky) ReRoPE: q and k stay unrotated, positions go to the attention
            out = self._attend_rerope(q, k, v, pos, cache, docs)
        elif cache is not None:
            if self.cp_group is not None:
                raise ValueError("incremental decoding (cache=) is single-process; build the model with cp_group=None")
            if docs is not None:
                raise ValueError("document masking (docs) does not apply to incremental decoding")
            out = self._attend_cached(q, k, v, pos, cache)
        elif self.cp_group is not None:
            out = self._attend_cp(q, k, v, position_offset, docs)
        elif docs is not None:
            out = self._attend_documents(q, k, v, docs)
        else:
            out = self._attend_local(q, k, v)
        return self.o_proj(out.reshape(B, T, H * D))

    def _project(self, proj: nn.Linear, conv_name: str, x: torch.Tensor, cache: dict | None,
                 docs=None) -> torch.Tensor:
        """proj(x), plus the short conv of it when conv_size > 0 (residual)."""
        y = proj(x)
        if self.conv_size > 0:
            y = y + run_short_conv(getattr(self, conv_name), y, cache, conv_name, self.cp_group, docs)
        return y

    def _attend_documents(self, q, k, v, docs):
        """Attention inside documents over a whole sequence (positions 0 .. T-1): one process, or the
        full sequence Ulysses hands each rank (docs.bounds are global, so they fit both)."""
        T = q.shape[1]
        window = None if self.window is None or self.window >= T else self.window
        if self.use_flex and q.is_cuda:
            ids = docs.doc_ids(0, T)
            return _flex_sliding_window(q, k, v, window, q_docs=ids, k_docs=ids, mask_cache=docs.cache)
        if window is None:
            return document_causal_attention(q, k, v, docs.bounds)
        ids = docs.doc_ids(0, T)
        return windowed_attention(q, k, v, 0, 0, window, ids, ids)

    def _attend_local(self, q, k, v):
        T = q.shape[1]
        if self.window is None or self.window >= T:
            return causal_attention(q, k, v)
        if self.use_flex and q.is_cuda:
            return _flex_sliding_window(q, k, v, self.window, halo=0)
        return windowed_attention(q, k, v, 0, 0, self.window)

    def _attend_cp(self, q, k, v, position_offset: int, docs=None):
        if self.window is None:
            from lctrain.parallel.ulysses import ulysses_attention

            k, v = self._replicate_kv_for_ulysses(k), self._replicate_kv_for_ulysses(v)
            if docs is None:
                return ulysses_attention(q, k, v, self.cp_group, causal_attention)
            # Ulysses attends over the whole sequence, whose documents every rank knows
            return ulysses_attention(q, k, v, self.cp_group, lambda q, k, v: self._attend_documents(q, k, v, docs))
        from lctrain.parallel.halo import prepend_halo

        halo = self.window - 1
        T = q.shape[1]
        if halo == 0:
            return windowed_attention(q, k, v, 0, 0, 1)  # each token sees itself only
        k = prepend_halo(k, halo, self.cp_group, dim=1)
        v = prepend_halo(v, halo, self.cp_group, dim=1)
        q_docs = k_docs = None
        if docs is not None:  # the halo keys' documents, from the global boundaries
            q_docs, k_docs = docs.local_doc_ids(), docs.doc_ids(docs.start - halo, docs.start + T)
        if self.use_flex and q.is_cuda:
            return _flex_sliding_window(q, k, v, self.window, halo=halo, first_valid=max(0, halo - position_offset),
                                        q_docs=q_docs, k_docs=k_docs, mask_cache=None if docs is None else docs.cache)
        return windowed_attention(q, k, v, position_offset, position_offset - halo, self.window, q_docs, k_docs)

    def _replicate_kv_for_ulysses(self, x):
        """GQA under Ulysses: with fewer kv heads than CP ranks each kv head is repeated so that every
        rank gets one (as DeepSpeed does); rank r's query heads all belong to that head's group."""
        P = group_size(self.cp_group)
        return expand_kv(x, P) if x.shape[2] % P else x

    def _attend_rerope(self, q, k, v, pos, cache: dict | None, docs=None):
        """Global attention with (Leaky) ReRoPE positions (lctrain/models/rerope.py); the decoding cache
        keeps unrotated keys and their positions. Documents: dense per-block masks from docs' ids."""
        from .rerope import rerope_attention

        window, leak = self.rope.rerope
        attend = lambda q, k, v, qp, kp, qd=None, kd=None: rerope_attention(  # noqa: E731
            q, k, v, self.rope, window, leak, qp, kp, qd, kd)
        if cache is not None:
            if self.cp_group is not None or docs is not None:
                raise ValueError("incremental decoding (cache=) is single-process and one document per prompt")
            if cache.get("k") is not None:
                k, v = torch.cat([cache["k"], k], dim=1), torch.cat([cache["v"], v], dim=1)
                k_pos = torch.cat([cache["pos"], pos])
            else:
                k_pos = pos
            cache["k"], cache["v"], cache["pos"] = k.detach(), v.detach(), k_pos
            return attend(q, k, v, pos, k_pos)
        if self.cp_group is None:
            ids = None if docs is None else docs.local_doc_ids()
            return attend(q, k, v, pos, pos, ids, ids)
        from lctrain.parallel.halo import gather_sequence
        from lctrain.parallel.ulysses import ulysses_attention

        full_pos = gather_sequence(pos[None], self.cp_group, dim=1)[0]
        full_ids = None if docs is None else docs.doc_ids(0, docs.total)
        k, v = self._replicate_kv_for_ulysses(k), self._replicate_kv_for_ulysses(v)
        return ulysses_attention(q, k, v, self.cp_group, lambda q, k, v: attend(q, k, v, full_pos, full_pos,
                                                                                 full_ids, full_ids))

    def _attend_cached(self, q, k, v, pos, cache: dict):
        if cache.get("k") is not None:
            k = torch.cat([cache["k"], k], dim=1)
            v = torch.cat([cache["v"], v], dim=1)
            k_pos = torch.cat([cache["pos"], pos])
            out = masked_attention(q, k, v, pos, k_pos, self.window)
        else:  # first prefill: the same kernels as training (no T x T mask for long prompts)
            k_pos = pos
            out = self._attend_local(q, k, v)
        keep = k.shape[1] if self.window is None else min(k.shape[1], self.window - 1)
        start = k.shape[1] - keep
        cache["k"], cache["v"], cache["pos"] = k[:, start:].detach(), v[:, start:].detach(), k_pos[start:]
        return out
