"""The inter-chunk levels of log-linear Gated DeltaNet without level scans: a tree of chunk transitions.

The level scans (``triton_levels``) step every level's state through every chunk: NL sequential scans of
~3 C K V flops a chunk each way, bound by moving the chunk tiles, not by their products. But the chunk
step is the same affine map for every level,

    S(n+1) = M_n S(n) + B_n,   M_n = exp(gl) I - K^T diag(exp(gl - gam)) W,   B_n = K^T diag(exp(gl - gam)) Ut

(Mamba-2: W = 0, M_n = exp(gl) I), and the levels differ only in where they restart. So, as
``scalar_tree`` does for a scalar decay, take block totals over a tree of aligned blocks of 2^m chunks,

    Phi_0 = M,  Tot_0 = B,   Phi_{m+1} = Phi_b Phi_a,   Tot_{m+1} = Phi_b Tot_a + Tot_b   (a, b: the halves)

and read chunk n's levels out of the buckets of its index: bit m of n set, the bucket is the block of 2^m
chunks just before n's half-block (token level c + 1 + m, weight lambda_{c+1+m}: the run weights telescope).
With the delta rule the bucket's total reaches chunk n through the transitions of the buckets below it,
so the query is carried instead, lowest bucket first:

    q <- qt_n;  for m with bit m of n set:  o_n += scale lambda_m (q Tot_m),   q <- q Phi_m

Per chunk ~NL/2 buckets of two [C, K] x [K, K|V] products, the tree ~4 such products a chunk, all parallel,
against the scans' ~3 NL sequential ones. ``tree_forward`` / ``tree_backward`` run it in Triton
(``triton_tree``: there M = e I - N, the decay kept apart from the bf16 part), as backend "triton" does for
calls from position 0 and for calls over an aligned block of chunks with incoming run states, a CP rank's
shard (``tree_serves``: the levels above the call read their incoming states through the query carried
across every bucket), with CONFIG["TREE"] and within TREE_BUDGET (``tree_bytes``);
``transition_tree_levels`` is the same from position 0 in torch, fp32 and differentiable by autograd
(``transition_tree_backward``): the reference the kernels are tested against (too slow to run: on an H200 it
took 4x the level scans; the incoming states' share is tested against the level scans). The call is padded
with zero tokens to 2^D chunks (``tree_depth``).
"""
from __future__ import annotations

import torch

from ..triton.common import CHUNK
from . import triton_levels, triton_tree
from .chunk import add_weight_differences_grad
from .scalar_tree import _heads_first
from .triton_tree import level_offset


def _chunk_maps(k, w, u, gam, P: int):
    """(M [B, H, P, K, K], B [B, H, P, K, V]) fp32: every chunk's affine state map. The time axis is padded to
    P chunks: gam with its last value (the last, ragged chunk's gl is gam at T - 1, as in the scans), the
    tokens with zeros (padded chunks map S to exp(gl) S: finite, and read by no real chunk)."""
    Bsz, T, H, K = k.shape
    Tp = P * CHUNK
    gh = gam.movedim(1, 2).float()
    gh = torch.cat([gh, gh[..., T - 1:T].expand(Bsz, H, Tp - T)], dim=-1).view(Bsz, H, P, CHUNK)
    gl = gh[..., -1]
    kd = _heads_first(k, Tp).float().view(Bsz, H, P, CHUNK, K) * torch.exp(gl[..., None] - gh)[..., None]
    kdt = kd.transpose(-1, -2)
    maps_b = kdt @ _heads_first(u, Tp).float().view(Bsz, H, P, CHUNK, -1)
    eye = torch.eye(K, device=k.device, dtype=torch.float32)
    maps_m = torch.exp(gl)[..., None, None] * eye
    if w is not None:
        maps_m = maps_m - kdt @ _heads_first(w, Tp).float().view(Bsz, H, P, CHUNK, K)
    return maps_m, maps_b


