"""Context parallelism for the log-linear ops (lctrain.kernels.loglinear_*).

The log-linear output is a sum of base-op runs, one per level l, each with its state reset at every
multiple of 2^l of the global position (kernels/loglinear/chunk.py). Rank r of P holds the tokens
[r T, (r+1) T). Shard-length rule: T must be a power of two (and equal on every rank), so that every
block of 2^l tokens either lies inside one rank (2^l <= T: that level needs nothing from other ranks)
or is a whole run of 2^l / T consecutive ranks (2^l > T). For such a "cross" level, rank r needs one
incoming state: the level's run state entering its shard, built from the earlier ranks of its block.

Over a shard the base recurrence is affine, S_out = A_j S_in + B_j, and B_j (the shard's final state from
zero) is the same for every level, so:

forward   1. (A_r, B_r) = shard_transition(...) of the base op (no autograd); ONE all-gather
          2. for each cross level l: S_in(l) = fold of (A_j, B_j) over the ranks j of r's block before r
          3. the local per-level runs with those incoming states (autograd graph kept as usual)
backward  4. for each cross level l: G_l = shard_state_grad of run l (queries q * w_l) with this rank's
             dO, plus A_r^T u_l (u_l: the gradient on this rank's returned final run state); ONE all-gather
          5. fold from the right inside the block: dS_out(l) = u_l + sum over later ranks j of the block
             (A_{r+1}^T ... A_{j-1}^T) G'_l(j); the local backward then yields every input's gradient.

Where the rank's call takes Gated DeltaNet's transition tree (backend "triton", ``fused.takes_gdn_tree``), both
exchanges happen inside the fused call instead (``_TreeExchange``): (A_r, B_r) is the map of the shard's tree (its
top node), gathered once the tree is built and before its readout; G_l is the gradient of the incoming state that
the call's backward forms anyway (the queries carried to the shard's start, read against dO), gathered before the
backward reads the final states' gradient. So no rank runs the transition pass of step 1 or the state-gradient
pass of step 4 there.

Conventions: position_offset must be 0 (rank r's tokens sit at r T ...) and initial_state None (refused
with an error, on every rank together). With output_final_state=True every rank returns the level
states of its own last query. level_weights is sliced like the other per-token inputs. Each call issues
its collectives again (an activation-checkpoint replay communicates again; every rank replays alike).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from lctrain.kernels import (
    apply_transition,
    apply_transition_transposed,
    levels_needed,
    loglinear_gated_delta_rule,
    loglinear_gated_linear_attn,
    shard_state_grad,
    shard_transition,
)
from lctrain.kernels.loglinear import ops as ll_ops
from lctrain.kernels.loglinear.chunk import level_query, level_weight_differences, loglinear_by_levels, slots_from_runs

from .context_parallel import ContextParallelError, _all_gather, _comm_device, _exact

# op name -> (base op name, kind of the CP primitives, positional args after q, k, v)
OPS = {
    "loglinear_gated_delta_rule": ("gated_delta_rule", "gated_delta", ("g", "beta", "level_weights")),
    "loglinear_gated_linear_attn": ("gated_linear_attn", "gla", ("g", "level_weights")),
}
_LOCAL = {"loglinear_gated_delta_rule": loglinear_gated_delta_rule,
          "loglinear_gated_linear_attn": loglinear_gated_linear_attn}


def op_name(op) -> str | None:
    """The log-linear op's name, or None when ``op`` is not one of them."""
    name = op if isinstance(op, str) else getattr(op, "__name__", None)
    return name if name in OPS else None


