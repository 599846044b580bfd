"""Linear-recurrent mixers: Gated DeltaNet ("G"), DeltaNet ("D") and a Mamba-2-style gated linear
attention ("M"), on the ops of `lctrain.kernels` (backend = model.kernel_backend, chunk = model.chunk_size).

DeltaNet / Gated DeltaNet (Yang et al. 2024):
  q, k, v = silu(conv(x W_q)), silu(conv(x W_k)), silu(conv(x W_v))   (short causal depthwise conv)
  q, k L2-normalised per head; beta = sigmoid(x W_b) per head;
  gated only: g = -exp(A_log) * softplus(x W_a + dt_bias)  (log-decay per head and token, Mamba-style)
  o = op(q, k, v, [g], beta); o = RMSNorm(o) * silu(x W_g) per head; out = o W_o.
Mamba-2 style (scalar gate per head, no beta; heads have their own B/C, i.e. one "group" per head):
  xs, z = x W_x, x W_z;  B, C = x W_B, x W_C;  xs, B, C go through the short conv + SiLU;
  dt = softplus(x W_dt + dt_bias) per head;  g = -exp(A_log) * dt;
  o = gated_linear_attn(q=C, k=B, v=dt * xs, g) + D * xs;  o = RMSNorm(o) * silu(z);  out = o W_o.

Under tensor parallelism (tp_group of size tp > 1) each rank owns n_heads / tp heads: the input
projections are column-parallel, the per-head parameters (A_log, dt_bias, D, conv channels) hold
this rank's heads, the gated output norm works on local heads (its per-head-dim weight is shared,
so its gradient is summed over the TP group) and the output projection is row-parallel.

Under CP the op is wrapped with `lctrain.parallel.context_parallel(op, cp_group)` (its default transition
"auto": "pipeline" at 2 CP ranks on the Triton backend without documents, else "sequential") and each
conv gets the previous rank's last conv_size-1 inputs via `prepend_halo`. Both are imported only when CP is on.

Packed documents (`docs`, lctrain.models.documents.Documents): the convs drop taps from the previous
document and the op restarts its state at every boundary (`cu_seqlens`): the batch rows go end to end
as one B=1 stream on one process; under CP each row runs with its global boundaries.

Incremental decoding: the cache holds the recurrent state [B, H, K, V] (float32) and each conv's tail.
A prefill calls the chunk op with initial_state / output_final_state; a one-token step calls it with T=1.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lctrain import kernels
from lctrain.parallel.mesh import group_size
from lctrain.parallel.tensor_parallel import column_linear, local_size, mark_partial_grad, mark_split, row_linear

from .fused import compiled, l2norm_math
from .layers import GatedRMSNorm, ShortConv, l2_norm, run_short_conv


def _init_decay_params(n_heads: int, A_init_range=(1.0, 16.0), dt_min=1e-3, dt_max=0.1):
    """Mamba-2's init: A ~ U(A_init_range) stored as log, dt ~ logU(dt_min, dt_max) stored through the
    inverse softplus so that softplus(dt_bias) = dt at initialisation."""
    A = torch.empty(n_heads).uniform_(*A_init_range)
    dt = torch.exp(torch.rand(n_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=1e-4)
    dt_bias = dt + torch.log(-torch.expm1(-dt))
    return nn.Parameter(torch.log(A)), nn.Parameter(dt_bias)


def _mark_head_params(mixer: nn.Module) -> None:
    """Tensor-parallel roles of the parameters a mixer owns directly: per-head vectors and conv
    channels are this rank's heads (split along dim 0); the output norm's weight is shared by the
    heads, so each TP rank holds part of its gradient."""
    for name in ("A_log", "dt_bias", "D"):
        if hasattr(mixer, name):
            mark_split(getattr(mixer, name), 0)
    for module in mixer.children():
        if isinstance(module, ShortConv):
            mark_split(module.weight, 0)
    mark_partial_grad(mixer.o_norm.weight)


class _LinearMixerBase(nn.Module):
    """Shared plumbing: the op (wrapped for CP lazily), conv halos, cache handling."""

    op_name: str = ""
    compiled = False  # model.compile: the L2 norms of q, k compiled (lctrain.models.fused)

    def __init__(self, *, n_heads: int, head_dim: int, conv_size: int, backend: str, chunk_size: int, cp_group=None):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.conv_size = conv_size
        self.backend, self.chunk_size = backend, chunk_size
        self.cp_group = cp_group if group_size(cp_group) > 1 else None
        self._cp_op = None
        self._cp_row_ops: dict[int, object] = {}  # rows > 0 of a batch with documents under CP

    def _op(self, row: int = 0):
        """The op; under CP its context-parallel callable, one per batch row that runs alone (packed
        documents), so that each holds one live forward and checkpoint replays reuse its states."""
        op = getattr(kernels, self.op_name)
        if self.cp_group is None:
            return op
        from lctrain.parallel import context_parallel

        if row > 0:
            if row not in self._cp_row_ops:
                self._cp_row_ops[row] = context_parallel(op, self.cp_group)
            return self._cp_row_ops[row]
        if self._cp_op is None:
            self._cp_op = context_parallel(op, self.cp_group)
        return self._cp_op

    def cp_ops(self) -> list:
        """Every context-parallel callable this mixer made (counters for tests and benchmarks)."""
        return [op for op in [self._cp_op, *self._cp_row_ops.values()] if op is not None]

    def _conv(self, conv: ShortConv, x: torch.Tensor, cache: dict | None, name: str, docs=None) -> torch.Tensor:
        return run_short_conv(conv, x, cache, name, self.cp_group, docs)

    def _op_extras(self, x: torch.Tensor, position_offset: int, cache: dict | None) -> tuple[tuple, dict]:
        """Extra positional args and keywords of this mixer's op (none here; the log-linear mixers add
        level weights and positions)."""
        return (), {}

    def _run_op(self, args: tuple, cache: dict | None, scale=None, docs=None, x: torch.Tensor | None = None,
                position_offset: int = 0) -> torch.Tensor:
        kw = dict(backend=self.backend, chunk_size=self.chunk_size)
        if scale is not None:
            kw["scale"] = scale
        if x is not None:
            extra_args, extra_kw = self._op_extras(x, position_offset, cache)
            args, kw = args + extra_args, {**kw, **extra_kw}
        if cache is not None:
            if self.cp_group is not None:
                raise ValueError("incremental decoding (cache=) is single-process; build the model with cp_group=None")
            o, state = self._op()(*args, initial_state=cache.get("state"), output_final_state=True, **kw)
            cache["state"] = state.detach()
            return o
        if docs is not None:
            return self._run_documents(args, docs, kw)
        o, _ = self._op()(*args, **kw)
        return o

    def _run_documents(self, args: tuple, docs, kw: dict) -> torch.Tensor:
        B, T = args[0].shape[:2]
        if self.cp_group is None:
            cu = docs.packed_cu_seqlens()
            if cu is None:
                return self._op()(*args, **kw)[0]
            packed = [a.reshape(1, B * T, *a.shape[2:]) for a in args]
            o, _ = self._op()(*packed, cu_seqlens=cu, **kw)
            return o.reshape(B, T, *o.shape[2:])
        # CP ops take one row's global boundaries (B = 1): one call (and one state all-gather) per row
        outs = [self._op(b)(*(a[b:b + 1] for a in args), cu_seqlens=docs.row_cu_seqlens(b), **kw)[0]
                for b in range(B)]
        return outs[0] if B == 1 else torch.cat(outs)

    def new_cache(self, batch_size: int, device) -> dict:
        return {}


class DeltaNetMixer(_LinearMixerBase):
    """DeltaNet (gated=False, op delta_rule) or Gated DeltaNet (gated=True, op gated_delta_rule)."""

    def __init__(self, d_model: int, *, n_heads: int, head_dim: int, conv_size: int, gated: bool,
                 backend: str = "auto", chunk_size: int = 64, norm_eps: float = 1e-6, cp_group=None, tp_group=None):
        heads = local_size(n_heads, tp_group, "model.n_heads")
        super().__init__(n_heads=heads, head_dim=head_dim, conv_size=conv_size, backend=backend,
                         chunk_size=chunk_size, cp_group=cp_group)
        self.gated = gated
        self.op_name = "gated_delta_rule" if gated else "delta_rule"
        inner, local_inner = n_heads * head_dim, heads * head_dim
        self.q_proj = column_linear(d_model, inner, tp_group)
        self.k_proj = column_linear(d_model, inner, tp_group)
        self.v_proj = column_linear(d_model, inner, tp_group)
        self.b_proj = column_linear(d_model, n_heads, tp_group)
        if gated:
            self.a_proj = column_linear(d_model, n_heads, tp_group)
            self.A_log, self.dt_bias = _init_decay_params(heads)
        self.q_conv = ShortConv(local_inner, conv_size, backend=backend)
        self.k_conv = ShortConv(local_inner, conv_size, backend=backend)
        self.v_conv = ShortConv(local_inner, conv_size, backend=backend)
        self.g_proj = column_linear(d_model, inner, tp_group)
        self.o_norm = GatedRMSNorm(head_dim, eps=norm_eps)
        self.o_proj = row_linear(inner, d_model, tp_group)
        self.o_proj.is_output_projection = True
        _mark_head_params(self)

    def forward(self, x: torch.Tensor, position_offset: int = 0, cache: dict | None = None,
                docs=None) -> torch.Tensor:
        B, T, _ = x.shape
        H, D = self.n_heads, self.head_dim
        q = self._conv(self.q_conv, self.q_proj(x), cache, "q_conv", docs).view(B, T, H, D)
        k = self._conv(self.k_conv, self.k_proj(x), cache, "k_conv", docs).view(B, T, H, D)
        v = self._conv(self.v_conv, self.v_proj(x), cache, "v_conv", docs).view(B, T, H, D)
        l2norm = compiled(l2norm_math) if self.compiled else l2_norm
        q, k = l2norm(q), l2norm(k)
        v = v.to(q.dtype)
        beta = torch.sigmoid(self.b_proj(x).float())
        if self.gated:
            g = -torch.exp(self.A_log.float()) * F.softplus(self.a_proj(x).float() + self.dt_bias.float())
            o = self._run_op((q, k, v, g, beta), cache, docs=docs, x=x, position_offset=position_offset)
        else:
            o = self._run_op((q, k, v, beta), cache, docs=docs, x=x, position_offset=position_offset)
        o = self.o_norm(o, self.g_proj(x).view(B, T, H, D))
        return self.o_proj(o.reshape(B, T, H * D).to(x.dtype))


class Mamba2Mixer(_LinearMixerBase):
    """Mamba-2-style scalar-gated linear attention on `gated_linear_attn` (see module doc)."""

    op_name = "gated_linear_attn"

    def __init__(self, d_model: int, *, n_heads: int, head_dim: int, conv_size: int,
                 backend: str = "auto", chunk_size: int = 64, norm_eps: float = 1e-6, cp_group=None, tp_group=None):
        heads = local_size(n_heads, tp_group, "model.n_heads")
        super().__init__(n_heads=heads, head_dim=head_dim, conv_size=conv_size, backend=backend,
                         chunk_size=chunk_size, cp_group=cp_group)
        inner, local_inner = n_heads * head_dim, heads * head_dim
        self.x_proj = column_linear(d_model, inner, tp_group)
        self.z_proj = column_linear(d_model, inner, tp_group)
        self.B_proj = column_linear(d_model, inner, tp_group)
        self.C_proj = column_linear(d_model, inner, tp_group)
        self.dt_proj = column_linear(d_model, n_heads, tp_group)
        self.A_log, self.dt_bias = _init_decay_params(heads)
        self.D = nn.Parameter(torch.ones(heads))
        self.x_conv = ShortConv(local_inner, conv_size, backend=backend)
        self.B_conv = ShortConv(local_inner, conv_size, backend=backend)
        self.C_conv = ShortConv(local_inner, conv_size, backend=backend)
        self.o_norm = GatedRMSNorm(head_dim, eps=norm_eps)
        self.o_proj = row_linear(inner, d_model, tp_group)
        self.o_proj.is_output_projection = True
        _mark_head_params(self)

    def forward(self, x: torch.Tensor, position_offset: int = 0, cache: dict | None = None,
                docs=None) -> torch.Tensor:
        B, T, _ = x.shape
        H, D = self.n_heads, self.head_dim
        xs = self._conv(self.x_conv, self.x_proj(x), cache, "x_conv", docs).view(B, T, H, D)
        k = self._conv(self.B_conv, self.B_proj(x), cache, "B_conv", docs).view(B, T, H, D)
        q = self._conv(self.C_conv, self.C_proj(x), cache, "C_conv", docs).view(B, T, H, D)
        dt = F.softplus(self.dt_proj(x).float() + self.dt_bias.float())  # [B, T, H]
        g = -torch.exp(self.A_log.float()) * dt
        v = (xs.float() * dt[..., None]).to(q.dtype)
        o = self._run_op((q, k.to(q.dtype), v, g), cache, docs=docs, x=x, position_offset=position_offset)
        o = o.float() + self.D.float()[:, None] * xs.float()
        o = self.o_norm(o, self.z_proj(x).view(B, T, H, D))
        return self.o_proj(o.reshape(B, T, H * D).to(x.dtype))
