"""Multi-head latent attention (MLA, DeepSeek-V2 style) for global attention layers: low-rank keys and
values with a decoupled RoPE part (model.mla_kv_rank > 0 turns it on for the "A" layers).

    c = RMSNorm(x W_dkv)                      [r]       the latent every head's k and v come from
    k_h = [c W_uk_h, rope(x W_kr)]            [D + R]   (the rope part is one vector shared by the heads)
    v_h = c W_uv_h                            [D]
    q_h = [x W_q_h, rope(x W_qr_h)]           [D + R]
    o_h = causal softmax(q_h . k_h / sqrt(D + R)) v_h,  out = [o_h] W_o

Positions live only in the R decoupled dims, so the up-projections can be absorbed at decoding:
q_h . (c_s W_uk_h) = (W_uk_h^T q_h) . c_s and sum_s p_s c_s W_uv_h = (sum_s p_s c_s) W_uv_h, and the
decoding cache holds just c (r numbers) and the rotated shared rope key (R numbers) per token,
instead of 2 H D. Training, prefill under CP and documents use the materialised k and v with the
ordinary attention kernels (Ulysses under CP).

Tensor parallelism (tp_group of size tp > 1) splits the heads, not the latent: W_q, W_uk and W_uv are
column-parallel (rank r holds the query, key and value up-projections of its attn_heads / tp heads)
and W_o row-parallel, while W_dkv, the latent's RMSNorm and W_kr are replicated. Every head reads the
whole latent c and the one shared rope key, so splitting W_dkv's rank would need an all-gather of c
(and of its norm's statistics) in every layer; replicated, each rank computes c once from the input
it already has, at the price of d_model * (r + R) + r extra weights per rank (small beside the
per-head matrices at r << heads * head_dim). The latent feeds only the column-parallel W_uk / W_uv,
whose backward sums c's gradient over the TP group (like the norm before a transformer's q/k/v), so
W_dkv and its norm get whole gradients. The rope key is used directly by this rank's heads: W_kr's
gradient is a partial sum (marked for `reduce_partial_grads`) and its input goes through
`to_tp_region`, whose backward sums the ranks' input gradients. The decoding cache is per rank.
"""
from __future__ import annotations

import torch
from torch import nn

from lctrain.parallel.mesh import group_size
from lctrain.parallel.tensor_parallel import column_linear, local_size, mark_partial_grad, row_linear, to_tp_region

from .attention import causal_attention, document_causal_attention
from .layers import RMSNorm
from .rope import RotaryEmbedding


class MLAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, head_dim: int, *, kv_rank: int, rope_dim: int,
                 rope: RotaryEmbedding | None, norm_eps: float = 1e-6, cp_group=None, tp_group=None):
        super().__init__()
        if kv_rank < 1 or rope_dim < 2 or rope_dim % 2:
            raise ValueError(f"MLA needs model.mla_kv_rank >= 1 and an even model.mla_rope_dim >= 2; got "
                             f"{kv_rank}, {rope_dim}")
        self.n_heads = local_size(n_heads, tp_group, "model.attn_heads")
        self.head_dim, self.rope_dim = head_dim, rope_dim
        self.tp_group = tp_group if group_size(tp_group) > 1 else None
        self.q_proj = column_linear(d_model, n_heads * (head_dim + rope_dim), tp_group)
        self.kv_down = nn.Linear(d_model, kv_rank, bias=False)  # replicated under TP, as are kv_norm, k_rope
        self.kv_norm = RMSNorm(kv_rank, norm_eps)
        self.k_up = column_linear(kv_rank, n_heads * head_dim, tp_group)
        self.v_up = column_linear(kv_rank, n_heads * head_dim, tp_group)
        self.k_rope = nn.Linear(d_model, rope_dim, bias=False)
        self.o_proj = row_linear(n_heads * head_dim, d_model, tp_group)
        if self.tp_group is not None:
            mark_partial_grad(self.k_rope.weight)
        self.o_proj.is_output_projection = True
        # the decoupled part has its own frequencies (rope_dim dims, the model's base); None = NoPE
        self.rope = None if rope is None else RotaryEmbedding(rope_dim, float(rope.base))
        self.cp_group = cp_group if group_size(cp_group) > 1 else None

    def new_cache(self, batch_size: int, device) -> dict:
        return {}

    def forward(self, x: torch.Tensor, position_offset: int = 0, cache: dict | None = None,
                docs=None) -> torch.Tensor:
        B, T, _ = x.shape
        H, D, R = self.n_heads, self.head_dim, self.rope_dim
        pos = torch.arange(position_offset, position_offset + T, device=x.device)
        q_nope, q_rope = self.q_proj(x).view(B, T, H, D + R).split([D, R], dim=-1)
        c = self.kv_norm(self.kv_down(x))  # W_uk / W_uv (column-parallel) sum its gradient over TP
        k_rope = self.k_rope(to_tp_region(x, self.tp_group)).view(B, T, 1, R)  # used by local heads only
        if self.rope is not None:
            q_rope, k_rope = self.rope(q_rope, pos), self.rope(k_rope, pos)
        if cache is not None:
            if self.cp_group is not None or docs is not None:
                raise ValueError("incremental decoding (cache=) is single-process, one document per prompt")
            out = self._absorbed(q_nope, q_rope, c, k_rope[:, :, 0], pos, cache)
        else:
            q = torch.cat([q_nope, q_rope], dim=-1)
            k = torch.cat([self.k_up(c).view(B, T, H, D), k_rope.expand(B, T, H, R)], dim=-1)
            v = self.v_up(c).view(B, T, H, D)
            attend = causal_attention if docs is None else (
                # global bounds: fit Ulysses' full sequence
                lambda q, k, v: document_causal_attention(q, k, v, docs.bounds))
            if self.cp_group is not None:
                from lctrain.parallel.ulysses import ulysses_attention

                out = ulysses_attention(q, k, v, self.cp_group, attend)
            else:
                out = attend(q, k, v)
        return self.o_proj(out.reshape(B, T, H * D))

    def _absorbed(self, q_nope, q_rope, c, k_rope, pos, cache: dict) -> torch.Tensor:
        """Decoding on the latent cache (module doc): scores from W_uk^T q against c plus the rope
        part, values (sum_s p_s c_s) W_uv."""
        H, D = self.n_heads, self.head_dim
        if cache.get("c") is not None:
            c = torch.cat([cache["c"], c], dim=1)
            k_rope = torch.cat([cache["k_rope"], k_rope], dim=1)
            k_pos = torch.cat([cache["pos"], pos])
        else:
            k_pos = pos
        cache["c"], cache["k_rope"], cache["pos"] = c.detach(), k_rope.detach(), k_pos
        w_uk = self.k_up.weight.view(H, D, -1)
        w_uv = self.v_up.weight.view(H, D, -1)
        q_lat = torch.einsum("bthd,hdr->bthr", q_nope, w_uk)
        scores = (torch.einsum("bthr,bsr->bhts", q_lat, c) + torch.einsum("bthe,bse->bhts", q_rope, k_rope))
        scores = scores * (D + self.rope_dim) ** -0.5
        scores = scores.masked_fill(~(k_pos[None, :] <= pos[:, None]), float("-inf"))
        o_lat = torch.einsum("bhts,bsr->bthr", torch.softmax(scores.float(), dim=-1).to(c.dtype), c)
        return torch.einsum("bthr,hdr->bthd", o_lat, w_uv)