class LogLinearContextParallelOp:
    """``context_parallel(loglinear_op, group)``: same signature as the op, local shards in and out."""

    def __init__(self, op, group):
        self.name = op_name(op)
        if self.name is None:
            raise ContextParallelError(f"LogLinearContextParallelOp: {op!r} is not a log-linear op")
        self.base_name, self.kind, self._extra = OPS[self.name]
        if group is not None and not isinstance(group, dist.ProcessGroup):
            raise ContextParallelError(f"context_parallel: group must be a ProcessGroup or None, got "
                                       f"{type(group).__name__}")
        if group is not None and not dist.is_initialized():
            raise ContextParallelError("context_parallel: torch.distributed is not initialised")
        self.group = group
        self.size = 1 if group is None else dist.get_world_size(group)
        self.rank = 0 if group is None else dist.get_rank(group)
        self.gathers = 0

    def __repr__(self) -> str:
        return f"context_parallel({self.name}, cp={self.size}, rank={self.rank})"

    def __call__(self, q, k, v, *args, scale=None, initial_state=None, output_final_state=False,
                 position_offset=0, cu_seqlens=None, backend="auto", chunk_size=64):
        if len(args) != len(self._extra):
            raise TypeError(f"{self.name}(q, k, v, {', '.join(self._extra)}, *, ...) takes "
                            f"{3 + len(self._extra)} positional tensors, got {3 + len(args)}")
        local = _LOCAL[self.name]
        if self.size == 1:
            return local(q, k, v, *args, scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state, position_offset=position_offset,
                         cu_seqlens=cu_seqlens, backend=backend, chunk_size=chunk_size)
        named = dict(zip(self._extra, args))
        g, beta, lam = named["g"], named.get("beta"), named["level_weights"]
        self._check_inputs(q, k, v, lam, initial_state, position_offset, cu_seqlens, backend)
        B, T, H, K = q.shape
        L = lam.shape[-1]
        # shapes, and L for the whole sequence (the last rank's last position)
        ll_ops._validate(self.name, q, k, v, g, beta, lam, None, (self.size - 1) * T, None, scale, chunk_size)
        which = "naive" if backend == "naive" else ll_ops._resolve(backend, self.base_name, q.device)
        if which == "triton":
            ll_ops._check_fused(chunk_size, q, k, v)
        base_backend = "triton" if which == "triton_composed" else which
        p = T.bit_length() - 1
        top = levels_needed(self.size * T) - 1
        cross = list(range(p + 1, top + 1))
        gates = (g,) if beta is None else (g, beta)
        fused = which == "triton" and (self.rank * T) % chunk_size == 0   # the fused kernels (else T < 64)
        if fused:
            from lctrain.kernels.loglinear.fused import fused_by_levels  # imports triton
            if self.exchanges_in_call(q, v, beta, backend, chunk_size):
                # the transition tree: the shard maps and the incoming states' gradients are exchanged inside the
                # call, from what its tree forms anyway (no transition pass, no state-gradient pass); the final run
                # states only where asked for (the later ranks' share of their gradient comes through the exchange)
                ex = _TreeExchange(self, cross, p, top)
                o, runs = fused_by_levels(ll_ops._BASE[self.base_name], q, k, v, g, beta, lam, scale=scale,
                                          run_init=None, position_offset=self.rank * T, top=top,
                                          want_runs=output_final_state, exchange=ex)
                return o.to(q.dtype), (slots_from_runs(runs, L) if output_final_state else None)
        A_all, B_all = self._gather_transitions(k, v, g, beta, base_backend, chunk_size)
        run_init = None
        if cross:
            with _exact(q.device):
                zero = torch.zeros_like(B_all[0])
                inits = [zero] * (top + 1)
                for lev in cross:
                    inits[lev] = self._fold_in(A_all, B_all, lev, p, zero)
                run_init = torch.stack(inits, dim=2)
        if fused:
            o, runs = fused_by_levels(ll_ops._BASE[self.base_name], q, k, v, g, beta, lam, scale=scale,
                                      run_init=run_init, position_offset=self.rank * T, top=top, want_runs=True)
            o = o.to(q.dtype)
        else:
            o, runs = loglinear_by_levels(ll_ops._BASE[self.base_name], q, k, v, gates, lam, scale=scale,
                                          run_init=run_init, position_offset=self.rank * T, top=top,
                                          backend=base_backend, chunk_size=chunk_size)
        if cross and torch.is_grad_enabled() and (o.requires_grad or runs.requires_grad):
            o, runs = _LevelGradExchange.apply(o, runs, q, k, g, beta, lam, self, A_all, cross, p, top,
                                               scale, base_backend, chunk_size)
        return o, (slots_from_runs(runs, L) if output_final_state else None)

    def exchanges_in_call(self, q, v, beta, backend="auto", chunk_size=64) -> bool:
        """Whether this rank's call takes the transition tree and exchanges inside it (no separate transition or
        state-gradient pass): backend "triton" (or "auto" resolving to it), a chunk-aligned shard, levels that
        cross ranks, and Gated DeltaNet's tree taking this shard (``fused.takes_gdn_tree``)."""
        if self.size == 1:
            return False
        T = q.shape[1]
        if ll_ops._resolve(backend, self.base_name, q.device) != "triton" or (self.rank * T) % chunk_size:
            return False
        from lctrain.kernels.loglinear.fused import takes_gdn_tree  # imports triton
        top = levels_needed(self.size * T) - 1
        return top > T.bit_length() - 1 and takes_gdn_tree(q, v, beta, self.rank * T, top)

    # ------------------------------------------------------------------------------------------------

    def _block_start(self, lev: int, p: int) -> int:
        """First rank of this rank's block of 2^lev tokens (2^(lev - p) ranks)."""
        return (self.rank >> (lev - p)) << (lev - p)

    def _block_end(self, lev: int, p: int) -> int:
        return min(self._block_start(lev, p) + (1 << (lev - p)), self.size)

    def _fold_in(self, A_all, B_all, lev: int, p: int, S):
        """Level lev's run state entering this rank's shard: S (zero) carried across the earlier ranks of its block
        (step 2 of the module docstring)."""
        for j in range(self._block_start(lev, p), self.rank):
            S = apply_transition(A_all[j], S) + B_all[j]
        return S

    def _fold_back(self, A_all, G_level, lev: int, p: int, D):
        """What the later ranks of level lev's block owe this rank's final state of that level: D (zero) plus their
        G_level[j], carried back across the ranks between (step 5)."""
        for j in range(self._block_end(lev, p) - 1, self.rank, -1):
            D = apply_transition_transposed(A_all[j], D) + G_level[j]
        return D

    def _check_inputs(self, q, k, v, lam, initial_state, position_offset, cu_seqlens, backend) -> None:
        """Local rules, then one small all-gather so that every rank raises the same error together."""
        problem = ""
        T = k.shape[1] if isinstance(k, torch.Tensor) and k.dim() == 4 else 0
        if T < 1 or T & (T - 1):
            problem = (f"{self.name} under context parallelism: each rank holds T_local={T} tokens; the "
                       "log-linear ops need a power of two per rank (every Fenwick block then lies inside one "
                       "rank or spans whole ranks): make data.seq_len / cp a power of two")
        elif initial_state is not None:
            problem = (f"{self.name} under context parallelism does not take an initial_state; pass None "
                       "(run the prefix in the same CP call instead)")
        elif position_offset != 0:
            problem = (f"{self.name} under context parallelism: position_offset must be 0 (rank r's tokens "
                       f"start at r * T_local); got {position_offset!r}")
        elif cu_seqlens is not None:
            problem = f"{self.name} under context parallelism: cu_seqlens is not supported; pass None"
        elif backend == "dense":
            problem = (f"{self.name} under context parallelism: backend='dense' is a test form; "
                       "use naive/torch/triton/auto")
        shape = tuple(k.shape) if isinstance(k, torch.Tensor) else ()
        shape = (shape + (0, 0, 0, 0))[:4]
        V = v.shape[-1] if isinstance(v, torch.Tensor) else 0
        L = lam.shape[-1] if isinstance(lam, torch.Tensor) else 0
        meta = torch.tensor([*shape, V, L, int(bool(problem))], dtype=torch.int64,
                            device=_comm_device(k if isinstance(k, torch.Tensor) else None, self.group))
        metas = _all_gather(meta, self.group).tolist()
        if problem:
            raise ContextParallelError(problem)
        bad = [r for r, m in enumerate(metas) if m[-1]]
        if bad:
            raise ContextParallelError(f"{self.name}: CP rank(s) {bad} rejected their input (see their error)")
        if any(m != metas[0] for m in metas):
            rows = "; ".join(f"rank {r}: B,T,H,K,V,L={m[:6]}" for r, m in enumerate(metas))
            raise ContextParallelError(f"{self.name}: CP ranks disagree on shapes ({rows}); every rank must pass "
                                       "an equal-length contiguous shard of the same batch")

    def _gather_transitions(self, k, v, g, beta, backend, chunk_size):
        A, Bst = shard_transition(self.kind, k, v, g=g, beta=beta, backend=backend, chunk_size=chunk_size)
        return self._gather_maps(A, Bst)

    def _gather_maps(self, A, Bst):
        """Every rank's shard map (A_all [P, ...A], B_all [P, ...B], at least fp32) from this rank's (A, B): the
        forward's one all-gather (step 1)."""
        dt = torch.promote_types(torch.float32, Bst.dtype)
        with _exact(Bst.device):
            A, Bst = A.to(dt), Bst.to(dt)
            gathered = _all_gather(torch.cat([A.reshape(-1), Bst.reshape(-1)]), self.group)
            self.gathers += 1
            nA = A.numel()
            return (gathered[:, :nA].reshape(self.size, *A.shape),
                    gathered[:, nA:].reshape(self.size, *Bst.shape))

    def _fold_gradients(self, q, k, g, beta, lam, do, druns, A_all, cross, p, top, scale, backend, chunk_size):
        """Gradient of every level's final run state of this rank (zero where no later rank reads it). The
        state-gradient pass runs only for the levels whose block began on an earlier rank (their G is what those
        ranks read): rank 0 runs none."""
        w = level_weight_differences(q, lam, top)
        Gs = []
        for lev in cross:
            if self._block_start(lev, p) == self.rank:   # the level's block starts here: no earlier rank reads G
                Gs.append(torch.zeros(q.shape[0], q.shape[2], k.shape[-1], do.shape[-1], dtype=A_all.dtype,
                                      device=q.device))
                continue
            G = shard_state_grad(self.kind, level_query(q, w, lev), k, do, g=g, beta=beta, scale=scale,
                                 backend=backend, chunk_size=chunk_size)
            Gs.append(G.to(A_all.dtype))
        with _exact(q.device):
            G = torch.stack(Gs)                                                # [n_cross, B, H, K, V]
            if druns is not None:
                u = druns[:, :, cross].movedim(2, 0).to(A_all.dtype)
                G = G + torch.stack([apply_transition_transposed(A_all[self.rank], x) for x in u])
            G_all = _all_gather(G.reshape(-1), self.group).reshape(self.size, *G.shape)
            out = torch.zeros(G.shape[1:3] + (top + 1,) + G.shape[3:], dtype=A_all.dtype, device=G.device)
            out = list(out.unbind(2))
            for i, lev in enumerate(cross):
                out[lev] = self._fold_back(A_all, G_all[:, i], lev, p, torch.zeros_like(G[i]))
            out = torch.stack(out, dim=2)
            if druns is not None:
                out = out + druns.to(out.dtype)
        return out


