"""Triton backend of lctrain.kernels: the three mixers (autograd) and the CP primitives.

``lctrain.kernels.api`` imports this module lazily and calls the functions below with the public
signatures minus ``backend``; inputs arrive validated. Layout and math: see ``common.py``; the
kernels and their launchers live by stage in ``wy.py``, ``state.py``, ``output.py`` and ``dqdk.py``;
this module holds the launch settings and chains the stages.

Forward  : wy_solve (gam, Tm) -> wy_apply (W, Ut) -> state_fwd (per-chunk states h, U) -> output_fwd (o).
Backward : wy_apply again from the saved gam and Tm, state_fwd again (per-chunk states are not kept
           between forward and backward), then dv_local -> state_bwd (reverse pass: dh, dU,
           d initial_state) -> dqk (dq, dk, dW, dgam) -> wy_bwd (dk, dv, dbeta, dg).
"""
from __future__ import annotations

import torch
import triton

from .common import CHUNK, pow2, varlen_of

# The stages under the names this module chains them by; lctrain.bench.tune_kernels launches them
# through these names too, so a test can stand in for one stage.
from .dqdk import dqk as _dqk
from .output import dv_local as _dv_local
from .output import output_fwd as _output_fwd
from .state import state_bwd as _state_bwd
from .state import state_fwd as _state_fwd
from .wy import wy_apply as _wy_apply
from .wy import wy_bwd as _wy_bwd
from .wy import wy_fwd as _wy_fwd
from .wy import wy_solve as _wy_solve  # noqa: F401 - tune_kernels launches it alone

MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# On an H200 (Triton 3.6) `python -m lctrain.bench.kernel_check` (2026-11-30, docs/results/h200x2_2026-11-30_s3)
# found, with every other case of its grid within bf16 / TF32 noise of float64 torch:
# - head dims 16 / 20 (any dtype, any launch setting tried): dq, dk (and so dg) wrong, relative error ~1;
#   the forward, dv, dbeta and the state gradients right; with direct_pt=1 dq right and dk wrong; an illegal
#   memory access at T=4133. Head dims 32 and 64 passed everything.
# - float32 at head dim 128 (the shared-memory-limited settings, stages_seqb=1): an illegal memory access
#   (delta) and wrong dk / dv / dbeta / initial-state gradients (gated_delta, 2-7%). float32 at 32 / 64 passed.
# - float16 (direct_pt=1, its default) at head dims 32 / 64 / 128: every case passed (the same call's --quick
#   grid), so the float16 refusal of the third call (a wrong dq at head dims 16 / 20, which bf16 shares) is lifted.
MIN_GPU_HEAD_DIM = 32
MAX_GPU_FP32_HEAD_DIM = 64


def gpu_refusal(K: int, V: int, dtype: torch.dtype) -> str | None:
    """Why the Triton kernels refuse head dims K, V in ``dtype`` on a GPU (they gave wrong results there), or
    None. Checked by every op on CUDA inputs and by the trainer before it builds anything."""
    if min(K, V) < MIN_GPU_HEAD_DIM:
        return (f"head dims below {MIN_GPU_HEAD_DIM} (got K={K}, V={V}) are refused by the Triton kernels on a GPU "
                "(wrong dq/dk on an H200: docs/kernels-notes.md); use a head dim of at least "
                f"{MIN_GPU_HEAD_DIM} or backend='torch' (model.kernel_backend=torch)")
    if dtype == torch.float32 and max(K, V) > MAX_GPU_FP32_HEAD_DIM:
        return (f"float32 inputs at head dims above {MAX_GPU_FP32_HEAD_DIM} (got K={K}, V={V}) are refused by the "
                "Triton kernels on a GPU (wrong gradients / an illegal memory access on an H200: "
                "docs/kernels-notes.md); use bfloat16 or backend='torch' (model.kernel_backend=torch)")
    return None


