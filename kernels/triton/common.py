"""What every stage of the Triton chunk kernels shares: the chunk length, the program prologue, and
the rule that turns an absent (None) argument into a compile-time flag.

One set of kernels serves the three mixers through constexpr flags: ``HAS_G`` (a log-decay g is
given), ``HAS_W`` (the delta-rule erase: beta is given, so the WY/UT transform runs). Math and names
follow ``kernels/chunk.py`` (K x V state layout); per chunk of C = 64 tokens with incoming state S0:

    gam = cumsum(g) inside the chunk, Gam = exp(gam), gl = gam of the chunk's last row
    Tm  = (I + L)^-1,  L_ij = beta_i exp(gam_i - gam_j) k_i.k_j  (i > j)
    W   = Tm diag(beta Gam) K,   Ut = Tm diag(beta) V,   U = Ut - W S0        (gla: U = V, W = 0)
    O   = scale [diag(Gam) Q S0 + (causal * exp(gam_i - gam_j) * Q K^T) U]
    S_C = exp(gl) S0 + K^T diag(exp(gl - gam)) U

The stages, each kernel beside its launcher: ``wy`` (gam, Tm, W, Ut and their backward), ``state``
(the sequential forward and backward passes over chunks, CP transition included), ``output`` (O,
and the intra-chunk part of dU), ``dqdk`` (dq, dk, dW, dgam). A launcher takes ``cfg``, the launch
settings of one shape (``ops._Cfg``); ``ops`` chains the stages.

Every tensor is [B, T, H, D] contiguous (row t of head h at ((b*T + t)*H + h)*D); per-chunk states
are [B, NT, H, K, V]. Rows past T (ragged last chunk) are loaded as zeros (g = beta = 0: identity
steps) and never stored. All pointer arithmetic is plain offsets with masks (no block pointers),
so the kernels run on Triton 3.x and in the interpreter alike. An optional argument is passed as
None and its flag is set by ``flags_given`` (a ``@triton.heuristics``): the code that reads it is
compiled only where it is given.

Packed documents (``Varlen``, B = 1): each document has its own chunks (the last one partial; its
end plays the role of T), the per-chunk kernels find theirs in a chunk map, the state passes run
one program per (V block, document x head), the longest documents first, and initial / final
states are [N, H, K, V].
``IS_VARLEN`` (``flags_given`` on the boundary pointer) compiles that code only for varlen calls.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

CHUNK = 64  # tokens per chunk; the WY solve is written for 4 blocks of 16


class Varlen(NamedTuple):
    """N documents packed into one B=1 stream, as the kernels take them: every document is cut into
    its own chunks (the last one partial), so no chunk straddles a boundary.

    cu [N+1] int32 boundaries; chunks [NT, 2] int32, (document, chunk within it) of every chunk in
    stream order (the per-chunk kernels' grid); seqs [N, 2] int32, (document, index of its first
    chunk: its rows of the per-chunk states h / dh) in the order the state passes run them, the
    most chunks first; slots [T] int64, the row of each token in a [NT * CHUNK] layout where every
    chunk is padded to CHUNK rows (in-chunk sums done in torch)."""
    cu: torch.Tensor
    chunks: torch.Tensor
    seqs: torch.Tensor
    slots: torch.Tensor
    n_chunks: int
    n_docs: int


def varlen_of(cu_seqlens: torch.Tensor, bounds: list[int]) -> Varlen:
    """The Varlen of validated boundaries (``bounds``: cu_seqlens as ints). Built once per
    cu_seqlens tensor and remembered on it while it is unmodified (a model passes one cu_seqlens to
    every layer; the few small copies to the device happen once)."""
    seen = getattr(cu_seqlens, "_lctrain_varlen", None)
    if seen is not None and seen[0] == cu_seqlens._version:
        return seen[1]
    lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    counts = [triton.cdiv(n, CHUNK) for n in lengths]
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    chunks = [(d, i) for d, c in enumerate(counts) for i in range(c)]
    # The state passes' programs start in grid order and each runs its document's chunks one after
    # the other: longest first, so a long document does not start last and run alone at the end
    # (longest-processing-time-first scheduling of unequal chains).
    seqs = sorted(((d, offsets[d]) for d in range(len(counts))), key=lambda s: -counts[s[0]])
    dev = cu_seqlens.device
    i32 = dict(device=dev, dtype=torch.int32)
    offsets_t = torch.tensor(offsets, **i32)
    cu = cu_seqlens.to(torch.int32).contiguous()
    if cu.data_ptr() % 16:   # a view off a 16-byte boundary: the kernels get aligned pointers only (ops.py)
        cu = cu.clone()
    # token t of document d sits at row offsets[d] * CHUNK + (t - cu[d]) of the padded layout
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=dev),
                                  torch.tensor(lengths, device=dev), output_size=bounds[-1])
    slots = torch.arange(bounds[-1], device=dev) + (offsets_t.long() * CHUNK - cu.long())[doc]
    vl = Varlen(cu, torch.tensor(chunks, **i32).reshape(-1, 2), torch.tensor(seqs, **i32).reshape(-1, 2),
                slots, offsets[-1], len(lengths))
    cu_seqlens._lctrain_varlen = (cu_seqlens._version, vl)
    return vl


def chunk_map(varlen: Varlen | None) -> tuple:
    """cu_ptr, chunks_ptr of the per-chunk kernels: None, None without varlen."""
    return (None, None) if varlen is None else (varlen.cu, varlen.chunks)


def n_chunks(T: int, varlen: Varlen | None) -> int:
    """How many chunks the per-chunk kernels run: cdiv(T, CHUNK), or the documents' chunks."""
    return triton.cdiv(T, CHUNK) if varlen is None else varlen.n_chunks


