"""Triton kernels of the inter-chunk levels: every level above log2(C) in ONE launch (forward and backward).

Level l > c = log2(C) of the log-linear ops is the run R_l: the base recurrence with its state reset at
every multiple of 2^l, i.e. at every chunk index that is a multiple of 2^(l-c). Its intra-chunk part is
done elsewhere (``fused.py``: one masked pass for all levels); what is left per level is the chunk-level
state scan and its readout,

    o_t   += scale * w_l[t] * qt_t^T S_l(n)                  (t in chunk n)
    S_l(n+1) = 0 if chunk n+1 starts a block of level l, else
               exp(gl) S_l(n) + K^T diag(exp(gl - gam)) (Ut - W S_l(n))

with the effective queries qt = diag(Gam) Q - (causal * decay * Q K^T) W (qt_t^T S = q_t^T A_t...A_t0 S:
the query carried back to the chunk start), W, Ut the WY terms (Mamba-2: W = 0, Ut = V), gam the in-chunk
cumulative log-decay, w_l = lambda_l - lambda_{l+1} (the top level: lambda_top). All levels read the same
per-chunk tiles: a program carries a group of CONFIG["LP"] levels side by side as the columns of one
state tile, so each chunk tile is loaded once for the group and each product covers all of its levels;
and it scans one block of the group's top level only (all the group's levels restart there), so the
blocks are independent programs (``_work``: grid (work item, V block, batch x head), longest first):
the low levels are many short scans, only the top group runs the whole sequence. No pass per level
over the whole sequence; the outputs of the groups are summed with fp32 atomics.

The backward, per group of levels: the forward scan again storing every chunk's incoming state h
(``levels_fwd_kernel``), the reverse scan storing every chunk's outgoing-state gradient dh
(``levels_dstate_kernel``: the dS recursion needs no forward state), then per chunk one program pairs h
and dh of every level of the group for dk, dW, dUt, dgam (``levels_grad_state_kernel``) and one reads h
for dqt and the level weights' gradients (``levels_grad_query_kernel``), summing the levels' shares in
registers: no atomics. Groups bound h and dh to ``STATE_BUDGET`` bytes, and where even one
group over the whole sequence would not fit (1M tokens at H=16, D=128, bf16) the backward runs over
segments of the sequence, each from run states the forward stored at its start (``backward_plan``); on
CUDA the two scans of a group run on two streams (they are independent).

Layout as in ``kernels/triton``: tokens [B, T, H, D] contiguous, gam and w as [B, T, H] / [B, T, H, NL]
fp32, states [B, H, NL, K, V] fp32. ``n0`` is the global chunk index of the first chunk (position_offset
/ C); a level whose block begins before the call starts from its run state in ``s0``.
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch
import triton
import triton.language as tl

from ..triton.common import CHUNK, flags_given, pow2

# Launch settings. The scans: V block BV, levels per program LP (a power of two; the state tile is
# [K, LP * BV] fp32), num_warps, num_stages (None: Triton's default); the per-chunk gradient pass: the V
# blocks of its state part (BV_grad) and of its readout part (BV_gradq), their num_warps (warps_grad,
# warps_gradq) and num_stages (stages_grad: 3, Triton's default); ATOMIC: the
# forward scans add their readouts to o with fp32 atomics (1) or, 0, every group of levels stores into its
# own fp32 slice of a [groups, B, T, H, V] buffer summed afterwards (no atomics, (groups - 1) x the output's
# memory more); TREE: log-linear Gated DeltaNet calls from position 0, or from an aligned block of 2^D chunks with
# incoming states (CP ranks: ``transition_tree.tree_serves``), take the levels from the transition tree
# (``transition_tree`` / ``triton_tree``: block totals and products of the chunk maps, no level scans) where its
# buffers fit TREE_BUDGET (0: always the scans); SCALAR_TREE: log-linear Mamba-2 calls from
# position 0 take them from Fenwick block totals in torch (``scalar_tree``; 0: the scans); KEEP_H: 1, a training
# forward stores every level's per-chunk incoming states h (as the backward's recompute scan would) and keeps them
# for the backward, which then skips that scan, where the backward runs in one segment and h of all levels fits
# STATE_BUDGET (else it recomputes them as with 0); through the transition tree it keeps the tree and the queries
# each bucket read. It holds h ([NL, B, NT, H, K, V] in q's dtype, 80 KiB a token at H=16, D=128 and
# 64K) from the forward to the backward: for layers recomputed right before their backward (activation
# checkpointing: the hybrid model's checkpointed blocks turn it on, ``keep_level_states``) or single-op benches.
# Defaults: shared memory within sm_90's 228 KiB at head dim 128 (`python -m lctrain.bench.kernel_resources
# --op loglinear` compiles them without a GPU; for Gated DeltaNet the state part of the gradient pass spills
# 304 bytes at BV_grad=32 and 4 warps (16 at 8 warps) and is no faster at 8 warps or at BV_grad=16, the Mamba-2
# forward scan 96 bytes);
# ``set_levels_config`` / LCTRAIN_LOGLINEAR_CFG="LP=4,BV=16" change them (``lctrain bench loglinear
# --levels-cfg`` times several). Chosen on an H200 (B=1, H=16, D=128, bf16; docs/results/h200_2026-12-01_s7/):
# the scans at 4 warps and 1 stage halve ll_gdn's forward against 8 warps / 2 stages (13.1 -> 7.5 ms at 64K,
# in two runs) and BV_grad=32, BV_gradq=32 took its fwd+bwd from 44.4 to 38.4 ms at 64K; the gradient pass at 4
# warps instead of 8 (docs/results/h200_2026-12-01_s8/call3, two runs, with KEEP_H=1): ll_mamba2 28.8 -> 24.2 ms
# and ll_gdn 35.7 -> 34.7 ms at 64K, faster at 16K and 128K too; 2 stages there are slower, 4 no faster than 3
# (call2). Known to fault there
# (illegal memory access in the backward's recompute scan, Triton 3.6, at 4 and 8 warps): LP=2, BV=16 at
# stages=1 (stages=2 ran; refused: FAULTING below); LP=1, BV=32 at stages=1 is untried.
# TREE=1: the transition tree was faster than the scans on an H200 at 16K-128K in two runs (ninth session,
# docs/results/h200_2026-12-01_s9/, docs/loglinear.md); SCALAR_TREE=0: the Mamba-2 tree in torch was slower
# than the scans on an H200, fwd+bwd 14.50 vs 8.78 ms at 16K and 54.16 vs 41.81 ms at 64K (B=1, H=16, D=128,
# bf16; docs/results/h200x2_2026-11-30_call3/loglinear_bench.log). SUBTREE=2, SUBTREE_BWD=4: the transition tree's
# lowest levels in the launch of level 0 (forward) and in one launch (the pass down), against one launch a level:
# ll_gdn fwd+bwd 23.89 -> 22.66 ms at 64K and 48.45 -> 46.32 at 128K in two runs; SUBTREE 1, 3 and 4 were slower
# than 2, and SUBTREE_BWD 2, 3 than 4 (docs/results/h200_2026-12-02_s12/call2/). SUBTREE_UP=2: the levels above
# two a launch, 22.68-22.71 -> 22.56 ms at 64K and 46.37-46.42 -> 46.06-46.07 at 128K in two runs; 3 no faster
# (call7/). The intra-chunk backward at 4 warps with 32 x 32 blocks, the per-node sums and the tree's readouts at
# 4 warps (two programs an SM instead of one; they were latency-bound): ll_gdn fwd+bwd 22.56 -> 19.95-20.05 ms at
# 64K and 46.07 -> 40.54-40.59 at 128K in two runs; the chunk maps' backward at 4 warps and this op's WY backward
# at 8 were slower (docs/results/h200_2026-12-02_s13/call1/ .. call3/).
CONFIG = {"LP": 2, "BV": 32, "warps": 4, "stages": 1, "BV_grad": 32, "BV_gradq": 32, "warps_grad": 4,
          "warps_gradq": 4, "stages_grad": 3, "ATOMIC": 1, "TREE": 1, "SCALAR_TREE": 0, "KEEP_H": 0, "HOIST": 1,
          "SUBTREE": 2, "SUBTREE_BWD": 4, "SUBTREE_UP": 2,
          "BK_intra_bwd": 32, "BV_intra_bwd": 32, "warps_intra_bwd": 4, "stages_intra_bwd": 3,
          "warps_node": 4, "stages_node": 3, "warps_readout_fwd": 4, "warps_readout_in": 4,
          "warps_readout_bwd": 4, "warps_maps_bwd": 8,
          "warps_wy_bwd": 4, "stages_wy_bwd": 1}


# Launch settings that stopped an H200 with an illegal memory access (Triton 3.6, 2026-12-01, at 4 and 8 warps;
# docs/results/h200_2026-12-01_s7/): refused before any launch, since the fault ends the process's CUDA context.
FAULTING = ({"LP": 2, "BV": 16, "stages": 1},)


# the transition tree's levels a launch: (smallest value, what it counts)
_TREE_LEVELS = {"SUBTREE": (0, "tree levels built in the launch of level 0"),
                "SUBTREE_BWD": (0, "levels of the pass down the tree in one launch"),
                "SUBTREE_UP": (1, "tree levels a launch above the subtree of level 0")}


def set_levels_config(**values: int) -> dict:
    """Override launch settings (keys of CONFIG; no arguments: back to the defaults). Returns the old ones."""
    global CONFIG
    old = dict(CONFIG)
    if not values:
        CONFIG = dict(_DEFAULTS)
        return old
    for key, val in values.items():
        if key not in CONFIG:
            raise ValueError(f"set_levels_config: unknown key {key!r}; choose from {sorted(CONFIG)}")
        if key in ("ATOMIC", "TREE", "SCALAR_TREE", "KEEP_H", "HOIST"):
            if val not in (0, 1):
                raise ValueError(f"set_levels_config: {key}={val!r} must be 0 or 1")
            continue
        if key in _TREE_LEVELS:
            low, what = _TREE_LEVELS[key]
            if not isinstance(val, int) or not low <= val <= 6:
                raise ValueError(f"set_levels_config: {key}={val!r} must be an int in {low}..6 ({what})")
            continue
        block = key.startswith(("BV", "BK"))
        pow2_key = block or key == "LP"
        if not isinstance(val, int) or val < 1 or (pow2_key and val & (val - 1)) or (block and val < 16):
            raise ValueError(f"set_levels_config: {key}={val!r} must be a positive int"
                             + (" and a power of two >= 16" if block else "")
                             + (" and a power of two" if key == "LP" else ""))
    new = {**CONFIG, **values}
    bad = _faulting(new)
    if bad:
        raise ValueError(f"set_levels_config: {bad} faults on an H200 (an illegal memory access in the level scans, "
                         "Triton 3.6); use stages=2, or BV=32")
    CONFIG = new
    return old


def _faulting(cfg: dict) -> str:
    """The FAULTING entry that ``cfg`` matches, as "LP=2, BV=16, stages=1", or "" if none."""
    for bad in FAULTING:
        if all(cfg[k] == v for k, v in bad.items()):
            return ", ".join(f"{k}={v}" for k, v in bad.items())
    return ""


def parse_levels_config(spec: str) -> dict:
    """"LP=4,BV=16" -> {"LP": 4, "BV": 16} (as LCTRAIN_LOGLINEAR_CFG and --levels-cfg take it)."""
    try:
        return {k.strip(): int(v) for k, v in (item.split("=") for item in spec.split(",") if item.strip())}
    except ValueError:
        raise ValueError(f"log-linear launch settings {spec!r} are not KEY=INT[,KEY=INT]") from None


_DEFAULTS = dict(CONFIG)
if os.environ.get("LCTRAIN_LOGLINEAR_CFG", "").strip():
    set_levels_config(**parse_levels_config(os.environ["LCTRAIN_LOGLINEAR_CFG"]))
# Bytes of per-chunk states (h and dh) the backward keeps at once: more levels recompute in more groups
# (whole programs: at least CONFIG["LP"] levels), and where even one group of the whole sequence would
# pass it (H=16, D=128, bf16: from 1M tokens) the sequence is cut into segments (``backward_plan``).
STATE_BUDGET = 16 << 30
# Bytes of the transition tree's own buffers (``transition_tree.tree_bytes``: the tree, its gradients and the
# queries each bucket reads, with their gradients) up to which Gated DeltaNet takes the tree (CONFIG["TREE"]); past
# it the level scans, whose states the backward bounds by STATE_BUDGET. At H=16, D=128, bf16 the tree takes up to
# 256K tokens (28 GiB) and the scans from 512K (58 GiB).
TREE_BUDGET = 32 << 30


@triton.jit
def _level_columns(jg, iv, j0, jend, V, BV: tl.constexpr, LP: tl.constexpr):
    """The LP * BV state columns of one program: column c holds V column iv * BV + c % BV of level
    j = j0 + jg * LP + c // BV (levels >= jend are padding). Returns j, the V index, the column mask and
    the block length in chunks of each column's level (2 << j: level c + 1 + j spans 2^(j+1) chunks)."""
    cols = tl.arange(0, LP * BV)
    j = j0 + jg * LP + cols // BV
    rv = iv * BV + cols % BV
    return j, rv, (rv < V) & (j < jend), 2 << j


