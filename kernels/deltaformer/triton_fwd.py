"""Triton statistics of a chunk of Deltaformer's u-pass: the pass over all earlier keys.

For the rows t of the chunk [s, e) the earlier chunks' keys j < s are split into ranges of G keys;
one program per (block of rows, range) streams its keys flash-attention style and writes the
online-softmax state of its range: running max m, sum l and acc = sum_j exp(S[t, j] - m) u_j.
The ranges are what fill the GPU late in a long sequence (a chunk has few rows but up to T earlier
keys). ``chunk.merge_intra_chunk`` (torch, O(c^2)) then merges the ranges by their maxima, adds the
chunk's own strictly earlier keys and returns the statistics ``chunk.chunk_forward`` solves with:

    w_prev_t = P[t, :s] @ u[:s],  P[t, s:e] (j < t),  lse_t over ALL j < t.

The scores block [c, s] is never materialised; the partial states are [ranges, c, V].
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk import NEG, Stages, merge_intra_chunk


@triton.jit
def _prefix_partials_kernel(k_ptr, u_ptr, m_ptr, l_ptr, acc_ptr, s, c, T, G, NS, scale,
                            K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                            BR: tl.constexpr, BT: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_g = tl.program_id(1)
    bh = tl.program_id(2)
    k_base = k_ptr + bh * T * K
    u_base = u_ptr + bh * T * V
    r_loc = pid_r * BR + tl.arange(0, BR)          # row index inside the chunk
    rows = s + r_loc
    row_ok = r_loc < c
    dk = tl.arange(0, BK)
    dv = tl.arange(0, BV)
    kq = tl.load(k_base + rows[:, None] * K + dk[None, :], mask=row_ok[:, None] & (dk[None, :] < K), other=0.0)
    m = tl.full([BR], NEG, tl.float32)
    l = tl.zeros([BR], tl.float32)
    acc = tl.zeros([BR, BV], tl.float32)
    j_lo = pid_g * G
    j_hi = tl.minimum(j_lo + G, s)
    for j0 in range(j_lo, j_hi, BT):                # every key j < s precedes every row: no causal mask
        cols = j0 + tl.arange(0, BT)
        col_ok = cols < j_hi
        kj = tl.load(k_base + cols[:, None] * K + dk[None, :], mask=col_ok[:, None] & (dk[None, :] < K), other=0.0)
        sc = tl.dot(kq, tl.trans(kj)) * scale
        ok = row_ok[:, None] & col_ok[None, :]
        sc = tl.where(ok, sc, NEG)
        m_new = tl.maximum(m, tl.max(sc, 1))
        alpha = tl.exp(m - m_new)
        p = tl.where(ok, tl.exp(sc - m_new[:, None]), 0.0)
        l = l * alpha + tl.sum(p, 1)
        uj = tl.load(u_base + cols[:, None] * V + dv[None, :], mask=col_ok[:, None] & (dv[None, :] < V), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p, uj)
        m = m_new
    out = (bh * NS + pid_g) * c + r_loc
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(l_ptr + out, l, mask=row_ok)
    tl.store(acc_ptr + out[:, None] * V + dv[None, :], acc, mask=row_ok[:, None] & (dv[None, :] < V))


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def _range_len(s: int, programs_per_range: int, BT: int, device: torch.device) -> int:
    """Keys per range: enough ranges for ~4 programs per SM on CUDA, at least 8 key blocks each;
    one key block per range in the interpreter (so tests cross many ranges)."""
    if device.type != "cuda":
        return BT
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    ranges = max(1, -(-4 * sms // programs_per_range))
    per_range = -(-s // ranges)
    return max(8 * BT, -(-per_range // BT) * BT)


def triton_chunk_stats(k: torch.Tensor, u: torch.Tensor, s: int, e: int, scale: float):
    """Same contract as ``chunk.torch_chunk_stats``; k [B, H, T, K], u [B, H, T, V] contiguous float32."""
    if k.dtype != torch.float32:
        raise TypeError(f"deltaformer triton u-pass computes in float32; got k in {k.dtype}")
    B, H, T, K = k.shape
    V = u.shape[-1]
    c = e - s
    kc = k[:, :, s:e]
    if s == 0:
        m = k.new_full((B, H, c), NEG)
        return merge_intra_chunk(kc, m, torch.zeros_like(m), k.new_zeros(B, H, c, V), scale)
    BR = min(64, _pow2(c))
    BT = 64 if max(K, V) <= 128 else 32
    row_blocks = triton.cdiv(c, BR)
    G = _range_len(s, row_blocks * B * H, BT, k.device)
    NS = triton.cdiv(s, G)
    m_p = torch.empty(B, H, NS, c, device=k.device, dtype=torch.float32)
    l_p = torch.empty_like(m_p)
    acc_p = torch.empty(B, H, NS, c, V, device=k.device, dtype=torch.float32)
    _prefix_partials_kernel[(row_blocks, NS, B * H)](
        k, u, m_p, l_p, acc_p, s, c, T, G, NS, float(scale), K=K, V=V, BK=_pow2(K), BV=_pow2(V), BR=BR, BT=BT,
        num_warps=4 if max(K, V) <= 64 else 8)
    m = m_p.amax(2)
    a = torch.exp(m_p - m[:, :, None])
    return merge_intra_chunk(kc, m, (l_p * a).sum(2), (acc_p * a[..., None]).sum(2), scale)


def triton_stages() -> Stages:
    from .triton_bwd import triton_chunk_push, triton_key_grads
    return Stages(triton_chunk_stats, triton_chunk_push, triton_key_grads)
