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
"""
from __future__ import annotations

import triton
import triton.language as tl

CHUNK = 64  # tokens per chunk; the WY solve is written for 4 blocks of 16


def pow2(x: int) -> int:
    """Block size covering x: the next power of two, at least 16 (the smallest tl.dot tile)."""
    return max(16, triton.next_power_of_2(x))


def flags_given(**flag_args: str):
    """``@triton.heuristics`` setting each constexpr flag to whether its pointer argument is given:
    ``@flags_given(HAS_G="gam_ptr")`` compiles the gated code only for calls that pass a gam."""
    return triton.heuristics({flag: (lambda args, name=name: args[name] is not None)
                              for flag, name in flag_args.items()})


@triton.jit
def chunk_prologue(n, T, H, C: tl.constexpr, BH_AXIS: tl.constexpr):
    """Where one program works: bh = b * H + h from program axis BH_AXIS (int64, so offsets of
    long sequences do not overflow), its batch b and head h, base = the offset of (b, t=0, h) in a
    [B, T, H] tensor (times D for a [B, T, H, D] one), the rows rt of chunk n and their mask rt < T.
    Unused results cost nothing: the helper is inlined and dead values removed."""
    bh = tl.program_id(BH_AXIS).to(tl.int64)
    b = bh // H
    h = bh % H
    base = b * T * H + h
    rt = n * C + tl.arange(0, C)
    return bh, b, h, base, rt, rt < T
