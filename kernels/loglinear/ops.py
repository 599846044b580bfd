"""Public log-linear ops: validation and backend dispatch.

State layout (initial_state / final state): [B, H, L, K, V], float32 (float64 for float64 inputs);
slot l holds the level-l bucket state of the LAST query seen (slot 0 = that token's own write), each
carried by the base transitions up to that query. It is only meaningful together with the global
position of the next token, ``position_offset``: an initial state describes the queries 0..p0-1 of the
sequence, so it needs position_offset = p0 >= 1 (a decoding cache keeps the count of tokens seen).
Slots above level bit_length(p0 - 1) cannot hold anything (no earlier query reaches them): they are
ignored (zero gradient) by every backend.

Backends: "naive" (token recurrence with Fenwick merges, the ground truth), "dense" (masked T x T form,
tests only), "torch" and "triton_composed" (chunk.py: levels 0..log2(chunk_size) in one intra-chunk pass
in torch, every higher level one run of the base op, on the torch or the Triton base kernels; forward and
backward alike: ~log2(T / C) base-op passes, kept as a reference), "triton" (fused.py: the same intra
pass, then every level above log2(64) in one Triton launch each way, ``triton_levels.py``; chunk_size 64,
float16 / bfloat16 / float32), "auto" ("triton" on CUDA when the Triton base op is available, else
"torch").

cu_seqlens (packed documents, B == 1): every document starts at position 0 and is run on its own (a
loop over the documents); the final state is then [N, H, L, K, V]; initial_state is refused with it.
"""
from __future__ import annotations

import numbers

import torch

from .. import api as base_api
from .chunk import loglinear_by_levels, runs_from_slots, slots_from_runs
from .dense import dense_loglinear
from .levels import levels_needed
from .naive import naive_loglinear

BACKENDS = ("auto", "naive", "dense", "torch", "triton", "triton_composed")
_BASE = {"gated_delta_rule": base_api.gated_delta_rule, "gated_linear_attn": base_api.gated_linear_attn}


def _validate(name, q, k, v, g, beta, level_weights, initial_state, position_offset, cu_seqlens, scale,
              chunk_size):
    base_api._validate(q, k, v, g=g, beta=beta, need_g=True, need_beta=beta is not None, scale=scale,
                       chunk_size=chunk_size)
    B, T, H, K = q.shape
    base_api._check_tensor("level_weights", level_weights, 4)
    if tuple(level_weights.shape[:3]) != (B, T, H):
        raise ValueError(f"{name}: level_weights must be [B, T, H, L] with B, T, H = {(B, T, H)}; got "
                         f"{tuple(level_weights.shape)}")
    if level_weights.device != q.device:
        raise ValueError(f"{name}: level_weights is on {level_weights.device}, q on {q.device}")
    if isinstance(position_offset, bool) or not isinstance(position_offset, numbers.Integral) \
            or position_offset < 0:
        raise ValueError(f"{name}: position_offset must be an int >= 0, got {position_offset!r}")
    L = level_weights.shape[-1]
    need = levels_needed(position_offset + T) if cu_seqlens is None else 0
    if L < need:
        raise ValueError(f"{name}: level_weights has L={L} levels but positions up to "
                         f"{position_offset + T - 1} reach level {need - 1}; give L >= {need} "
                         "(= bit_length(last position) + 1)")
    if cu_seqlens is not None:
        base_api.check_cu_seqlens(cu_seqlens, B, T, q.device)
        if initial_state is not None:
            raise ValueError(f"{name}: initial_state with cu_seqlens is not supported (every packed document "
                             "starts at position 0); pass initial_state=None")
        if position_offset:
            raise ValueError(f"{name}: position_offset must be 0 with cu_seqlens (every packed document starts "
                             "at position 0)")
        longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        if L < levels_needed(longest):
            raise ValueError(f"{name}: level_weights has L={L} levels but the longest document ({longest} tokens) "
                             f"reaches level {levels_needed(longest) - 1}; give L >= {levels_needed(longest)}")
        return
    if initial_state is not None:
        base_api._check_tensor("initial_state", initial_state, 5)
        want = (B, H, L, K, v.shape[-1])
        if tuple(initial_state.shape) != want:
            raise ValueError(f"{name}: initial_state must be the level states [B, H, L, K, V] = {list(want)}, "
                             f"got {list(initial_state.shape)}")
        if initial_state.device != q.device:
            raise ValueError(f"{name}: initial_state is on {initial_state.device}, q on {q.device}")
        if position_offset < 1:
            raise ValueError(f"{name}: an initial_state holds the level states of the tokens before this "
                             "call, so position_offset (the global position of the first token) must be >= 1; "
                             "pass the number of tokens the state has seen")