def _check(op: str, q, k, v, chunk_size: int) -> None:
    if chunk_size != CHUNK:
        raise ValueError(f"{op}: the Triton backend uses chunk_size={CHUNK}; got chunk_size={chunk_size}. "
                         f"Pass chunk_size={CHUNK} or use backend='torch'.")
    K, V = k.shape[-1], v.shape[-1]
    if K > MAX_HEAD_DIM or V > MAX_HEAD_DIM:
        raise ValueError(f"{op}: the Triton backend supports head dims up to {MAX_HEAD_DIM}; got K={K}, "
                         f"V={V}. Use backend='torch' for larger heads.")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x is not None and x.dtype not in _DTYPES:
            raise TypeError(f"{op}: the Triton backend takes float16, bfloat16 or float32 {name}; got "
                            f"{x.dtype}. Cast the inputs or use backend='torch' (float64).")
    if k.is_cuda:  # k: every op has it (CP passes: no q)
        why = gpu_refusal(K, V, k.dtype)
        if why is not None:
            raise ValueError(f"{op}: {why}.")


# Launch settings, per kernel: block sizes (B...), warps and software-pipelining stages. Every key
# tunes exactly one kernel, so a sweep can vary all kernels at once and read each kernel's time apart
# (lctrain.bench.tune_kernels).
KERNEL_KEYS = {
    "wy_solve": ("BKS", "warps_solve", "stages_solve"),
    "wy_apply": ("BKW", "BVW", "warps_wy", "stages_wy"),
    "state_fwd": ("BVS", "warps_seq", "stages_seq"),
    "output_fwd": ("BVO", "warps_out", "stages_out"),
    "dv_local": ("BVP", "warps_dv", "stages_dv"),
    "state_bwd": ("BVSB", "warps_seqb", "stages_seqb"),
    # direct_pt=1: dk's P^T is its own product, not tl.trans of P (dqdk.py; the default for float16)
    "dqk": ("BKD", "BVD", "warps_dqk", "stages_dqk", "direct_pt"),
    "wy_bwd": ("BKB", "BVB", "warps_wyb", "stages_wyb"),
    # the same two passes as run by transition="overlap" (kernels/triton/cp_overlap.py), with twice the
    # programs (the identity-carrying ones): their own keys, so that they tune apart from the plain op
    "state_fwd_cp": ("BVSC", "warps_seqc", "stages_seqc"),
    "state_bwd_cp": ("BVSBC", "warps_seqbc", "stages_seqbc"),
    # fuse_out=1: the forward's fix-up runs inside output_fwd instead (reads hp once, writes nothing)
    "state_fixup": ("BVF", "warps_fix", "stages_fix", "fuse_out"),
}
_CFG_KEYS = tuple(key for keys in KERNEL_KEYS.values() for key in keys)
_FLAG_KEYS = ("fuse_out", "direct_pt")  # 0 or 1
_overrides: dict[str, int] = {}


def set_config(**overrides: int) -> dict[str, int]:
    """Override launch settings for every later call (tuning sweeps, tests); no arguments clears them.

    Keys (see KERNEL_KEYS for the kernel each one tunes): BKS (K block of the triangular solve's
    K K^T), BKW / BVW (K / V blocks of the W / U products), BVS / BVSB (V block of the forward /
    backward sequential state pass: smaller means more programs in flight; BVSC / BVSBC: the same
    passes under transition="overlap", cp_overlap.py; BVF: its fix-up, fixup.py), BVO (V block of the
    output), BVP (V block of dv_local), BKD / BVD (K / V blocks of dq/dk), BKB / BVB (K / V blocks
    of the WY backward); warps_* and stages_* set num_warps / num_stages of one kernel (Triton's
    default stages when unset); fuse_out / direct_pt are 0 or 1 (see KERNEL_KEYS). Block sizes must be
    powers of two >= 16. Also read once from the environment variable
    LCTRAIN_TRITON_CFG="BVS=16,warps_seq=4". Returns the previous overrides."""
    global _overrides
    for key, val in overrides.items():
        if key not in _CFG_KEYS:
            raise ValueError(f"set_config: unknown key {key!r}; choose from {_CFG_KEYS}")
        if key in _FLAG_KEYS:
            if val not in (0, 1) or not isinstance(val, int):
                raise ValueError(f"set_config: {key}={val!r} must be 0 or 1")
        elif not isinstance(val, int) or val < 1 or (key.startswith("B") and (val < 16 or val & (val - 1))):
            raise ValueError(f"set_config: {key}={val!r} must be a positive int"
                             + (" and a power of two >= 16" if key.startswith("B") else ""))
    previous, _overrides = _overrides, dict(overrides)
    return previous