def pow2(x: int) -> int:
    """Block size covering x: the next power of two, at least 16 (the smallest tl.dot tile)."""
    return max(16, triton.next_power_of_2(x))


def flags_given(**flag_args: str):
    """``@triton.heuristics`` setting each constexpr flag to whether its pointer argument is given:
    ``@flags_given(HAS_G="gam_ptr")`` compiles the gated code only for calls that pass a gam."""
    return triton.heuristics({flag: (lambda args, name=name: args[name] is not None)
                              for flag, name in flag_args.items()})


@triton.jit
def chunk_prologue(n, T, H, C: tl.constexpr, BH_AXIS: tl.constexpr, cu_ptr, idx_ptr,
                   IS_VARLEN: tl.constexpr):
    """Where one program of a per-chunk kernel works: bh = b * H + h from program axis BH_AXIS
    (int64, so offsets of long sequences do not overflow), its batch b and head h, base = the offset
    of (b, t=0, h) in a [B, T, H] tensor (times D for a [B, T, H, D] one), the rows rt of chunk n,
    their mask, the chunk's first row t0 and tend, the end of its sequence (rows >= tend are not
    the chunk's). Without varlen chunk n covers rows n*C .. and tend = T. With varlen (B = 1),
    chunk n is chunk idx[n, 1] of document idx[n, 0], which spans rows cu[doc] .. cu[doc + 1]:
    tend is the document's end, so no chunk straddles a boundary. Unused results cost nothing:
    the helper is inlined and dead values removed."""
    bh = tl.program_id(BH_AXIS).to(tl.int64)
    b = bh // H
    h = bh % H
    base = b * T * H + h
    if IS_VARLEN:
        doc = tl.load(idx_ptr + 2 * n).to(tl.int32)
        t0 = tl.load(cu_ptr + doc).to(tl.int32) + tl.load(idx_ptr + 2 * n + 1).to(tl.int32) * C
        tend = tl.load(cu_ptr + doc + 1).to(tl.int32)
    else:
        t0 = n * C
        tend = T
    rt = t0 + tl.arange(0, C)
    return bh, b, h, base, rt, rt < tend, t0, tend


@triton.jit
def sequence_prologue(T, NT, H, C: tl.constexpr, cu_ptr, seqs_ptr, IS_VARLEN: tl.constexpr):
    """Where one program of a sequential state pass works (program axis 1 = b * H + h, or
    i * H + h with varlen): bh (the row of its [B or N, H, K, V] states), base (the offset
    of (b, t=0, h) in a [B, T, H] tensor), its sequence's rows bos .. eos, its chunk count nt and
    c0, the index of its first chunk in the per-chunk states [*, H, K, V]. Without varlen the
    sequence is batch row b (bos = 0, eos = T, nt = NT, c0 = b * NT); with varlen (B = 1) it is
    document doc = seqs[i, 0] (bh = doc * H + h): rows cu[doc] .. cu[doc + 1], its chunks
    numbered from seqs[i, 1]."""
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    if IS_VARLEN:
        doc = tl.load(seqs_ptr + 2 * b).to(tl.int64)
        bh = doc * H + h
        base = h
        bos = tl.load(cu_ptr + doc).to(tl.int32)
        eos = tl.load(cu_ptr + doc + 1).to(tl.int32)
        nt = tl.cdiv(eos - bos, C)
        c0 = tl.load(seqs_ptr + 2 * b + 1).to(tl.int64)
    else:
        base = b * T * H + h
        bos = 0
        eos = T
        nt = NT
        c0 = b * NT
    return bh, h, base, bos, eos, nt, c0