def _resolve(backend: str, base_name: str, device: torch.device) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} for the log-linear ops; choose one of {list(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and base_api._triton_fn(base_name)[0] is not None else "torch"
    if backend in ("triton", "triton_composed"):
        base_api.resolve_backend("triton", base_name, device)  # raises with the reason when unavailable
    return backend


def _run(name, base_name, q, k, v, g, beta, level_weights, scale, initial_state, output_final_state,
         position_offset, cu_seqlens, backend, chunk_size):
    _validate(name, q, k, v, g, beta, level_weights, initial_state, position_offset, cu_seqlens, scale,
              chunk_size)
    which = _resolve(backend, base_name, q.device)
    if which == "triton":
        _check_fused(chunk_size, q, k, v)
    if cu_seqlens is not None:  # one call per packed document, each starting at position 0
        bounds = base_api.check_cu_seqlens(cu_seqlens, q.shape[0], q.shape[1], q.device)
        outs, finals = [], []
        for bos, eos in zip(bounds, bounds[1:]):
            piece = lambda x, bos=bos, eos=eos: None if x is None else x[:, bos:eos]  # noqa: E731
            o, S = _run(name, base_name, piece(q), piece(k), piece(v), piece(g), piece(beta), piece(level_weights),
                        scale, None, output_final_state, 0, None, backend, chunk_size)
            outs.append(o)
            finals.append(S)
        return torch.cat(outs, dim=1), (torch.cat(finals, dim=0) if output_final_state else None)
    if initial_state is not None:
        reach = torch.arange(level_weights.shape[-1], device=q.device) <= (int(position_offset) - 1).bit_length()
        initial_state = initial_state * reach[:, None, None].to(initial_state.dtype)
    kw = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state,
              position_offset=int(position_offset))
    if which == "naive":
        return naive_loglinear(q, k, v, g, beta, level_weights, **kw)
    if which == "dense":
        return dense_loglinear(q, k, v, g, beta, level_weights, **kw)
    if which == "triton":
        return _fused(base_name, q, k, v, g, beta, level_weights, scale, initial_state, output_final_state,
                      int(position_offset), chunk_size)
    return _by_levels(base_name, q, k, v, g, beta, level_weights, scale, initial_state, output_final_state,
                      int(position_offset), "triton" if which == "triton_composed" else which, chunk_size)


def _check_fused(chunk_size, q, k, v):
    """Backend "triton" refuses what its kernels cannot take, before any work."""
    from ..triton.common import CHUNK
    if chunk_size != CHUNK:
        raise ValueError(f"log-linear backend 'triton' works in chunks of {CHUNK} tokens; got chunk_size="
                         f"{chunk_size}. Pass chunk_size={CHUNK}, or backend='torch' / 'triton_composed'.")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"log-linear backend 'triton' takes float16, bfloat16 or float32 {name}; got {x.dtype}. "
                            "Cast the inputs or use backend='torch'.")