def _env_config() -> None:
    import os
    spec = os.environ.get("LCTRAIN_TRITON_CFG", "").strip()
    if spec:
        try:
            pairs = dict(item.split("=") for item in spec.split(",") if item)
            set_config(**{k.strip(): int(v) for k, v in pairs.items()})
        except ValueError as e:
            raise ValueError(f"LCTRAIN_TRITON_CFG={spec!r} is not KEY=INT[,KEY=INT]: {e}") from None


_env_config()


# The state passes run one program per (V block, sequence x head): narrow V blocks (BVS / BVSB = 16)
# give one 128K sequence of 16 heads 128 programs, about one per SM, which is what its latency-bound
# chain needs. Packed documents have N x the chains, each N x shorter: with 64 documents that is
# 8192 programs of [128, 16] state slices, one (state_bwd, 155 KiB of shared memory) or two
# (state_fwd) resident per SM, every one re-reading the chunk's whole k / w / q tiles for its 16
# columns. Once there are programs to spare, wider blocks do the same work in fewer programs
# (no spills at 64 for D=128: python -m lctrain.bench.kernel_resources --varlen --cfg BVS=64,BVSB=64).
WIDE_STATE_PROGRAMS = 512  # ~4 per SM on a 132-SM H100 / H200


def _wide_state_block(chains: int, BV: int) -> int | None:
    """The widest V block of the state passes (64, then 32; at most the head's BV) that still gives
    WIDE_STATE_PROGRAMS programs for ``chains`` state chains; None where none does (the defaults,
    tuned on one sequence, stay)."""
    for bv in (64, 32):
        if bv <= BV and chains * triton.cdiv(BV, bv) >= WIDE_STATE_PROGRAMS:
            return bv
    return None


class _Cfg:
    """Block sizes and launch settings for one problem shape; `overrides` (tuning) take precedence
    over set_config's, which take precedence over the defaults. `gated`: the mixer has a decay g
    (dq/dk pipelines differently then). Defaults: the fastest correct settings of
    `python -m lctrain.bench.tune_kernels` on an H100 at D=128, T=16K and 128K (2026-11-23, docs/kernels-notes.md).
    `chains`: how many independent state chains (documents x heads with cu_seqlens) the state
    passes run; with many their V blocks widen, see `_wide_state_block`."""

    def __init__(self, K: int, V: int, overrides: dict[str, int] | None = None, gated: bool = False,
                 fp32: bool = False, chains: int | None = None, fp16: bool = False):
        self.K, self.V = K, V
        self.BK = pow2(K)
        BV = pow2(V)
        big = self.BK > 64
        wide = min(BV, 128 if self.BK <= 128 else 64)
        defaults = dict(
            BKS=64, warps_solve=1,                      # 16x16 tiles: one warp, no barriers
            BKW=128, BVW=128, warps_wy=8,
            BVS=16 if big else 32, warps_seq=4,
            BVO=wide, warps_out=4,
            BVP=wide, warps_dv=4,
            BVSB=16 if big else 32, warps_seqb=8,
            # twice the plain passes' V block: with the identity columns (K more) the CP passes keep the plain
            # passes' program count, so each chunk's k / w (/ q) tiles are read as often as there; at the plain
            # block (16) they had twice the programs and took as long as a whole extra pass (2xH200, call 2)
            BVSC=32 if big else 64, warps_seqc=4,
            BVSBC=32 if big else 64, warps_seqbc=8,
            BVF=32, warps_fix=4,                        # a [K, K] by [K, 32] product per program
            BKD=64, BVD=64, warps_dqk=4,
            BKB=64, BVB=64, warps_wyb=4, stages_wyb=1,   # see docs/kernels-notes.md: dbeta accuracy
        )
        if not gated:
            defaults["stages_dqk"] = 2
        if fp16:  # the float16 GPU failure (docs/kernels-notes.md): dq/dk without tl.trans of a dot result
            defaults["direct_pt"] = 1
        if self.BK > 128:  # three [C, 256] tiles in 3 stages need 300 KiB of shared memory
            defaults["stages_seqb"] = defaults["stages_seqbc"] = 2
        if fp32 and self.BK > 64:  # float32 inputs (references, tests): [C, 128] fp32 tiles in 3 stages
            defaults["stages_seqb"] = 1  # need 304 KiB of shared memory, more than an H100/H200 has
            defaults["stages_seqbc"] = 1
        # not where shared memory is already at its limit: float32 tiles of K > 64, or K > 128
        tight = (fp32 and self.BK > 64) or self.BK > 128
        wide_bv = _wide_state_block(chains, BV) if (chains and not tight) else None
        if wide_bv is not None:
            # 2 stages: 3% faster than 3 for 64 packed documents in 128K, delta and GDN (H200, bench.sh kperf,
            # docs/results/h200x2_2026-11-30_call2/kperf)
            defaults["BVS"] = defaults["BVSB"] = wide_bv
            defaults["stages_seq"] = defaults["stages_seqb"] = 2
        elif not tight:
            # 4 stages in the forward state pass: fwd 2.2% / fwd+bwd 1.2% faster than Triton's default 3 for
            # gated_delta at 128K, 1.0% / 0.6% for delta (H200, 5 alternating rounds, same call)
            defaults["stages_seq"] = defaults["stages_seqc"] = 4
        defaults.update(_overrides)
        defaults.update(overrides or {})
        self.values = defaults

    def __getattr__(self, key: str):  # cfg.BVS etc.: the launch settings in `values`
        try:
            return self.__dict__["values"][key]
        except KeyError:
            raise AttributeError(key) from None

    def launch(self, kernel: str) -> dict:
        """num_warps (and num_stages when set) of one kernel."""
        keys = KERNEL_KEYS[kernel]
        warps = self.values[next(k for k in keys if k.startswith("warps_"))]
        stages = self.values.get(next(k for k in keys if k.startswith("stages_")))
        return {"num_warps": warps} if stages is None else {"num_warps": warps, "num_stages": stages}