class _TreeExchange:
    """A rank's two exchanges inside its fused call when that call takes the transition tree
    (``transition_tree.tree_forward`` / ``tree_backward`` call them): steps 1-2 of the module docstring with
    (A_r, B_r) taken from the shard's tree (its top node) instead of a transition pass, and steps 4-5 with G_l
    taken from the tree backward's gradient of the incoming state (the queries carried to the shard's start, read
    against dO) instead of a state-gradient pass. Each is one all-gather that every rank joins."""

    def __init__(self, cp_op, cross: list[int], p: int, top: int):
        from lctrain.kernels.triton.common import CHUNK  # (imports triton: only the fused path gets here)
        self.cp, self.cross, self.p, self.top = cp_op, cross, p, top
        self.c = CHUNK.bit_length() - 1   # the Function's level j is level c + 1 + j
        self.A_all = self.s0 = self.state_shape = None

    def incoming(self, A, Bst):
        """This shard's map (A [B, H, K, K], B [B, H, K, V] fp32) -> s0 [B, H, top - c, K, V] fp32: the run state
        entering this shard of every level whose block began on an earlier rank, or None (no such level)."""
        cp = self.cp
        self.state_shape = tuple(Bst.shape)
        A_all, B_all = cp._gather_maps(A, Bst)
        with _exact(A.device):
            s0 = None
            for lev in self.cross:
                if cp._block_start(lev, self.p) == cp.rank:   # the level's block starts here: nothing comes in
                    continue
                S = cp._fold_in(A_all, B_all, lev, self.p, torch.zeros_like(Bst))
                if s0 is None:
                    s0 = Bst.new_zeros(*Bst.shape[:2], self.top - self.c, *Bst.shape[2:])
                s0[:, :, lev - self.c - 1] = S
        self.A_all, self.s0 = A_all, s0
        return s0

    def final_state_grads(self, dst, ds0_in: dict):
        """dst (the gradient of this rank's final run states above the chunk [B, H, top - c, K, V], or None) plus
        what the later ranks of each cross level's block owe them, from ds0_in {level j: the gradient of this
        shard's incoming state of level c + 1 + j through its own outputs}. None where dst is None and no later
        rank reads this rank's final states (the last rank of every block: nothing to carry back)."""
        cp, A_r = self.cp, self.A_all[self.cp.rank]
        shape = self.state_shape   # [B, H, K, V]
        G = []
        for lev in self.cross:
            j = lev - self.c - 1
            if j not in ds0_in:   # the level's block starts here: no earlier rank reads this G
                G.append(torch.zeros(shape, dtype=A_r.dtype, device=A_r.device))
                continue
            g = ds0_in[j].to(A_r.dtype)   # this shard continues the block: its outputs' share + A^T (dst's)
            G.append(g if dst is None else g + apply_transition_transposed(A_r, dst[:, :, j].to(A_r.dtype)))
        with _exact(A_r.device):
            G = torch.stack(G)
            G_all = _all_gather(G.reshape(-1), cp.group).reshape(cp.size, *G.shape)
            if dst is None and all(cp._block_end(lev, self.p) - 1 == cp.rank for lev in self.cross):
                return None
            out = (torch.zeros(shape[:2] + (self.top - self.c,) + shape[2:], dtype=torch.float32, device=A_r.device)
                   if dst is None else dst.float().clone())
            for i, lev in enumerate(self.cross):
                D = cp._fold_back(self.A_all, G_all[:, i], lev, self.p, torch.zeros_like(G[i]))
                out[:, :, lev - self.c - 1] += D.to(out.dtype)
        return out