def _fused(base_name, q, k, v, g, beta, level_weights, scale, initial_state, output_final_state, p0, chunk_size):
    """Backend "triton" (fused.py). A start inside a 64-token chunk is first brought to the chunk boundary
    by the per-level torch path (fewer than 64 tokens)."""
    from ..triton.common import CHUNK
    T = q.shape[1]
    head = (CHUNK - p0 % CHUNK) % CHUNK
    if head:
        cut = lambda x: (None if x is None else x[:, :head], None if x is None else x[:, head:])  # noqa: E731
        (q1, q2), (k1, k2), (v1, v2), (g1, g2), (b1, b2), (l1, l2) = map(cut, (q, k, v, g, beta, level_weights))
        want = output_final_state or head < T
        o1, S = _by_levels(base_name, q1, k1, v1, g1, b1, l1, scale, initial_state, want, p0, "torch", CHUNK)
        if head >= T:
            return o1, S
        o2, S = _fused(base_name, q2, k2, v2, g2, b2, l2, scale, S, output_final_state, p0 + head, CHUNK)
        return torch.cat([o1, o2], dim=1), S
    from .fused import fused_loglinear
    return fused_loglinear(_BASE[base_name], q, k, v, g, beta, level_weights, scale=scale,
                           initial_state=initial_state, output_final_state=output_final_state, position_offset=p0)


def _by_levels(base_name, q, k, v, g, beta, level_weights, scale, initial_state, output_final_state, p0, backend,
               chunk_size):
    """The per-level runs (chunk.py). A start inside a chunk is first brought to the next chunk boundary
    by a short call, so that the rest can take the one-pass intra-chunk levels."""
    T, C, L = q.shape[1], chunk_size, level_weights.shape[-1]
    head = (C - p0 % C) % C if C & (C - 1) == 0 else 0
    if 0 < head < T:
        cut = lambda x: (None if x is None else x[:, :head], None if x is None else x[:, head:])  # noqa: E731
        (q1, q2), (k1, k2), (v1, v2), (g1, g2), (b1, b2), (l1, l2) = map(cut, (q, k, v, g, beta, level_weights))
        o1, S = _by_levels(base_name, q1, k1, v1, g1, b1, l1, scale, initial_state, True, p0, backend, C)
        o2, S = _by_levels(base_name, q2, k2, v2, g2, b2, l2, scale, S, output_final_state, p0 + head, backend, C)
        return torch.cat([o1, o2], dim=1), S
    top = levels_needed(p0 + T) - 1
    run_init = None if initial_state is None else runs_from_slots(initial_state, p0)
    gates = (g,) if beta is None else (g, beta)
    o, runs = loglinear_by_levels(_BASE[base_name], q, k, v, gates, level_weights, scale=scale,
                                  run_init=run_init, position_offset=p0, top=top, backend=backend,
                                  chunk_size=chunk_size)
    return o, (slots_from_runs(runs, L) if output_final_state else None)


def loglinear_gated_delta_rule(q, k, v, g, beta, level_weights, *, scale=None, initial_state=None,
                               output_final_state=False, position_offset=0, cu_seqlens=None,
                               backend="auto", chunk_size=64):
    """Log-linear Gated DeltaNet: o_t = scale sum_{s<=t} lambda[t, level(t, s)] (write_s carried to t)^T q_t
    with A_r = exp(g_r)(I - beta_r k_r k_r^T) and write_s = beta_s k_s v_s^T (see levels.py).

    q, k [B, T, H, K]; v [B, T, H, V]; g, beta [B, T, H]; level_weights [B, T, H, L] with
    L >= bit_length(position_offset + T - 1) + 1. Returns (o [B, T, H, V] in q.dtype, final level states
    [B, H, L, K, V] or None). With every lambda = 1 it equals gated_delta_rule."""
    return _run("loglinear_gated_delta_rule", "gated_delta_rule", q, k, v, g, beta, level_weights, scale,
                initial_state, output_final_state, position_offset, cu_seqlens, backend, chunk_size)


def loglinear_gated_linear_attn(q, k, v, g, level_weights, *, scale=None, initial_state=None,
                                output_final_state=False, position_offset=0, cu_seqlens=None,
                                backend="auto", chunk_size=64):
    """Log-linear Mamba-2: as loglinear_gated_delta_rule with A_r = exp(g_r) I and write_s = k_s v_s^T.
    With every lambda = 1 it equals gated_linear_attn."""
    return _run("loglinear_gated_linear_attn", "gated_linear_attn", q, k, v, g, None, level_weights, scale,
                initial_state, output_final_state, position_offset, cu_seqlens, backend, chunk_size)