def _chunk_suffix_sum(x: torch.Tensor, varlen=None) -> torch.Tensor:
    """[B, T, H] -> sum of x over the rows at and after each row inside its chunk (dgam -> dg);
    with ``varlen`` the chunks are the documents' own (each token placed at its slot of a layout
    where every chunk has CHUNK rows)."""
    B, T, H = x.shape
    if varlen is not None:
        xp = x.new_zeros(varlen.n_chunks * CHUNK, H).index_copy_(0, varlen.slots, x[0])
        xp = xp.view(varlen.n_chunks, CHUNK, H).flip(1).cumsum(1).flip(1)
        return xp.view(-1, H)[varlen.slots][None]
    NT = triton.cdiv(T, CHUNK)
    xp = torch.nn.functional.pad(x, (0, 0, 0, NT * CHUNK - T)).view(B, NT, CHUNK, H)
    return xp.flip(2).cumsum(2).flip(2).reshape(B, NT * CHUNK, H)[:, :T]


def _forward(q, k, v, g, beta, s0, scale, want_final, varlen=None):
    """o, final state, and (gam, Tm): what the backward needs besides the inputs. ``varlen``
    (common.Varlen): packed documents, each run from its own initial state."""
    cfg = _Cfg(k.shape[-1], v.shape[-1], gated=g is not None, fp32=k.dtype == torch.float32,
               chains=_chains(k, varlen))
    gam, tm, w, ut = _wy_fwd(k, v, g, beta, cfg, varlen=varlen)
    u = ut if w is not None else v
    h, vnew, st, _ = _state_fwd(k, w, u, gam, s0, cfg, store_h=True, store_vnew=True,
                                store_final=want_final, varlen=varlen)
    o = _output_fwd(q, k, vnew, h, gam, scale, cfg, varlen=varlen)
    return o, st, gam, tm


def _chains(k, varlen) -> int | None:
    """State chains of the state passes with packed documents (documents x heads), which widen
    their V blocks; None without: batches of whole sequences keep the settings tuned on one
    sequence until a batched shape has been measured (the same rule would apply to B x H chains)."""
    return None if varlen is None else varlen.n_docs * k.shape[2]


