"""Triton statistics of Deltaformer's u-pass: rows against a range of earlier keys.

``_partials_kernel``: for a block of rows (keys k_r) and a range of G earlier keys (k_j, u_j), every
key preceding every row, one program streams the keys flash-attention style and writes the
online-softmax state of its range: running max m, sum l and acc = sum_j exp(S[t, j] - m) u_j with
S = scale k_t . k_j. Ranges are merged by their maxima (``merge_partials``).

- A chunk [s, e) of the single-process u-pass (``triton_chunk_stats``): its rows against the keys
  j < s, split into ranges sized to fill the GPU (late in a long sequence a chunk has few rows but
  up to T earlier keys); ``chunk.merge_intra_chunk`` (torch, O(c^2)) adds the chunk's own strictly
  earlier keys and gives the statistics ``chunk.chunk_forward`` solves with.
- Context parallelism (``triton_block_partials``): a rank's rows against a piece of an earlier
  rank's keys and u.

Nothing of size rows x keys is materialised; the partial states are [ranges, rows, V].
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk import NEG, Stages, merge_intra_chunk, merge_partials


@triton.jit
def _partials_kernel(kr_ptr, kk_ptr, uk_ptr, m_ptr, l_ptr, acc_ptr, nrows, Tr, key_hi, Tk, G, NS, scale,
                     K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     BR: tl.constexpr, BT: tl.constexpr):
    """Rows kr[bh, :nrows] (per-head stride Tr rows) against keys kk / uk[bh, range] (stride Tk),
    range = [pid_g G, min(pid_g G + G, key_hi))."""
    pid_r = tl.program_id(0)
    pid_g = tl.program_id(1)
    bh = tl.program_id(2)
    r_loc = pid_r * BR + tl.arange(0, BR)
    row_ok = r_loc < nrows
    dk = tl.arange(0, BK)
    dv = tl.arange(0, BV)
    kq = tl.load(kr_ptr + bh * Tr * K + r_loc[:, None] * K + dk[None, :], mask=row_ok[:, None] & (dk[None, :] < K),
                 other=0.0)
    m = tl.full([BR], NEG, tl.float32)
    l = tl.zeros([BR], tl.float32)
    acc = tl.zeros([BR, BV], tl.float32)
    j_lo = pid_g * G
    j_hi = tl.minimum(j_lo + G, key_hi)
    for j0 in range(j_lo, j_hi, BT):
        cols = j0 + tl.arange(0, BT)
        col_ok = cols < j_hi
        kj = tl.load(kk_ptr + bh * Tk * K + cols[:, None] * K + dk[None, :], mask=col_ok[:, None] & (dk[None, :] < K),
                     other=0.0)
        sc = tl.dot(kq, tl.trans(kj)) * scale
        ok = row_ok[:, None] & col_ok[None, :]
        sc = tl.where(ok, sc, NEG)
        m_new = tl.maximum(m, tl.max(sc, 1))
        alpha = tl.exp(m - m_new)
        p = tl.where(ok, tl.exp(sc - m_new[:, None]), 0.0)
        l = l * alpha + tl.sum(p, 1)
        uj = tl.load(uk_ptr + bh * Tk * V + cols[:, None] * V + dv[None, :],
                     mask=col_ok[:, None] & (dv[None, :] < V), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p, uj)
        m = m_new
    out = (bh * NS + pid_g) * nrows + r_loc
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(l_ptr + out, l, mask=row_ok)
    tl.store(acc_ptr + out[:, None] * V + dv[None, :], acc, mask=row_ok[:, None] & (dv[None, :] < V))


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def _check(k):
    if k.dtype != torch.float32:
        raise TypeError(f"deltaformer triton u-pass computes in float32; got k in {k.dtype}")


def _range_len(n_keys: int, programs_per_range: int, BT: int, device: torch.device) -> int:
    """Keys per range: enough ranges for ~4 programs per SM on CUDA, at least 8 key blocks each;
    one key block per range in the interpreter (so the tests cross many ranges)."""
    if device.type != "cuda":
        return BT
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    ranges = max(1, -(-4 * sms // programs_per_range))
    per_range = -(-n_keys // ranges)
    return max(8 * BT, -(-per_range // BT) * BT)


def _partials(kr, kk, uk, nrows: int, Tr: int, key_hi: int, Tk: int, scale: float):
    """(m, l, acc) [B, H, NS, nrows(, V)] of the rows kr against keys kk / uk [.., :key_hi]; kr, kk, uk
    are (views of) contiguous [B, H, Tr | Tk, *] float32 tensors starting at their first row / key."""
    B, H = kr.shape[:2]
    K, V = kr.shape[-1], uk.shape[-1]
    BR = min(64, _pow2(nrows))
    BT = 64 if max(K, V) <= 128 else 32
    row_blocks = triton.cdiv(nrows, BR)
    G = _range_len(key_hi, row_blocks * B * H, BT, kr.device)
    NS = triton.cdiv(key_hi, G)
    m = torch.empty(B, H, NS, nrows, device=kr.device, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty(B, H, NS, nrows, V, device=kr.device, dtype=torch.float32)
    _partials_kernel[(row_blocks, NS, B * H)](
        kr, kk, uk, m, l, acc, nrows, Tr, key_hi, Tk, G, NS, float(scale), K=K, V=V, BK=_pow2(K), BV=_pow2(V),
        BR=BR, BT=BT, num_warps=4 if max(K, V) <= 64 else 8)
    return m, l, acc


def triton_chunk_stats(k: torch.Tensor, u: torch.Tensor, s: int, e: int, scale: float):
    """Same contract as ``chunk.torch_chunk_stats``; k [B, H, T, K], u [B, H, T, V] contiguous float32."""
    _check(k)
    B, H, T, _ = k.shape
    V = u.shape[-1]
    kc = k[:, :, s:e]
    if s == 0:
        m = k.new_full((B, H, e), NEG)
        return merge_intra_chunk(kc, m, torch.zeros_like(m), k.new_zeros(B, H, e, V), scale)
    return merge_intra_chunk(kc, *merge_partials(*_partials(kc, k, u, e - s, T, s, T, scale)), scale)


def triton_block_partials(kr, kk, uk, scale: float):
    """Same contract as ``chunk.torch_block_partials``: rows kr [B, H, L, K] against keys kk [B, H, G, K]
    / uk [B, H, G, V] (all earlier), contiguous float32."""
    _check(kr)
    L, G = kr.shape[2], kk.shape[2]
    return merge_partials(*_partials(kr.contiguous(), kk.contiguous(), uk.contiguous(), L, L, G, G, scale))


def triton_stages() -> Stages:
    from .triton_bwd import triton_chunk_push, triton_key_grads, triton_pull, triton_rows_vs_keys
    return Stages(triton_chunk_stats, triton_chunk_push, triton_key_grads, triton_block_partials, triton_pull,
                  triton_rows_vs_keys)