def transition_tree_levels(qt, k, w, u, gam, lw, scale: float, want_final: bool):
    """The levels above the chunk (what ``levels_forward`` adds to o) for a call from position 0 with no
    incoming state. qt, k, w (or None), u [B, T, H, .] (the effective queries and WY terms of fused.py), gam
    [B, T, H] fp32 (in-chunk cumulative log-decay), lw [B, T, H, NL] fp32 (w_l = lambda_l - lambda_{l+1} of
    the levels above the chunk). Returns (o_levels [B, T, H, V] fp32, final run states [B, H, NL, K, V] fp32
    or None), differentiable in every input by torch autograd."""
    Bsz, T, H, K = qt.shape
    V = u.shape[-1]
    NL = lw.shape[-1]
    P = 1 << NL
    if P * CHUNK < T:
        raise ValueError(f"transition_tree_levels: {NL} levels above the chunk cover {P * CHUNK} < T={T} tokens")
    Tp = P * CHUNK
    phis, tots = _chunk_maps(k, w, u, gam, P)
    phis, tots = [phis], [tots]
    top = NL if want_final else NL - 1   # the readout needs Tot_m, Phi_m up to m = NL - 1; final states Tot_NL
    for m in range(top):
        p2 = phis[m].view(Bsz, H, -1, 2, K, K)
        t2 = tots[m].view(Bsz, H, -1, 2, K, V)
        tots.append(p2[:, :, :, 1] @ t2[:, :, :, 0] + t2[:, :, :, 1])
        if m + 1 < top:
            phis.append(p2[:, :, :, 1] @ p2[:, :, :, 0])
    # bucket m's weight: sum_{j >= m} w_j = lambda_{c+1+m}
    lam = _heads_first(lw.float().flip(-1).cumsum(-1).flip(-1), Tp) * scale      # [B, H, Tp, NL]
    q = _heads_first(qt, Tp).float()                                             # [B, H, Tp, K]
    o = torch.zeros(Bsz, H, Tp, V, device=qt.device, dtype=torch.float32)
    for m in range(NL):
        A, rows = P >> (m + 1), CHUNK << m
        q5 = q.view(Bsz, H, A, 2, rows, K)
        odd = q5[:, :, :, 1]
        read = odd @ tots[m].view(Bsz, H, A, 2, K, V)[:, :, :, 0]
        o.view(Bsz, H, A, 2, rows, V)[:, :, :, 1].addcmul_(
            read, lam.view(Bsz, H, A, 2, rows, NL)[:, :, :, 1, :, m, None])
        if m < NL - 1:  # carried across this bucket for the buckets above it
            q = torch.stack((q5[:, :, :, 0], odd @ phis[m].view(Bsz, H, A, 2, K, K)[:, :, :, 0]), dim=3)
            q = q.view(Bsz, H, Tp, K)
    final = None
    if want_final:
        NT = -(-T // CHUNK)
        runs = []
        for j in range(NL):   # level c + 1 + j: blocks of 2^(j+1) chunks
            b = ((NT - 1) >> (j + 1)) << (j + 1)
            if NT - b == 2 << j:  # the last block is complete: its tree total
                runs.append(tots[j + 1][:, :, b >> (j + 1)])
                continue
            acc = None
            for m in range(j, -1, -1):  # its buckets, earliest first
                if (NT >> m) & 1:
                    i = (NT >> m) - 1
                    acc = tots[m][:, :, i] if acc is None else phis[m][:, :, i] @ acc + tots[m][:, :, i]
            runs.append(acc)
        final = torch.stack(runs, dim=2)
    return o[:, :, :T].movedim(1, 2), final


def transition_tree_backward(qt, k, w, u, gam, lw, scale: float, do, dst):
    """Gradients (dqt, dk, dw or None, du, dgam, dlw), fp32 and shaped like ``levels_backward``'s, of the
    levels' readout (and of the final run states, with dst) against do, by torch autograd on a recompute of
    ``transition_tree_levels``."""
    inputs = [x.detach().requires_grad_() for x in (qt, k, u, gam, lw)]
    wt = None if w is None else w.detach().requires_grad_()
    with torch.enable_grad():
        o, final = transition_tree_levels(inputs[0], inputs[1], wt, inputs[2], inputs[3], inputs[4], scale,
                                          dst is not None)
        outs, grads_out = [o], [do.float()]
        if dst is not None:
            outs.append(final)
            grads_out.append(dst.float())
        every = inputs + ([] if wt is None else [wt])
        grads = torch.autograd.grad(outs, every, grads_out, allow_unused=True)
    grads = [torch.zeros_like(x, dtype=torch.float32) if g is None else g.float().contiguous()
             for g, x in zip(grads, every)]
    dqt, dk, du, dgam, dlw = grads[:5]
    dw = grads[5] if wt is not None else None
    return dqt, dk, dw, du, dgam, dlw


def tree_depth(T: int) -> int:
    """D: the tree over a call of T tokens has 2^D chunks (the call padded to them)."""
    return (-(-T // CHUNK) - 1).bit_length()


def tree_serves(n0: int, T: int, NL: int) -> bool:
    """Whether the tree can take the levels above the chunk of a call of T tokens from global chunk n0 with NL of
    them: its 2^D chunks must be an aligned block (n0 a multiple of 2^D, D >= 1). Then a level below D restarts
    where the tree's blocks do, and every level from D holds the whole call in one block: its run inside the call
    is the sum of all of a chunk's buckets (the weights telescope over every level), plus, where the block began
    before the call, its incoming run state read through the query carried across them all (``_incoming``).
    Calls from position 0 always qualify; under CP so do the ranks' power-of-two shards."""
    D = tree_depth(T)
    return 1 <= D <= NL and n0 % (1 << D) == 0


def _incoming(n0: int, D: int, NL: int, s0) -> list[int]:
    """The levels j >= D whose block began before the call (n0 not a multiple of its 2^(j+1) chunks): they start
    from their run state in s0 (as in the scans; the other levels ignore s0)."""
    return [] if s0 is None else [j for j in range(D, NL) if n0 % (2 << j)]


def _final_buckets(T: int, D: int, NL: int) -> list[list[int]]:
    """Per level j above the chunk (blocks of 2^(j+1) chunks), the tree nodes its final run state sums, earliest
    first: below D the one node of a complete last block, else the buckets of NT (the chunk count) at levels
    <= j; from D (the block holds the whole call) the call's own blocks, at levels below D (nodes with N, so an
    incoming state can be carried across them)."""
    NT = -(-T // CHUNK)
    P = 1 << D
    whole = ([level_offset(P, D - 1), level_offset(P, D - 1) + 1] if NT == P else
             [level_offset(P, m) + (NT >> m) - 1 for m in range(D - 1, -1, -1) if (NT >> m) & 1])
    plan = []
    for j in range(NL):
        b = ((NT - 1) >> (j + 1)) << (j + 1)
        if j >= D:
            plan.append(whole)
        elif NT - b == 2 << j:
            plan.append([level_offset(P, j + 1) + (b >> (j + 1))])
        else:
            plan.append([level_offset(P, m) + (NT >> m) - 1 for m in range(j, -1, -1) if (NT >> m) & 1])
    return plan


def _final_runs(nm, tots, ge, plan, slot=None, init=None):
    """The final run states [B, H, NL, K, V] fp32 of the levels above the chunk from the tree (Triton layout,
    M = e I - N) along ``_final_buckets``: each bucket's total after the earlier ones (and the level's incoming
    state, ``init[j]`` where not None) carried across it. ``slot``: where node i sits in the given buffers
    (default: at i)."""
    at = (lambda i: i) if slot is None else slot.__getitem__
    runs = []
    for j, nodes in enumerate(plan):
        acc = None if init is None else init[j]
        for i in map(at, nodes):
            tot = tots[:, :, i].float()
            acc = tot if acc is None else torch.exp(ge[:, :, i, None, None]) * acc - nm[:, :, i].float() @ acc + tot
        runs.append(acc)
    return torch.stack(runs, dim=2)


def _level_weight(lam, j: int):
    """w_j = lam[j] - lam[j + 1] (lam[NL] = 0) [B, T, H]: the weight of level j's run (``lam``: the weights of the
    levels above the chunk, lambda_{c+1..top})."""
    return lam[..., j] - lam[..., j + 1] if j + 1 < lam.shape[-1] else lam[..., j]


def _incoming_state_grads(qlast, lam, levels, scale: float, do, dtype):
    """{j: ds0_j} = (scale w_j qlast)^T dO for the levels with an incoming run state (their readout and its other
    gradients are in the readout kernels), by torch: one product a level in ``dtype`` (q's; fp32 accumulation), the
    weight in dO's rows. The reference of ``triton_tree.incoming_state_grads``, which the tree's backward runs (this
    product and the weighted dO took 0.27 ms a step at 32K on an H200, the kernel one pass over qlast and dO)."""
    q = qlast.to(dtype).permute(0, 2, 3, 1)
    do = do.to(dtype)
    return {j: torch.matmul(q, (do * (_level_weight(lam, j) * scale).to(dtype)[..., None]).permute(0, 2, 1, 3)).float()
            for j in levels}


def shard_map(nm, tots, ge, D: int):
    """(A [B, H, K, K], B [B, H, K, V]) fp32: the whole call's map S -> A S + B from its tree of 2^D chunks (built to
    level D): B is the top node's Tot (from zero), A = M_b M_a of the two nodes below it (M = e I - N)."""
    P = 1 << D
    lo = level_offset(P, D - 1)
    eye = torch.eye(nm.shape[-1], device=nm.device, dtype=torch.float32)
    Ma, Mb = (torch.exp(ge[:, :, i, None, None]) * eye - nm[:, :, i].float() for i in (lo, lo + 1))
    return Mb @ Ma, tots[:, :, level_offset(P, D)].float()


def tree_forward(o, qt, k, w, u, gam, lam, scale: float, want_final: bool, keep: bool = False, s0=None, n0: int = 0,
                 out=None, exchange=None):
    """``levels_forward`` by the tree (for calls ``tree_serves``), with the levels' weights ``lam`` [B, T, H, NL] fp32
    (lambda_{c+1..top} themselves, not their differences w: bucket m weighs lambda_{c+1+m}, the run weights
    telescope; a last-axis slice of the op's contiguous [B, T, H, L], ``triton_tree.row_stride``): o [B, T, H, V]
    fp32 += the levels above the chunk (into ``out`` instead where given, in its dtype: o + the levels, rounded
    once). s0 [B, H, NL, K, V] (or None): the run states entering the call, read where a level's block began before
    it (global chunk n0). Returns (the final run states or None, and with ``keep`` what the backward would compute
    again: the tree, the queries each bucket read and qlast, else None). All in Triton (``triton_tree``), the tree
    in q's dtype. ``exchange`` (a CP rank, ``parallel.loglinear_cp``; s0 then not given): once the tree is built,
    the ranks exchange their shards' maps (``shard_map``) and ``exchange.incoming`` forms s0 from them (kept as
    ``exchange.s0``; None where no level continues a block from an earlier rank): no separate transition pass."""
    NL, T = lam.shape[-1], qt.shape[1]
    D = tree_depth(T)
    if exchange is not None:
        assert s0 is None, "tree_forward: s0 comes from the exchange"
        top = D
        nm, tots, ge = triton_tree.build_tree(k, w, u, gam, D, top, qt.dtype)
        s0 = exchange.incoming(*shard_map(nm, tots, ge, D))
        inc = _incoming(n0, D, NL, s0)
    else:
        inc = _incoming(n0, D, NL, s0)
        top = D if want_final or inc else D - 1
        nm, tots, ge = triton_tree.build_tree(k, w, u, gam, D, top, qt.dtype)
    incoming = triton_tree.incoming_args(s0, inc) if inc else None
    qcs, qlast = triton_tree.readout_forward(o, qt, lam, nm, tots, ge, 1 << D, scale, store_q=keep, incoming=incoming,
                                             store_last=keep and bool(inc), out=out)
    final = None
    if want_final:
        init = [s0[:, :, j].float() if j in inc else None for j in range(NL)]
        final = _final_runs(nm, tots, ge, _final_buckets(T, D, NL), init=init)
    return final, ((nm, tots, ge, qcs, qlast, top) if keep else None)


def tree_backward(qt, k, w, u, gam, lam, scale: float, do, dst, kept=None, s0=None, n0: int = 0, dlam=None,
                  exchange=None):
    """``levels_backward`` by the tree: (dqt, dk, dw or None, du, dgam, dlam, ds0 or None) fp32 (ds0 where s0 is given:
    0 for the levels that do not read it; dlam: the gradient of ``lam`` (``tree_forward``), written into ``dlam``
    where given (a zero-filled view like lam, a slice of the op's gradient: no copy), else new). The tree and the
    queries each bucket reads again (unless ``kept`` from the forward), then the readout's backward, the per-node
    sums, down the tree and into the chunks (``triton_tree``); the final states' and the incoming states' shares by
    torch (few nodes, few levels). ``exchange`` (``tree_forward``'s): as soon as the incoming states' gradients are
    known, the ranks exchange them and ``exchange.final_state_grads`` adds to dst what the later ranks owe this
    rank's final states, before the tree's backward reads dst."""
    NL, T = lam.shape[-1], qt.shape[1]
    D = tree_depth(T)
    P = 1 << D
    inc = _incoming(n0, D, NL, s0)
    incoming = triton_tree.incoming_args(s0, inc) if inc else None
    if kept is None:
        top = D if dst is not None or inc or exchange is not None else D - 1   # (the exchange gives a dst)
        nm, tots, ge = triton_tree.build_tree(k, w, u, gam, D, top, qt.dtype)
        qcs, qlast = triton_tree.readout_forward(None, qt, lam, nm, tots, ge, P, scale, store_q=True,
                                                 incoming=incoming, store_last=bool(inc))
    else:
        nm, tots, ge, qcs, qlast, top = kept
    do = do.contiguous()
    ds0_in = triton_tree.incoming_state_grads(qlast, lam, inc, scale, do) if inc else {}
    if exchange is not None:
        dst = exchange.final_state_grads(dst, ds0_in)
    dfinal, dinit = None, {}
    if dst is not None:
        *dfinal, dinit = _final_runs_grad(nm, tots, ge, T, D, NL, dst, s0, inc)
    if dlam is None:
        dlam = torch.zeros(lam.shape, device=lam.device, dtype=torch.float32)
    dqt, dnm, dtots, dge, dlwin, flags = triton_tree.tree_gradients(qcs, lam, nm, tots, ge, do, P, scale,
                                                                    dlam, top, dfinal, incoming, qlast)
    del qcs, qlast
    dk, dw, du, dgam = triton_tree.tree_backward_pass(k, w, u, gam, nm, tots, ge, dnm, dtots, dge, P, top, flags)
    if inc:   # (the incoming readout's weights are w_j = lam[j] - lam[j + 1])
        add_weight_differences_grad(dlam, dlwin, inc)
    ds0 = None
    if s0 is not None:
        ds0 = torch.zeros(s0.shape, device=s0.device, dtype=torch.float32)
        for j in inc:
            ds0[:, :, j] = ds0_in[j] + dinit[j] if j in dinit else ds0_in[j]
    return dqt, dk, dw, du, dgam, dlam, ds0


def _final_runs_grad(nm, tots, ge, T: int, D: int, NL: int, dst, s0=None, inc=()):
    """(nodes, their N / ge slots, the gradients of those nodes' N, Tot, ge, the nodes as a host list, and {j: the
    gradient of level j's incoming state}) of the final run states against dst, for the few nodes they read
    (autograd through ``_final_runs`` on copies of those nodes and of the incoming states)."""
    plan = _final_buckets(T, D, NL)
    nodes = sorted({i for level in plan for i in level})
    # (cached on the device: a tensor made from a host list at every call waits for the GPU to get there)
    idx = triton_levels.cached_work(("final nodes", T, D, NL), lambda: nodes, tots.device).long()
    nphi = nm.shape[2]
    phi_nodes = idx.clamp(max=nphi - 1)   # the top node has no N (never carried across): a stand-in, unread
    leaves = [nm.index_select(2, phi_nodes).detach().requires_grad_(), tots.index_select(2, idx).detach()
              .requires_grad_(), ge.index_select(2, phi_nodes).detach().requires_grad_()]
    init = {j: s0[:, :, j].float().detach().requires_grad_() for j in inc}
    with torch.enable_grad():
        runs = _final_runs(*leaves, plan, slot={n: i for i, n in enumerate(nodes)},
                           init=[init.get(j) for j in range(NL)])
        every = leaves + list(init.values())
        grads = torch.autograd.grad(runs, every, dst.float(), allow_unused=True)
    grads = [torch.zeros_like(x, dtype=torch.float32) if g is None else g.float() for g, x in zip(grads, every)]
    return idx, phi_nodes, grads[:3], nodes, dict(zip(init, grads[3:]))


def tree_bytes(B: int, T: int, H: int, K: int, V: int, NL: int, itemsize: int) -> int:
    """Bytes of the transition tree's own buffers in one fwd+bwd at their most (``tree_backward``): the tree (N and
    Tot of ~2P nodes) and their gradients, and the queries each bucket reads and their gradients ([NL, B, TH, H, K]
    each, TH about T / 2: ``triton_tree.qcs_rows``), all in q's dtype."""
    nodes = 2 << NL
    tree = B * H * nodes * (K * K + K * V)
    return 2 * tree * itemsize + 2 * NL * B * triton_tree.qcs_rows(T) * H * K * itemsize