def _backward(q, k, v, g, beta, s0, scale, do, dst, gam, tm, varlen=None):
    cfg = _Cfg(k.shape[-1], v.shape[-1], gated=g is not None, fp32=k.dtype == torch.float32,
               chains=_chains(k, varlen), fp16=k.dtype == torch.float16)
    has_g, has_w = g is not None, beta is not None
    vl = dict(varlen=varlen)
    w, ut = _wy_apply(k, v, beta, gam, tm, cfg, **vl)  # Tm and gam come from the forward
    u = ut if has_w else v
    h, vnew, _, _ = _state_fwd(k, w, u, gam, s0, cfg, store_h=True, store_vnew=True,
                               store_final=False, **vl)
    del u, ut  # free what is dead as soon as it is: this backward sets the op's peak memory
    dvl = _dv_local(q, k, do, gam, scale, cfg, **vl)
    dh, du, ds0 = _state_bwd(q, k, w, do, dvl, gam, dst, scale, cfg, store=True, **vl)
    del dvl, w  # wy_bwd recomputes W from Tm
    dq, dk, dw, dgam = _dqk(q, k, vnew, do, h, dh, du if has_w else None, gam, scale, cfg, **vl)
    del h, dh, vnew
    if not has_w:
        dg = _chunk_suffix_sum(dgam, varlen).to(g.dtype) if has_g else None
        return dq, dk, du.to(v.dtype), dg, None, ds0
    dv, dbeta, dg = _wy_bwd(k, v, beta, gam, tm, dw, du, dk, dgam, cfg, **vl)
    return dq, dk, dv, dg, dbeta, ds0  # wy_bwd completed dk in place


class _ChunkRecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, s0, scale, want_final, varlen):
        o, st, gam, tm = _forward(q, k, v, g, beta, s0, scale, want_final, varlen)
        ctx.save_for_backward(q, k, v, g, beta, s0, gam, tm)
        ctx.scale = scale
        ctx.varlen = varlen
        if st is not None:
            return o, st
        return o, None

    @staticmethod
    def backward(ctx, do, dst):
        q, k, v, g, beta, s0, gam, tm = ctx.saved_tensors
        do, dst = aligned_input(do), aligned_input(dst, torch.float32)
        dq, dk, dv, dg, dbeta, ds0 = _backward(q, k, v, g, beta, s0, ctx.scale, do, dst, gam, tm,
                                               ctx.varlen)
        ds0 = None if s0 is None else ds0.to(s0.dtype)
        return dq, dk, dv, dg, dbeta, ds0, None, None, None


def _varlen(cu_seqlens, k):
    """The kernels' Varlen of a cu_seqlens (None for None), validated as lctrain.kernels.api does
    (its boundaries are remembered on the tensor, so this costs no device sync after the first)."""
    if cu_seqlens is None:
        return None
    from lctrain.kernels.api import check_cu_seqlens
    return varlen_of(cu_seqlens, check_cu_seqlens(cu_seqlens, k.shape[0], k.shape[1], k.device))


# Triton compiles one kernel per combination of pointer arguments that are / are not 16-byte aligned (it
# specialises on data_ptr % 16 to vectorise loads): a view whose start is off a 16-byte boundary, e.g. one
# starting at an odd token of a float32 [B, T, H=2] g (what log-linear runs after an odd head and per-document
# loops over packed documents pass), gets a kernel no fresh tensor runs, one the GPU tests never checked. So
# the entry points hand the kernels aligned copies of such views (a copy only of an unaligned input; the values
# are the same, so every result is too). kernel_check's "unaligned" cases turn this off to test that kernel.
ALIGN_INPUTS = True


def needs_aligned_copy(x: torch.Tensor) -> bool:
    """True where ``x`` (contiguous) starts off a 16-byte boundary and ALIGN_INPUTS is on."""
    return ALIGN_INPUTS and x.data_ptr() % 16 != 0