class _LevelGradExchange(torch.autograd.Function):
    """Identity on (o, final run states) in the forward; in the backward it adds to the final run states'
    gradient what the later ranks of each block owe them (steps 4-5 of the module docstring)."""

    @staticmethod
    def forward(ctx, o, runs, q, k, g, beta, lam, cp_op, A_all, cross, p, top, scale, backend, chunk_size):
        ctx.save_for_backward(q, k, g, beta, lam, A_all)
        ctx.cp_op, ctx.cross, ctx.p, ctx.top = cp_op, cross, p, top
        ctx.scale, ctx.backend, ctx.chunk_size = scale, backend, chunk_size
        ctx.o_shape, ctx.runs_dtype = o.shape, runs.dtype
        ctx.set_materialize_grads(False)
        return o.view_as(o), runs.view_as(runs)

    @staticmethod
    def backward(ctx, do, druns):
        q, k, g, beta, lam, A_all = ctx.saved_tensors
        if do is None:  # every rank must still take part in the gather
            do = torch.zeros(ctx.o_shape, dtype=q.dtype, device=q.device)
        d = ctx.cp_op._fold_gradients(q, k, g, beta, lam.detach(), do.to(q.dtype), druns, A_all, ctx.cross,
                                      ctx.p, ctx.top, ctx.scale, ctx.backend, ctx.chunk_size)
        return (do, d.to(ctx.runs_dtype)) + (None,) * 13
