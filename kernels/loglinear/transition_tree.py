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
calls from position 0 with no incoming state (CONFIG["TREE"], within TREE_BUDGET: ``tree_bytes``);
``transition_tree_levels`` is the same in torch, fp32 and differentiable by autograd
(``transition_tree_backward``): the reference the kernels are tested against (too slow to run: on an H200 it
took 4x the level scans). The sequence is padded with zero tokens to 2^NL chunks.
"""
from __future__ import annotations

import torch

from ..triton.common import CHUNK
from . import triton_tree
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


def _suffix_matrix(NL: int, device) -> torch.Tensor:
    """U [NL, NL] fp32 with U[j, m] = 1 for j >= m: lw @ U are the bucket weights lambda_{c+1+m} (a matmul: torch's
    cumsum over a short last axis is slow on CUDA)."""
    return torch.ones(NL, NL, device=device).tril()


def _final_buckets(T: int, NL: int) -> list[list[int]]:
    """Per level j above the chunk (blocks of 2^(j+1) chunks), the tree nodes its final run state sums, earliest
    first: the one node of a complete last block, else the buckets of NT (the chunk count) at levels <= j."""
    NT = -(-T // CHUNK)
    P = 1 << NL
    plan = []
    for j in range(NL):
        b = ((NT - 1) >> (j + 1)) << (j + 1)
        if NT - b == 2 << j:
            plan.append([level_offset(P, j + 1) + (b >> (j + 1))])
        else:
            plan.append([level_offset(P, m) + (NT >> m) - 1 for m in range(j, -1, -1) if (NT >> m) & 1])
    return plan


def _final_runs(nm, tots, ge, plan, slot=None):
    """The final run states [B, H, NL, K, V] fp32 of the levels above the chunk from the tree (Triton layout,
    M = e I - N) along ``_final_buckets``: each bucket's total after the earlier ones carried across it.
    ``slot``: where node i sits in the given buffers (default: at i)."""
    at = (lambda i: i) if slot is None else slot.__getitem__
    runs = []
    for nodes in plan:
        acc = None
        for i in map(at, nodes):
            tot = tots[:, :, i].float()
            acc = tot if acc is None else torch.exp(ge[:, :, i, None, None]) * acc - nm[:, :, i].float() @ acc + tot
        runs.append(acc)
    return torch.stack(runs, dim=2)


def tree_forward(o, qt, k, w, u, gam, lw, scale: float, want_final: bool, keep: bool = False):
    """``levels_forward`` by the tree: o [B, T, H, V] fp32 += the levels above the chunk. Returns (the final run
    states or None, and with ``keep`` what the backward would compute again: the tree and the queries each
    bucket read, else None). All in Triton (``triton_tree``), the tree in q's dtype."""
    NL = lw.shape[-1]
    top = NL if want_final else NL - 1
    nm, tots, ge = triton_tree.build_tree(k, w, u, gam, NL, top, qt.dtype)
    lam = (lw @ _suffix_matrix(NL, lw.device)).mul_(scale).contiguous()
    qcs = triton_tree.readout_forward(o, qt, lam, nm, tots, ge, 1 << NL, store_q=keep)
    final = _final_runs(nm, tots, ge, _final_buckets(qt.shape[1], NL)) if want_final else None
    return final, ((nm, tots, ge, qcs, top) if keep else None)


def tree_backward(qt, k, w, u, gam, lw, scale: float, do, dst, kept=None):
    """``levels_backward`` by the tree: (dqt, dk, dw or None, du, dgam, dlw) fp32. The tree and the queries each
    bucket reads again (unless ``kept`` from the forward), then the readout's backward, the per-node sums, down
    the tree and into the chunks (``triton_tree``); the final states' share (few nodes) by torch autograd."""
    NL = lw.shape[-1]
    P = 1 << NL
    U = _suffix_matrix(NL, lw.device)
    lam = (lw @ U).mul_(scale).contiguous()
    if kept is None:
        top = NL if dst is not None else NL - 1
        nm, tots, ge = triton_tree.build_tree(k, w, u, gam, NL, top, qt.dtype)
        qcs = triton_tree.readout_forward(None, qt, lam, nm, tots, ge, P, store_q=True)
    else:
        nm, tots, ge, qcs, top = kept
    dfinal = None if dst is None else _final_runs_grad(nm, tots, ge, qt.shape[1], NL, dst)
    dqt, dlam, dnm, dtots, dge = triton_tree.tree_gradients(qcs, lam, nm, tots, ge, do.contiguous(), P, dfinal)
    del qcs
    dk, dw, du, dgam = triton_tree.tree_backward_pass(k, w, u, gam, nm, tots, ge, dnm, dtots, dge, P, top)
    dlw = (dlam @ U.t()).mul_(scale)
    return dqt, dk, dw, du, dgam, dlw


def _final_runs_grad(nm, tots, ge, T: int, NL: int, dst):
    """(nodes, dnm, dtots, dge) of the final run states against dst, for the few nodes they read (autograd
    through ``_final_runs`` on copies of those nodes)."""
    plan = _final_buckets(T, NL)
    nodes = sorted({i for level in plan for i in level})
    idx = torch.tensor(nodes, device=tots.device)
    nphi = nm.shape[2]
    phi_nodes = idx.clamp(max=nphi - 1)   # the top node has no N (never carried across): a stand-in, unread
    leaves = [nm.index_select(2, phi_nodes).detach().requires_grad_(), tots.index_select(2, idx).detach()
              .requires_grad_(), ge.index_select(2, phi_nodes).detach().requires_grad_()]
    with torch.enable_grad():
        runs = _final_runs(*leaves, plan, slot={n: i for i, n in enumerate(nodes)})
        grads = torch.autograd.grad(runs, leaves, dst.float(), allow_unused=True)
    grads = [torch.zeros_like(x, dtype=torch.float32) if g is None else g.float() for g, x in zip(grads, leaves)]
    return idx, phi_nodes, grads


def tree_bytes(B: int, T: int, H: int, K: int, V: int, NL: int, itemsize: int) -> int:
    """Bytes of the transition tree's own buffers in one fwd+bwd at their most (``tree_backward``): the tree (N and
    Tot of ~2P nodes) and their gradients, and the queries each bucket reads and their gradients ([NL, B, T, H, K]
    each), all in q's dtype."""
    nodes = 2 << NL
    tree = B * H * nodes * (K * K + K * V)
    return 2 * tree * itemsize + 2 * NL * B * T * H * K * itemsize
