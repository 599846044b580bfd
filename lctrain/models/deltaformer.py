"""Deltaformer layer ("F" in model.layer_pattern): softmax attention whose values are rewritten by
the delta rule with a softmax kernel (``lctrain.kernels.deltaformer``):

    q, k, v = x W_q, x W_k, x W_v (heads: model.attn_heads x model.attn_head_dim), RoPE on q and k
    beta = sigmoid(x W_b) per head
    u_t = v_t - beta_t sum_{j<t} softmax_j(k_t . k_j / sqrt(d)) u_j,   o_t = causal attention(q, k, u)
    out = o W_o

RoPE follows model.rope.layers like a global attention layer ("sliding": no positions here).
Documents (doc_ids) are kept apart in both passes. Under CP (cp_group of size > 1):
``lctrain.parallel.deltaformer_cp`` with its default schedule (the pipelined u-pass: ranks stream
their u to later ranks piece by piece). Decoding: the cache keeps
the keys (after RoPE) and u of every token seen; a new token's u reads them, then its query attends
over them like a KV cache with u in place of v.

Under tensor parallelism (tp_group of size tp > 1) each rank owns attn_heads / tp heads: q, k, v and
beta are column-parallel (the u pass and the attention are per head, so nothing else is shared) and
the output projection is row-parallel; under CP the rank gathers the earlier keys of its own heads.
"""
from __future__ import annotations

import torch
from torch import nn

from lctrain.kernels.deltaformer import deltaformer, deltaformer_by_documents
from lctrain.kernels.deltaformer.naive import naive_u_pass
from lctrain.kernels.deltaformer.readout import prefix_readout
from lctrain.parallel.mesh import group_size
from lctrain.parallel.tensor_parallel import column_linear, local_size, row_linear

from .rope import RotaryEmbedding


class DeltaformerMixer(nn.Module):
    def __init__(self, d_model: int, n_heads: int, head_dim: int, *, rope: RotaryEmbedding | None,
                 backend: str = "auto", chunk_size: int = 64, cp_group=None, tp_group=None):
        super().__init__()
        self.n_heads, self.head_dim = local_size(n_heads, tp_group, "model.attn_heads"), head_dim
        self.backend, self.chunk_size = backend, chunk_size
        inner = n_heads * head_dim
        self.q_proj = column_linear(d_model, inner, tp_group)
        self.k_proj = column_linear(d_model, inner, tp_group)
        self.v_proj = column_linear(d_model, inner, tp_group)
        self.b_proj = column_linear(d_model, n_heads, tp_group)
        self.o_proj = row_linear(inner, d_model, tp_group)
        self.o_proj.is_output_projection = True
        self.rope = rope
        self.cp_group = cp_group if group_size(cp_group) > 1 else None

    def new_cache(self, batch_size: int, device) -> dict:
        return {}

    def forward(self, x: torch.Tensor, position_offset: int = 0, cache: dict | None = None,
                docs=None) -> torch.Tensor:
        """docs (lctrain.models.documents.Documents, optional): packed documents kept apart."""
        B, T, _ = x.shape
        H, D = self.n_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, D)
        k = self.k_proj(x).view(B, T, H, D)
        v = self.v_proj(x).view(B, T, H, D)
        beta = torch.sigmoid(self.b_proj(x).float())
        if self.rope is not None:
            pos = torch.arange(position_offset, position_offset + T, device=x.device)
            q, k = self.rope(q, pos), self.rope(k, pos)
        kw = dict(backend=self.backend, chunk_size=self.chunk_size)
        doc_ids = None if docs is None else docs.local_doc_ids()  # global document index per local token
        if cache is not None:
            if self.cp_group is not None:
                raise ValueError("incremental decoding (cache=) is single-process; build the model with cp_group=None")
            if docs is not None:
                raise ValueError("document masking (docs) does not apply to incremental decoding")
            o = self._decode(q, k, v, beta, cache)
        elif self.cp_group is not None:
            from lctrain.parallel.deltaformer_cp import deltaformer_cp

            o = deltaformer_cp(q, k, v, beta, self.cp_group, doc_ids=doc_ids, **kw)
        else:
            o = deltaformer_by_documents(q, k, v, beta, doc_ids, **kw)
        return self.o_proj(o.reshape(B, T, H * D).to(x.dtype))

    def _decode(self, q, k, v, beta, cache: dict) -> torch.Tensor:
        """Prefill (empty cache): the training kernels, keeping k and u. Later tokens: their u from the
        cached keys / u token by token, then attention over every cached key with u as values."""
        scale = self.head_dim ** -0.5
        if cache.get("k") is None:
            o, u = deltaformer(q, k, v, beta, backend=self.backend, chunk_size=self.chunk_size, return_u=True)
            cache["k"], cache["u"] = k.detach(), u.detach()
            return o
        u = naive_u_pass(k, v, beta, scale, prefix_k=cache["k"], prefix_u=cache["u"]).to(v.dtype)
        cache["k"] = torch.cat([cache["k"], k.detach()], dim=1)
        cache["u"] = torch.cat([cache["u"], u.detach()], dim=1)
        return prefix_readout(q, cache["k"], cache["u"], scale)