@triton.jit
def _scan_program(work_ptr, NVB):
    """(level group, first chunk, end chunk, V block, batch x head) of a scan program. Grid (NVB x B*H,
    work items): the work item is the slowest axis, so the GPU dispatches the longest items (``_work``
    sorts them first) of every head and V block before any short one, and the long sequential scans of
    the top levels do not wait behind the many short blocks of the low ones."""
    item = tl.program_id(1)
    jg = tl.load(work_ptr + 3 * item)
    lo = tl.load(work_ptr + 3 * item + 1)
    hi = tl.load(work_ptr + 3 * item + 2)
    iv = tl.program_id(0) % NVB
    bh = (tl.program_id(0) // NVB).to(tl.int64)
    return jg, lo, hi, iv, bh


@triton.jit
def _spread(x, C: tl.constexpr, LP: tl.constexpr, BV: tl.constexpr):
    """[C, BV] -> [C, LP * BV]: the same V columns for each of the LP levels of a program (loaded once)."""
    return tl.reshape(tl.broadcast_to(x[:, None, :], (C, LP, BV)), (C, LP * BV))


@triton.jit
def _group_weights(lw_ptr, base, rt, mt, H, NL, jg, j0, jend, LP: tl.constexpr):
    """[C, LP] fp32: the readout weights w_l of the program's LP levels (0 for padding levels)."""
    jl = j0 + jg * LP + tl.arange(0, LP)
    return tl.load(lw_ptr + (base + rt[:, None] * H) * NL + jl[None, :], mask=mt[:, None] & (jl < jend)[None, :],
                   other=0.0)


@flags_given(HAS_W="w_ptr", HAS_S0="s0_ptr", STORE_ST="st_ptr", STORE_H="h_ptr", WRITE_O="o_ptr",
             STORE_CK="ck_ptr")
@triton.jit
def levels_fwd_kernel(qt_ptr, k_ptr, w_ptr, u_ptr, gam_ptr, lw_ptr, s0_ptr, o_ptr, st_ptr, h_ptr, ck_ptr, work_ptr,
                      scale, B, T, NT, H, NL, n0, j0, jend, NVB, SEG, K: tl.constexpr, V: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr, LP: tl.constexpr, C: tl.constexpr, HAS_W: tl.constexpr,
                      HAS_S0: tl.constexpr, STORE_ST: tl.constexpr, STORE_H: tl.constexpr, WRITE_O: tl.constexpr,
                      STORE_CK: tl.constexpr, ATOMIC: tl.constexpr):
    """Program (work item pid0 = (level group, chunks lo..hi-1), V block pid1, batch x head pid2): the
    scans of LP levels at once, their states side by side as the columns of one [K, LP * BV] tile
    (``_level_columns``), so every chunk tile (k, W, qt, Ut, gam) is loaded once for the LP levels and
    each product covers all of them. lo..hi is one block of the group's top level (``_work``): every
    level of the group starts afresh there, so the blocks run as independent programs. Adds the weighted
    readout to o (fp32, atomics), stores the final states (st [B, H, NL, K, V], from the last block) and,
    for the backward, the incoming states of every chunk (h [jend - j0, B, NT, H, K, V]) or those of the
    chunks SEG, 2 SEG, ... only (ck [NT / SEG - 1, B, H, NL, K, V] fp32: where a segmented backward starts
    its recompute, ``backward_plan``). Levels j0 .. jend-1."""
    jg, lo, hi, iv, bh = _scan_program(work_ptr, NVB)
    b = bh // H
    h = bh % H
    base = b * T * H + h
    j, rv, mcol, span = _level_columns(jg, iv, j0, jend, V, BV, LP)
    rk = tl.arange(0, BK)
    mk = rk < K
    mkv = mk[:, None] & mcol[None, :]
    rc = tl.arange(0, C)
    hcol = (j - j0).to(tl.int64) * B * NT * H * K * V + rv     # column offsets in h
    S = tl.zeros([BK, LP * BV], dtype=tl.float32)
    if HAS_S0:  # only the first block can continue one that began before this call
        S = tl.load(s0_ptr + ((bh * NL + j[None, :]) * K + rk[:, None]) * V + rv[None, :],
                    mask=mkv & ((n0 % span != 0) & (lo == 0))[None, :], other=0.0)
    for n in range(lo, hi):
        keep = ((n0 + n) % span != 0) | (n == 0)
        S = S * keep.to(tl.float32)[None, :]
        rt = n * C + rc
        mt = rt < T
        if STORE_H:
            tl.store(h_ptr + hcol[None, :] + (((b * NT + n) * H + h) * K + rk[:, None]) * V,
                     S.to(h_ptr.dtype.element_ty), mask=mkv)
        if STORE_CK:  # the state entering chunk n, a segment start (the one program whose block holds n)
            if (n % SEG == 0) & (n > 0):
                tl.store(ck_ptr + ((((n // SEG - 1) * B * H + bh) * NL + j[None, :]) * K + rk[:, None]) * V
                         + rv[None, :], S, mask=mkv)
        mtk = mt[:, None] & mk[None, :]
        gam = tl.load(gam_ptr + base + rt * H, mask=mt, other=0.0)
        gl = tl.load(gam_ptr + base + tl.minimum(n * C + C - 1, T - 1) * H)
        ro = iv * BV + tl.arange(0, BV)
        mto = mt[:, None] & (ro < V)[None, :]
        if WRITE_O:
            qc = tl.load(qt_ptr + (base + rt[:, None] * H) * K + rk[None, :], mask=mtk, other=0.0)
            lw = _group_weights(lw_ptr, base, rt, mt, H, NL, jg, j0, jend, LP)
            o = tl.reshape(tl.dot(qc, S.to(qc.dtype)).to(tl.float32), [C, LP, BV])
            o = tl.sum(o * lw[:, :, None], axis=1) * scale
            if ATOMIC:
                tl.atomic_add(o_ptr + (base + rt[:, None] * H) * V + ro[None, :], o, mask=mto, sem="relaxed")
            else:  # this program alone writes these rows of its group's slice (group 0: o itself)
                optr = o_ptr + jg.to(tl.int64) * B * T * H * V + (base + rt[:, None] * H) * V + ro[None, :]
                if jg == 0:
                    o += tl.load(optr, mask=mto, other=0.0)
                tl.store(optr, o, mask=mto)
        kc = tl.load(k_ptr + (base + rt[:, None] * H) * K + rk[None, :], mask=mtk, other=0.0)
        u = _spread(tl.load(u_ptr + (base + rt[:, None] * H) * V + ro[None, :], mask=mto, other=0.0).to(tl.float32),
                    C, LP, BV)
        if HAS_W:
            wc = tl.load(w_ptr + (base + rt[:, None] * H) * K + rk[None, :], mask=mtk, other=0.0)
            u -= tl.dot(wc, S.to(wc.dtype)).to(tl.float32)
        u = u * tl.exp(gl - gam)[:, None]
        S = S * tl.exp(gl) + tl.dot(tl.trans(kc), u.to(kc.dtype)).to(tl.float32)
    if STORE_ST:
        tl.store(st_ptr + ((bh * NL + j[None, :]) * K + rk[:, None]) * V + rv[None, :], S, mask=mkv & (hi == NT))


@flags_given(HAS_W="w_ptr", HAS_DST="dst_ptr", STORE_DS0="ds0_ptr")
@triton.jit
def levels_dstate_kernel(qt_ptr, k_ptr, w_ptr, gam_ptr, lw_ptr, do_ptr, dst_ptr, dh_ptr, ds0_ptr, work_ptr,
                         scale, B, T, NT, H, NL, n0, j0, jend, NVB, K: tl.constexpr, V: tl.constexpr,
                         BK: tl.constexpr, BV: tl.constexpr, LP: tl.constexpr, C: tl.constexpr,
                         HAS_W: tl.constexpr, HAS_DST: tl.constexpr, STORE_DS0: tl.constexpr):
    """Reverse scans of LP levels (program and columns as in ``levels_fwd_kernel``): dS = gradient of
    the state leaving chunk n (stored in dh, laid out as h), then
        dS_in = exp(gl) dS - W^T diag(exp(gl - gam)) K dS + scale qt^T diag(w) dO,
    cut to 0 where chunk n starts a block; what is left at the start is the gradient of the level's
    incoming run state (ds0). It needs no forward state: ``levels_grad_state_kernel`` pairs dh with h. One
    program per work item as in ``levels_fwd_kernel`` (the gradient does not cross a block start)."""
    jg, lo, hi, iv, bh = _scan_program(work_ptr, NVB)
    b = bh // H
    h = bh % H
    base = b * T * H + h
    j, rv, mcol, span = _level_columns(jg, iv, j0, jend, V, BV, LP)
    rk = tl.arange(0, BK)
    mk = rk < K
    mkv = mk[:, None] & mcol[None, :]
    rc = tl.arange(0, C)
    hcol = (j - j0).to(tl.int64) * B * NT * H * K * V + rv
    dS = tl.zeros([BK, LP * BV], dtype=tl.float32)
    if HAS_DST:  # the final states are those of the last block
        dS = tl.load(dst_ptr + ((bh * NL + j[None, :]) * K + rk[:, None]) * V + rv[None, :], mask=mkv & (hi == NT),
                     other=0.0)
    for i in range(0, hi - lo):
        n = hi - 1 - i
        rt = n * C + rc
        mt = rt < T
        mtk = mt[:, None] & mk[None, :]
        tl.store(dh_ptr + hcol[None, :] + (((b * NT + n) * H + h) * K + rk[:, None]) * V,
                 dS.to(dh_ptr.dtype.element_ty), mask=mkv)
        qc = tl.load(qt_ptr + (base + rt[:, None] * H) * K + rk[None, :], mask=mtk, other=0.0)
        lw = _group_weights(lw_ptr, base, rt, mt, H, NL, jg, j0, jend, LP) * scale
        ro = iv * BV + tl.arange(0, BV)
        do = tl.load(do_ptr + (base + rt[:, None] * H) * V + ro[None, :], mask=mt[:, None] & (ro < V)[None, :],
                     other=0.0).to(tl.float32)
        dol = tl.reshape(do[:, None, :] * lw[:, :, None], (C, LP * BV))   # dO diag(w_l), level by level
        gl = tl.load(gam_ptr + base + tl.minimum(n * C + C - 1, T - 1) * H)
        dS_in = dS * tl.exp(gl) + tl.dot(tl.trans(qc), dol.to(qc.dtype)).to(tl.float32)
        if HAS_W:
            gam = tl.load(gam_ptr + base + rt * H, mask=mt, other=0.0)
            kc = tl.load(k_ptr + (base + rt[:, None] * H) * K + rk[None, :], mask=mtk, other=0.0)
            wc = tl.load(w_ptr + (base + rt[:, None] * H) * K + rk[None, :], mask=mtk, other=0.0)
            du = tl.dot(kc, dS.to(kc.dtype)).to(tl.float32) * tl.exp(gl - gam)[:, None]
            dS_in -= tl.dot(tl.trans(wc), du.to(wc.dtype)).to(tl.float32)
        dS = dS_in * ((n0 + n) % span != 0).to(tl.float32)[None, :]
    if STORE_DS0:
        tl.store(ds0_ptr + ((bh * NL + j[None, :]) * K + rk[:, None]) * V + rv[None, :], dS, mask=mkv & (lo == 0))


@triton.jit
def _chunk_program(T, H, K, BK: tl.constexpr, C: tl.constexpr):
    """(chunk n, batch b, head h, token offset base, rows rt, row mask, K index, K mask, [C, BK] mask) of a
    per-chunk program of the gradient pass (grid (chunk, batch x head))."""
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rt = n * C + tl.arange(0, C)
    mt = rt < T
    rk = tl.arange(0, BK)
    mk = rk < K
    return n, b, h, b * T * H + h, rt, mt, rk, mk, mt[:, None] & mk[None, :]


@flags_given(HAS_W="w_ptr")
@triton.jit
def levels_grad_state_kernel(k_ptr, w_ptr, u_ptr, gam_ptr, h_ptr, dh_ptr, dk_ptr, dw_ptr, du_ptr, dgam_ptr,
                             B, T, NT, H, G, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                             BV: tl.constexpr, C: tl.constexpr, HAS_W: tl.constexpr, FIRST: tl.constexpr):
    """The gradients through the state update, per chunk (program (chunk, batch x head)), summed over the G
    levels of this group and the V blocks, with S = h (incoming state), dS = dh (gradient of the outgoing
    state), U = Ut - W S:
        dU    = diag(exp(gl - gam)) K dS          -> dUt += dU,  dW -= dU S^T
        dK   += diag(exp(gl - gam)) U dS^T
        dgam += -rowsum(dU * U), last row + sum(dU * U) + exp(gl) <S, dS>
    (the readout's gradients are ``levels_grad_query_kernel``'s: split so that each program holds at most
    two [C, K] fp32 accumulators, which lets the V blocks be wide without register spills). The chunk's
    rows belong to this program alone: plain stores, added to the previous groups' sums unless FIRST."""
    n, b, h, base, rt, mt, rk, mk, mtk = _chunk_program(T, H, K, BK, C)
    last = tl.minimum(n * C + C - 1, T - 1)
    gam = tl.load(gam_ptr + base + rt * H, mask=mt, other=0.0)
    gl = tl.load(gam_ptr + base + last * H)
    dec = tl.where(mt, tl.exp(gl - gam), 0.0)
    kc = tl.load(k_ptr + (base + rt[:, None] * H) * K + rk[None, :], mask=mtk, other=0.0)
    if HAS_W:
        wc = tl.load(w_ptr + (base + rt[:, None] * H) * K + rk[None, :], mask=mtk, other=0.0)
    dk = tl.zeros([C, BK], dtype=tl.float32)
    dw = tl.zeros([C, BK], dtype=tl.float32)
    dgam = tl.zeros([C], dtype=tl.float32)
    glast = tl.sum(dgam, axis=0)
    for v0 in range(0, V, BV):
        rv = v0 + tl.arange(0, BV)
        mv = rv < V
        mkv = mk[:, None] & mv[None, :]
        mtv = mt[:, None] & mv[None, :]
        ut = tl.load(u_ptr + (base + rt[:, None] * H) * V + rv[None, :], mask=mtv, other=0.0).to(tl.float32)
        du_sum = tl.zeros([C, BV], dtype=tl.float32)
        for jj in range(0, G):
            off = (((jj * B + b) * NT + n) * H + h) * K * V + rk[:, None] * V + rv[None, :]
            S = tl.load(h_ptr + off, mask=mkv, other=0.0)
            dS = tl.load(dh_ptr + off, mask=mkv, other=0.0)
            if HAS_W:
                u = ut - tl.dot(wc, S.to(wc.dtype)).to(tl.float32)
            else:
                u = ut
            du = tl.dot(kc, dS.to(kc.dtype)).to(tl.float32) * dec[:, None]
            du_sum += du
            if HAS_W:
                dw -= tl.dot(du.to(kc.dtype), tl.trans(S).to(kc.dtype)).to(tl.float32)
            dk += tl.dot((u * dec[:, None]).to(kc.dtype), tl.trans(dS).to(kc.dtype)).to(tl.float32)
            a = tl.sum(du * u, axis=1)
            dgam -= a
            glast += tl.sum(a, axis=0) + tl.exp(gl) * tl.sum(tl.sum(S.to(tl.float32) * dS.to(tl.float32), axis=1),
                                                               axis=0)
        if not FIRST:
            du_sum += tl.load(du_ptr + (base + rt[:, None] * H) * V + rv[None, :], mask=mtv, other=0.0)
        tl.store(du_ptr + (base + rt[:, None] * H) * V + rv[None, :], du_sum, mask=mtv)
    dgam += tl.where(rt == last, glast, 0.0)
    if not FIRST:
        dk += tl.load(dk_ptr + (base + rt[:, None] * H) * K + rk[None, :], mask=mtk, other=0.0)
        dgam += tl.load(dgam_ptr + base + rt * H, mask=mt, other=0.0)
    tl.store(dk_ptr + (base + rt[:, None] * H) * K + rk[None, :], dk, mask=mtk)
    tl.store(dgam_ptr + base + rt * H, dgam, mask=mt)
    if HAS_W:
        if not FIRST:
            dw += tl.load(dw_ptr + (base + rt[:, None] * H) * K + rk[None, :], mask=mtk, other=0.0)
        tl.store(dw_ptr + (base + rt[:, None] * H) * K + rk[None, :], dw, mask=mtk)


@triton.jit
def levels_grad_query_kernel(qt_ptr, lw_ptr, do_ptr, h_ptr, dqt_ptr, dlw_ptr, scale, B, T, NT, H, NL, j0, G,
                             K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                             C: tl.constexpr, FIRST: tl.constexpr):
    """The readout's gradients, per chunk (program (chunk, batch x head)), for the G levels j0.. of this
    group with S = h (the chunk's incoming state of level j):
        dqt += scale diag(w_j) dO S^T,   dw_j = scale rowsum(dO * (qt S))
    Levels outermost, so each level's dw_j is summed over the V blocks in registers and stored once."""
    n, b, h, base, rt, mt, rk, mk, mtk = _chunk_program(T, H, K, BK, C)
    qc = tl.load(qt_ptr + (base + rt[:, None] * H) * K + rk[None, :], mask=mtk, other=0.0)
    dqt = tl.zeros([C, BK], dtype=tl.float32)
    for jj in range(0, G):
        j = j0 + jj
        lw = tl.load(lw_ptr + (base + rt * H) * NL + j, mask=mt, other=0.0) * scale
        part = tl.zeros([C], dtype=tl.float32)
        for v0 in range(0, V, BV):
            rv = v0 + tl.arange(0, BV)
            mv = rv < V
            S = tl.load(h_ptr + (((jj * B + b) * NT + n) * H + h) * K * V + rk[:, None] * V + rv[None, :],
                        mask=mk[:, None] & mv[None, :], other=0.0)
            do = tl.load(do_ptr + (base + rt[:, None] * H) * V + rv[None, :], mask=mt[:, None] & mv[None, :],
                         other=0.0).to(tl.float32)
            dqt += tl.dot((do * lw[:, None]).to(qc.dtype), tl.trans(S).to(qc.dtype)).to(tl.float32)
            part += tl.sum(do * tl.dot(qc, S.to(qc.dtype)).to(tl.float32), axis=1)
        tl.store(dlw_ptr + (base + rt * H) * NL + j, part * scale, mask=mt)
    if not FIRST:
        dqt += tl.load(dqt_ptr + (base + rt[:, None] * H) * K + rk[None, :], mask=mtk, other=0.0)
    tl.store(dqt_ptr + (base + rt[:, None] * H) * K + rk[None, :], dqt, mask=mtk)


def _settings(K: int) -> dict:
    """CONFIG for head dim K: above 128 one level per program, no software pipelining (LP=2 at 2 stages
    needs 246-279 KiB of shared memory at K = 256), 8 warps and V blocks of 16 in the gradient pass's state
    part (4 warps and BV_grad=32 spill registers there: kernel_resources --D 256), 8 warps in its readout part."""
    if K <= 128:
        return CONFIG
    return {**CONFIG, "LP": 1, "stages": 1, "warps": 8, "BV_grad": 16, "warps_grad": 8, "warps_gradq": 8}


def _launch_args(qt, u):
    B, T, H, K = qt.shape
    V = u.shape[-1]
    cfg = _settings(K)
    bv = min(pow2(V), cfg["BV"])
    if _faulting({**cfg, "BV": bv}):   # V <= 16 shrinks the default blocks to a setting that faulted: the scans
        cfg = {**cfg, "stages": 2}     # take two stages there (as before 2026-12-01), which ran at those blocks
    return B, T, H, K, V, triton.cdiv(T, CHUNK), bv, triton.cdiv(V, bv), cfg


def _scan_launch(cfg) -> dict:
    return {"num_warps": cfg["warps"], "num_stages": cfg["stages"]}


_WORK: dict = {}


def _work(j0: int, jend: int, n0: int, NT: int, LP: int, device) -> torch.Tensor:
    """Work items [P, 3] int32 of the scans of levels j0..jend-1: (level group, first chunk, end chunk),
    one per block of the group's top level (2^(j+1) chunks for level index j, aligned to the global chunk
    index n0 + n), longest first (the long scans of the top levels start before the short ones)."""
    def items():
        out = []
        for jg in range(triton.cdiv(jend - j0, LP)):
            span = 2 << min(j0 + (jg + 1) * LP - 1, jend - 1)
            a = n0 // span * span
            while a < n0 + NT:
                out.append((jg, max(a, n0) - n0, min(a + span, n0 + NT) - n0))
                a += span
        return sorted(out, key=lambda it: it[1] - it[2])
    return cached_work(("scan", j0, jend, n0, NT, LP), items, device)


def cached_work(key: tuple, items, device) -> torch.Tensor:
    """The int32 work list ``items()`` (rows of ints) on ``device``, made once per key and device: no host list and
    copy to the device at every call (work lists of the level scans and of the transition tree)."""
    key = (*key, str(device))
    if key not in _WORK:
        if len(_WORK) > 64:
            _WORK.clear()
        _WORK[key] = torch.tensor(items(), dtype=torch.int32, device=device)
    return _WORK[key]


def _scan_grid(work: torch.Tensor, nvb: int, BH: int) -> tuple:
    if work.shape[0] > 65535:
        raise ValueError(f"log-linear level scans: {work.shape[0]} work items exceed the grid's 65535; raise "
                         "CONFIG['LP'] (LCTRAIN_LOGLINEAR_CFG=LP=...) or shorten the sequence")
    return (nvb * BH, work.shape[0])


def backward_plan(qt, ut, NL: int) -> tuple[int, int]:
    """(G, SEG): ``levels_backward`` recomputes the level states in groups of G levels, and over segments
    of SEG chunks of the sequence (SEG = NT: one segment), so that h and dh of one group over one
    segment, 2 G SEG B H K V elements of qt's dtype, fit STATE_BUDGET. G is a multiple of the levels per
    program (CONFIG["LP"]; fewer would leave state columns idle), at most NL, and as many as fit; the
    sequence is cut only where even LP levels of the whole sequence would not fit, into segments of a
    power of two chunks. The forward stores the run states at the segment starts for it (ck of
    ``levels_fwd_kernel``), so ``levels_forward`` takes SEG from here too."""
    B, T, H, K, V, NT, _, _, cfg = _launch_args(qt, ut)
    per_chunk = 2 * B * H * K * V * qt.element_size()           # h and dh of one level at one chunk
    per_level = per_chunk * NT
    group = min(NL, max(cfg["LP"], STATE_BUDGET // max(per_level, 1) // cfg["LP"] * cfg["LP"]))
    if NL == 0 or group * per_level <= STATE_BUDGET:
        return group, NT
    seg = max(1, STATE_BUDGET // (group * per_chunk))
    return group, 1 << (seg.bit_length() - 1)


def keeps_states(qt, ut, NL: int) -> bool:
    """Whether a training forward keeps the level states h for the backward: CONFIG["KEEP_H"], a backward of
    one segment (``backward_plan``) and h of all NL levels within STATE_BUDGET (the backward then holds it
    beside dh of one group of levels: at 128K, H=16, D=128, bf16, 11 levels of h and 8 of dh, 19 GiB against
    16 GiB for h and dh of 8 levels when recomputing; the H200 bench's peak 26,200 against 23,128 MiB). Where
    KEEP_H=1 cannot be kept, a warning says so (once per process) and the backward recomputes the states."""
    B, T, H, K, V, NT, _, _, cfg = _launch_args(qt, ut)
    if not cfg["KEEP_H"] or NL == 0:
        return False
    if backward_plan(qt, ut, NL)[1] == NT and NL * B * NT * H * K * V * qt.element_size() <= STATE_BUDGET:
        return True
    warnings.warn("log-linear KEEP_H=1: the level states of this call do not fit triton_levels.STATE_BUDGET "
                  "(or its backward runs in segments); the backward recomputes them instead", stacklevel=2)
    return False


@contextlib.contextmanager
def keep_level_states():
    """KEEP_H=1 inside the block (the hybrid model's activation-checkpointed blocks: their forward runs
    again right before their backward, so the kept states of one block at a time are alive)."""
    global CONFIG
    old = CONFIG
    CONFIG = {**CONFIG, "KEEP_H": 1}
    try:
        yield
    finally:
        CONFIG = old


def levels_forward(o, qt, k, w, ut, gam, lw, s0, scale: float, n0: int, want_final: bool, seg: int | None = None,
                   keep_h: bool = False):
    """Adds the readout of every level above log2(C) to o ([B, T, H, V] fp32); returns the final run
    states [B, H, NL, K, V] fp32 (or None), with ``seg`` < NT chunks (``backward_plan``) the run
    states entering chunks seg, 2 seg, ... ([NT / seg - 1 rounded up, B, H, NL, K, V] fp32, for the
    segmented backward), else None, and with ``keep_h`` (``keeps_states``) every level's incoming state
    of every chunk (h [NL, B, NT, H, K, V] in qt's dtype, for ``levels_backward``), else None."""
    B, T, H, K, V, NT, bv, nvb, cfg = _launch_args(qt, ut)
    NL = lw.shape[-1]
    st = torch.empty(B, H, NL, K, V, device=qt.device, dtype=torch.float32) if want_final else None
    ck = None
    if seg is not None and seg < NT:
        ck = torch.empty(triton.cdiv(NT, seg) - 1, B, H, NL, K, V, device=qt.device, dtype=torch.float32)
    hs = torch.empty(NL, B, NT, H, K, V, device=qt.device, dtype=qt.dtype) if keep_h else None
    work = _work(0, NL, n0, NT, cfg["LP"], qt.device)
    groups = triton.cdiv(NL, cfg["LP"])
    atomic = bool(cfg["ATOMIC"]) and groups > 1
    # without atomics group 0 adds to o itself, every other group stores into its own slice of parts
    out = o if atomic or groups == 1 else torch.cat([o[None], o.new_empty(groups - 1, *o.shape)])
    levels_fwd_kernel[_scan_grid(work, nvb, B * H)](qt, k, w, ut, gam, lw, s0, out, st, hs, ck, work, scale, B, T,
                                                    NT, H, NL, n0, 0, NL, nvb, NT if ck is None else seg, K=K, V=V,
                                                    BK=pow2(K), BV=bv, LP=cfg["LP"], C=CHUNK, ATOMIC=atomic,
                                                    **_scan_launch(cfg))
    if out is not o:
        torch.sum(out, dim=0, out=o)
    return st, ck, hs


def levels_backward(qt, k, w, ut, gam, lw, s0, do, dst, scale: float, n0: int, need_ds0: bool, ck=None,
                    seg: int | None = None, hs=None):
    """Gradients (fp32) of sum(o_inter * do) + sum(final * dst) w.r.t. qt, k, w, ut, gam, lw and s0. Per
    group of levels: the forward scan again (storing the incoming states h), the reverse scan (storing the
    outgoing-state gradients dh), then one per-chunk pass pairing them. With ``ck`` (the run states the
    forward stored at the starts of segments of ``seg`` chunks, ``levels_forward``) the sequence is done
    segment by segment from the last, each as a call of its own: it starts from its checkpoint (as from
    an incoming run state) and its end takes the gradient of the next segment's incoming run state (as
    that of a final state); the per-chunk work and the results are those of one call. With ``hs`` (the
    states the forward kept, ``keeps_states``: one segment) the forward scan is not run again."""
    B, T, H, K, V, NT, bv, nvb, cfg = _launch_args(qt, ut)
    NL = lw.shape[-1]
    f32 = dict(device=qt.device, dtype=torch.float32)
    dqt, dk, du = torch.empty(B, T, H, K, **f32), torch.empty(B, T, H, K, **f32), torch.empty(B, T, H, V, **f32)
    dw = torch.empty(B, T, H, K, **f32) if w is not None else None
    dgam, dlw = torch.empty(B, T, H, **f32), torch.empty(B, T, H, NL, **f32)
    do = do.contiguous()
    group, _ = backward_plan(qt, ut, NL)
    outs = (dqt, dk, dw, du, dgam, dlw)
    if ck is None:
        ds0 = _backward_groups(qt, k, w, ut, gam, lw, s0, do, dst, scale, n0, need_ds0, outs, group, hs)
        return dqt, dk, dw, du, dgam, dlw, ds0
    ds0 = torch.zeros(B, H, NL, K, V, **f32) if need_ds0 else None
    for b in range(B):   # one batch row at a time: a row's slice of [B, T, ...] is contiguous
        carry = None if dst is None else dst[b:b + 1]
        for i in reversed(range(triton.cdiv(NT, seg))):
            rows = slice(i * seg * CHUNK, min(T, (i + 1) * seg * CHUNK))
            cut = lambda x, rows=rows, b=b: None if x is None else x[b:b + 1, rows]  # noqa: E731
            start = ck[i - 1, b:b + 1] if i else (None if s0 is None else s0[b:b + 1])
            carry = _backward_groups(cut(qt), cut(k), cut(w), cut(ut), cut(gam), cut(lw), start, cut(do), carry,
                                     scale, n0 + i * seg, bool(i) or need_ds0, tuple(map(cut, outs)), group)
        if need_ds0:
            ds0[b:b + 1] = carry
    return dqt, dk, dw, du, dgam, dlw, ds0


def _backward_groups(qt, k, w, ut, gam, lw, s0, do, dst, scale: float, n0: int, need_ds0: bool, outs,
                     group: int, kept=None):
    """``levels_backward`` of one call (or segment) into ``outs`` = (dqt, dk, dw, du, dgam, dlw), in groups of
    ``group`` levels (with ``kept``, the forward's h of all levels: each group reads its slice, no forward
    scan); returns ds0 (or None)."""
    dqt, dk, dw, du, dgam, dlw = outs
    B, T, H, K, V, NT, bv, nvb, cfg = _launch_args(qt, ut)
    NL = lw.shape[-1]
    ds0 = torch.zeros(B, H, NL, K, V, device=qt.device, dtype=torch.float32) if need_ds0 else None
    common = dict(K=K, V=V, BK=pow2(K), BV=bv, LP=cfg["LP"], C=CHUNK, **_scan_launch(cfg))
    if kept is not None and tuple(kept.shape) != (NL, B, NT, H, K, V):
        raise ValueError(f"levels_backward: kept states {tuple(kept.shape)} are not those of all {NL} levels "
                         f"over {NT} chunks (KEEP_H needs one segment: keeps_states)")
    for j0 in range(0, NL, group):
        G = min(group, NL - j0)
        hs = torch.empty(G, B, NT, H, K, V, device=qt.device, dtype=qt.dtype) if kept is None else kept[j0:j0 + G]
        dhs = torch.empty_like(hs)
        work = _work(j0, j0 + G, n0, NT, cfg["LP"], qt.device)
        grid = _scan_grid(work, nvb, B * H)
        # the two scans are independent: on CUDA the forward one runs on a side stream, so the long
        # sequential scans of the top levels of both overlap
        side = torch.cuda.Stream(qt.device) if qt.is_cuda and kept is None else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(qt.device))
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            if kept is None:
                levels_fwd_kernel[grid](qt, k, w, ut, gam, lw, s0, None, None, hs, None, work, scale, B, T, NT, H,
                                        NL, n0, j0, j0 + G, nvb, NT, ATOMIC=False, **common)
        levels_dstate_kernel[grid](qt, k, w, gam, lw, do, dst, dhs, ds0, work, scale, B, T, NT, H, NL, n0, j0,
                                   j0 + G, nvb, **common)
        if side is not None:
            torch.cuda.current_stream(qt.device).wait_stream(side)
        grad = dict(K=K, V=V, BK=pow2(K), C=CHUNK, FIRST=j0 == 0, num_stages=cfg["stages_grad"])
        levels_grad_state_kernel[(NT, B * H)](k, w, ut, gam, hs, dhs, dk, dw, du, dgam, B, T, NT, H, G,
                                              BV=min(pow2(V), cfg["BV_grad"]), num_warps=cfg["warps_grad"], **grad)
        levels_grad_query_kernel[(NT, B * H)](qt, lw, do, hs, dqt, dlw, scale, B, T, NT, H, NL, j0, G,
                                              BV=min(pow2(V), cfg["BV_gradq"]), num_warps=cfg["warps_gradq"], **grad)
        del hs, dhs
    return ds0