def aligned_input(x: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """``x`` (cast to ``dtype`` when given) contiguous and 16-byte aligned: itself where it already is, else a
    copy (see ALIGN_INPUTS)."""
    if x is None:
        return None
    x = (x if dtype is None else x.to(dtype)).contiguous()
    return x.clone() if needs_aligned_copy(x) else x


def _run(op, q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size, cu_seqlens):
    _check(op, q, k, v, chunk_size)
    varlen = _varlen(cu_seqlens, k)
    K = k.shape[-1]
    scale = float(K ** -0.5 if scale is None else scale)
    dt = q.dtype
    q, k, v = (aligned_input(x) for x in (q, k, v))
    # k, v share q's dtype (api validates); per-token scalars go to fp32 for the kernels
    g, beta, s0 = (aligned_input(x, torch.float32) for x in (g, beta, initial_state))
    o, st = _ChunkRecurrence.apply(q, k, v, g, beta, s0, scale, bool(output_final_state), varlen)
    return o.to(dt), (st if output_final_state else None)


def delta_rule(q, k, v, beta, *, scale=None, initial_state=None, output_final_state=False,
               chunk_size=CHUNK, cu_seqlens=None):
    return _run("delta_rule", q, k, v, None, beta, scale, initial_state, output_final_state,
                chunk_size, cu_seqlens)


def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                     chunk_size=CHUNK, cu_seqlens=None):
    return _run("gated_delta_rule", q, k, v, g, beta, scale, initial_state, output_final_state,
                chunk_size, cu_seqlens)


def gated_linear_attn(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False,
                      chunk_size=CHUNK, cu_seqlens=None):
    return _run("gated_linear_attn", q, k, v, g, None, scale, initial_state, output_final_state,
                chunk_size, cu_seqlens)


# ------------------------------------------------------------------------ context-parallel primitives

def shard_transition(kind, k, v, *, g=None, beta=None, chunk_size=CHUNK):
    """(A, Bst): A [B, H, K, K] fp32 (the shard's transition product, carried in the same state
    pass as Bst), or [B, H] = exp(sum g) for "gla"; Bst [B, H, K, V] fp32 = final state from 0."""
    _check("shard_transition", None, k, v, chunk_size)
    k, v = aligned_input(k), aligned_input(v)
    g, beta = aligned_input(g, torch.float32), aligned_input(beta, torch.float32)
    cfg = _Cfg(k.shape[-1], v.shape[-1], gated=g is not None, fp32=k.dtype == torch.float32)
    with torch.no_grad():
        gam, _tm, w, ut = _wy_fwd(k, v, g, beta, cfg)
        if kind == "gla":
            _, _, bst, _ = _state_fwd(k, None, v, gam, None, cfg, store_h=False, store_vnew=False,
                                      store_final=True)
            return torch.exp(g.sum(dim=1)), bst
        _, _, bst, a = _state_fwd(k, w, ut, gam, None, cfg, store_h=False, store_vnew=False,
                                  store_final=True, compute_a=True)
        return a, bst


def shard_final_state(kind, k, v, *, g=None, beta=None, initial_state=None, chunk_size=CHUNK):
    """[B, H, K, V] fp32: the shard's final state from ``initial_state`` (zero when None) by the
    plain forward's state pass (no A programs: half the programs of ``shard_transition``'s)."""
    _check("shard_final_state", None, k, v, chunk_size)
    k, v = aligned_input(k), aligned_input(v)
    g, beta, s0 = (aligned_input(x, torch.float32) for x in (g, beta, initial_state))
    cfg = _Cfg(k.shape[-1], v.shape[-1], gated=g is not None, fp32=k.dtype == torch.float32)
    with torch.no_grad():
        gam, _tm, w, ut = _wy_fwd(k, v, g, beta, cfg)
        _, _, st, _ = _state_fwd(k, w, ut if w is not None else v, gam, s0, cfg, store_h=False,
                                 store_vnew=False, store_final=True)
    return st


def shard_state_grad(kind, q, k, do, *, g=None, beta=None, scale=None, chunk_size=CHUNK):
    """G [B, H, K, V] fp32 = d sum(o * do) / d initial_state, by a reverse state-only pass."""
    _check("shard_state_grad", q, k, do, chunk_size)
    scale = float(k.shape[-1] ** -0.5 if scale is None else scale)
    q, k, do = aligned_input(q), aligned_input(k), aligned_input(do, q.dtype)
    g, beta = aligned_input(g, torch.float32), aligned_input(beta, torch.float32)
    cfg = _Cfg(k.shape[-1], do.shape[-1], gated=g is not None, fp32=k.dtype == torch.float32)
    with torch.no_grad():
        gam, _tm, w, _ = _wy_fwd(k, None, g, beta, cfg, want_u=False)
        dvl = _dv_local(q, k, do, gam, scale, cfg)
        _, _, ds0 = _state_bwd(q, k, w, do, dvl, gam, None, scale, cfg, store=False)
    return ds0
