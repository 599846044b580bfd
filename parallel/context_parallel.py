"""Context parallelism for the linear-recurrent ops: the affine scan over ranks (docs/design.md §3;
its costs: §5).

Rank r of a CP group of size P holds the contiguous tokens [r T, (r+1) T) of every sequence. Over
its shard the state evolves affinely, S_out(r) = A_r S_in(r) + B_r, so

forward   1. state-only pass on the local shard: (A_r, B_r) = shard_transition(...)   (no autograd)
          2. ONE all-gather of (A_r, B_r) over the group (fp32, size independent of T)
          3. local prefix fold: S_in(r) = A_{r-1}(... (A_0 S_0 + B_0) ...) + B_{r-1}
          4. the ordinary local op with initial_state = S_in(r): its autograd graph is kept as usual,
             so nothing of the local forward is recomputed in the backward.
backward  5. state-gradient pass with dO: G_r = shard_state_grad(...)              (no autograd)
          6. ONE all-gather of G'_r = G_r + A_r^T U_r (U_r: the caller's gradient on rank r's
             returned final state, usually zero)
          7. fold from the right: dS_in(P) = 0, dS_in(j) = A_j^T dS_in(j+1) + G'_j; this rank's
             outgoing-state gradient is dS_out(r) = U_r + dS_in(r+1)
          8. the local op's own backward, fed dO and dS_out(r): it yields exact dq, dk, dv, dg, dbeta
             (the later ranks' dependence on this shard arrives through dS_out(r)) and d initial_state.

Steps 5-7 live in ``_StateGradExchange``, an identity on (o, final_state) whose backward turns the
local output gradient into the missing final-state gradient before autograd runs the local backward.

Conventions
-----------
- ``initial_state`` (the state before the sequence's first token) is taken from CP rank 0 only;
  other ranks may pass None or anything of the right shape: it is ignored there and gets no gradient.
- With ``output_final_state=True`` every rank returns the outgoing state of ITS shard, S_out(r);
  on the last rank that is the sequence's final state. A gradient on any of them is honoured.
- Activation checkpointing (torch.utils.checkpoint, non-reentrant): the replay of the forward during
  the backward reuses the gathered (A, fold) of the original forward instead of a second state pass
  and all-gather when the match is unambiguous: the CP callable (one per layer: create it once, e.g.
  in the layer's ``__init__``) holds exactly one live, not yet back-propagated forward. Otherwise
  (several micro-batches in flight through the same callable, or a callable shared by layers) the
  replay communicates again; every rank makes the same choice, so collectives stay matched.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Callable

import torch
import torch.distributed as dist

from lctrain.kernels import (
    apply_transition,
    apply_transition_transposed,
    delta_rule,
    gated_delta_rule,
    gated_linear_attn,
    shard_state_grad,
    shard_transition,
)

# op name -> (kind for the CP primitives, positional args after q, k, v)
_OPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "delta_rule": ("delta", ("beta",)),
    "gated_delta_rule": ("gated_delta", ("g", "beta")),
    "gated_linear_attn": ("gla", ("g",)),
}
_KIND_IDS = {"delta": 0, "gated_delta": 1, "gla": 2}
_LOCAL_OPS: dict[str, Callable] = {"delta": delta_rule, "gated_delta": gated_delta_rule, "gla": gated_linear_attn}


class ContextParallelError(ValueError):
    """Bad input to a context-parallel op; the message says what to change."""


def _op_name(op) -> str:
    name = op if isinstance(op, str) else getattr(op, "__name__", None)
    if name not in _OPS:
        raise ContextParallelError(
            f"context_parallel: unsupported op {op!r}; pass one of lctrain.kernels.delta_rule, "
            "gated_delta_rule, gated_linear_attn (or their names)")
    return name


def context_parallel(op, group) -> "ContextParallelOp":
    """A callable with ``op``'s signature that runs on the local contiguous shard of each rank of
    ``group`` and returns the local outputs. ``group`` None or of size 1 means no CP (plain op).

    Create it once per layer (not per call) so that checkpoint replays can reuse gathered states."""
    return ContextParallelOp(op, group)


class _Stash:
    """What a forward gathered, kept (detached, small) for a checkpoint replay of that forward."""
    __slots__ = ("A_all", "S_in", "backward_done", "__weakref__")

    def __init__(self, A_all: torch.Tensor, S_in: torch.Tensor):
        self.A_all, self.S_in, self.backward_done = A_all, S_in, False


class ContextParallelOp:
    """See ``context_parallel``. Attributes: ``name``, ``kind``, ``group``; counters
    ``gathers`` (state all-gathers issued by forwards), ``replays_reused`` (checkpoint replays that
    reused a stash instead of communicating) and ``shape_checks`` (cross-rank shape checks), useful in
    tests and benchmarks."""

    def __init__(self, op, group):
        self.name = _op_name(op)
        self.kind, self._extra = _OPS[self.name]
        if group is not None and not isinstance(group, dist.ProcessGroup):
            raise ContextParallelError(f"context_parallel: group must be a torch.distributed ProcessGroup or None, "
                                       f"got {type(group).__name__}; take it from lctrain.parallel.mesh.cp_group()")
        if group is not None and not dist.is_initialized():
            raise ContextParallelError("context_parallel: torch.distributed is not initialised; call "
                                       "lctrain.parallel.init_mesh(cfg.parallel) first")
        self.group = group
        self.size = 1 if group is None else dist.get_world_size(group)
        self.rank = 0 if group is None else dist.get_rank(group)
        self._stashes: list[weakref.ref] = []
        self._validated = None  # local shapes last checked against every rank's (see _check_inputs)
        self.gathers = 0
        self.replays_reused = 0
        self.shape_checks = 0

    def __repr__(self) -> str:
        return f"context_parallel({self.name}, cp={self.size}, rank={self.rank})"

    def __call__(self, q, k, v, *args, scale=None, initial_state=None, output_final_state=False,
                 backend="auto", chunk_size=64):
        if len(args) != len(self._extra):
            raise TypeError(f"{self.name}(q, k, v, {', '.join(self._extra)}, *, ...) takes {3 + len(self._extra)} "
                            f"positional tensors, got {3 + len(args)}")
        local = _LOCAL_OPS[self.kind]
        if self.size == 1:
            return local(q, k, v, *args, scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state, backend=backend, chunk_size=chunk_size)
        named = dict(zip(self._extra, args))
        g, beta = named.get("g"), named.get("beta")
        stash = self._replay_stash()
        if stash is None:
            signature = _signature(q, k, v, g, beta, chunk_size)
            if signature != self._validated:
                self._check_inputs(q, k, v, g, beta, initial_state, chunk_size)
                self._validated = signature
                self.shape_checks += 1
            A_all, S_in = self._gather_and_fold(k, v, g, beta, initial_state, backend, chunk_size)
            stash = _Stash(A_all, S_in)
            if torch.is_grad_enabled() and not _in_backward():
                self._stashes = [r for r in self._stashes if r() is not None] + [weakref.ref(stash)]
        # rank 0 feeds the caller's initial state itself (differentiable); other ranks the fold
        start = initial_state if self.rank == 0 else stash.S_in
        o, s_out = local(q, k, v, *args, scale=scale, initial_state=start, output_final_state=True,
                         backend=backend, chunk_size=chunk_size)
        if torch.is_grad_enabled() and (o.requires_grad or s_out.requires_grad):
            o, s_out = _StateGradExchange.apply(o, s_out, q, k, g, beta, self, stash, scale, backend, chunk_size)
        return o, (s_out if output_final_state else None)

    # ------------------------------------------------------------------------------------ forward

    def _replay_stash(self) -> _Stash | None:
        """During a checkpoint replay (a forward run inside the backward), the one live stash."""
        if not _in_backward():
            return None
        live = [s for s in (r() for r in self._stashes) if s is not None and not s.backward_done]
        if len(live) != 1:
            return None
        self.replays_reused += 1
        return live[0]

    def _check_inputs(self, q, k, v, g, beta, initial_state, chunk_size) -> None:
        """Local checks, then one tiny all-gather so that every rank sees every rank's shapes and
        raises the same error (a rank failing alone would leave the others hanging in a collective).

        Runs on the first call and whenever this rank's shapes change, not on every call: the gather
        costs a host-device sync. Ranks whose shapes agree change them together, so they skip or
        check together; only shapes that change on some ranks alone can then reach the state
        all-gather unchecked (and fail there, or hang on NCCL until its timeout)."""
        problem = ""
        try:
            for name, x, nd in (("q", q, 4), ("k", k, 4), ("v", v, 4), ("g", g, 3), ("beta", beta, 3)):
                if x is not None and (not isinstance(x, torch.Tensor) or x.dim() != nd):
                    raise ContextParallelError(f"{self.name}: {name} must be a {nd}-d tensor, got "
                                               f"{getattr(x, 'shape', type(x).__name__)}")
            T = k.shape[1]
            if isinstance(chunk_size, int) and chunk_size > 0 and T % chunk_size:
                raise ContextParallelError(
                    f"{self.name} under context parallelism: each of the {self.size} ranks holds T_local={T} tokens, "
                    f"not a multiple of chunk_size={chunk_size}; make the sequence length a multiple of "
                    f"cp * chunk_size = {self.size * chunk_size} (data.seq_len) or lower model.chunk_size")
        except ContextParallelError as err:
            problem = str(err)
        B, T, H, K = (tuple(k.shape) + (0, 0, 0, 0))[:4] if isinstance(k, torch.Tensor) else (0, 0, 0, 0)
        V = v.shape[-1] if isinstance(v, torch.Tensor) else 0
        meta = torch.tensor([B, T, H, K, V, _KIND_IDS[self.kind], int(chunk_size) if isinstance(chunk_size, int) else -1,
                             int(bool(problem))], dtype=torch.int64,
                            device=_comm_device(k if isinstance(k, torch.Tensor) else None, self.group))
        metas = _all_gather(meta, self.group).tolist()
        if problem:
            raise ContextParallelError(problem)
        bad = [r for r, m in enumerate(metas) if m[7]]
        if bad:
            raise ContextParallelError(f"{self.name}: CP rank(s) {bad} rejected their input (see their error); "
                                       "every rank must pass a valid shard")
        if any(m != metas[0] for m in metas):
            rows = "; ".join(f"rank {r}: B,T,H,K,V={m[:5]} chunk={m[6]}" for r, m in enumerate(metas))
            raise ContextParallelError(f"{self.name}: CP ranks disagree on shapes ({rows}); every rank must pass "
                                       "an equal-length contiguous shard of the same batch")

    def _gather_and_fold(self, k, v, g, beta, initial_state, backend, chunk_size):
        A, Bst = shard_transition(self.kind, k, v, g=g, beta=beta, backend=backend, chunk_size=chunk_size)
        dt = torch.promote_types(torch.float32, Bst.dtype)
        with _exact(k.device):
            A, Bst = A.to(dt), Bst.to(dt)
            if self.rank == 0 and initial_state is not None:
                # rank 0 hands on its real outgoing state, S_out(0) = A_0 S_0 + B_0
                Bst = apply_transition(A, initial_state.detach().to(dt)) + Bst
            packed = torch.cat([A.reshape(-1), Bst.reshape(-1)])
            gathered = _all_gather(packed, self.group)          # [P, n]
            self.gathers += 1
            nA = A.numel()
            A_all = gathered[:, :nA].reshape(self.size, *A.shape)
            B_all = gathered[:, nA:].reshape(self.size, *Bst.shape)
            S = torch.zeros_like(Bst)
            for j in range(self.rank):
                S = apply_transition(A_all[j], S) + B_all[j]
        return A_all, S

    # ----------------------------------------------------------------------------------- backward

    def _fold_gradients(self, stash: _Stash, q, k, g, beta, do, u, scale, backend, chunk_size):
        """dS_out(r) from this rank's output gradient do and final-state gradient u (or None)."""
        G = shard_state_grad(self.kind, q, k, do, g=g, beta=beta, scale=scale, backend=backend, chunk_size=chunk_size)
        A_all = stash.A_all
        with _exact(q.device):
            G = G.to(A_all.dtype)
            if u is not None:
                G = G + apply_transition_transposed(A_all[self.rank], u.to(A_all.dtype))
            G_all = _all_gather(G.reshape(-1), self.group).reshape(self.size, *G.shape)
            D = torch.zeros_like(G)
            for j in range(self.size - 1, self.rank, -1):
                D = apply_transition_transposed(A_all[j], D) + G_all[j]
            if u is not None:
                D = D + u.to(D.dtype)
        return D


def _signature(q, k, v, g, beta, chunk_size):
    shape = lambda x: None if not isinstance(x, torch.Tensor) else tuple(x.shape)  # noqa: E731
    return shape(q), shape(k), shape(v), shape(g), shape(beta), chunk_size


def _in_backward() -> bool:
    """True while autograd runs a backward (a checkpoint replays forwards only there). Without the
    probe (older torch) it answers False: replays then communicate again, which is still correct."""
    probe = getattr(torch._C, "_current_graph_task_id", None)
    return probe is not None and probe() != -1


@contextlib.contextmanager
def _exact(device: torch.device):
    """No autograd and no autocast: the folds of (A, B) and of G stay in fp32 under bf16 training."""
    with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
        yield


def _comm_device(x: torch.Tensor | None, group) -> torch.device:
    """Where tensors for ``group``'s collectives must live: CUDA for NCCL, CPU otherwise (gloo)."""
    if dist.get_backend(group) == "nccl":
        if x is not None and x.device.type == "cuda":
            return x.device
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """[n] on every rank -> [P, n] (rank order), on x's device."""
    device = _comm_device(x, group)
    send = x.contiguous().to(device)
    P = dist.get_world_size(group)
    out = torch.empty((P * send.shape[0],) + tuple(send.shape[1:]), dtype=send.dtype, device=device)
    _gather_single(out, send, group=group)
    return out.view(P, *send.shape).to(x.device)


# torch >= 2.13 renamed all_gather_into_tensor (output = the inputs concatenated along dim 0)
_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _StateGradExchange(torch.autograd.Function):
    """Identity on (o, final_state) in the forward. In the backward it runs steps 5-7 of the module
    docstring and hands the local op's backward the gradient of its final state, dS_out(r)."""

    @staticmethod
    def forward(ctx, o, s_out, q, k, g, beta, cp_op, stash, scale, backend, chunk_size):
        ctx.save_for_backward(q, k, g, beta)
        ctx.cp_op, ctx.stash = cp_op, stash
        ctx.scale, ctx.backend, ctx.chunk_size = scale, backend, chunk_size
        ctx.o_shape, ctx.s_dtype = o.shape, s_out.dtype
        ctx.set_materialize_grads(False)  # an unused final state costs nothing in the backward
        return o.view_as(o), s_out.view_as(s_out)

    @staticmethod
    def backward(ctx, do, ds_user):
        q, k, g, beta = ctx.saved_tensors
        cp_op, stash = ctx.cp_op, ctx.stash
        stash.backward_done = True
        if do is None:  # every rank must still take part in the gather
            do = torch.zeros(ctx.o_shape, dtype=q.dtype, device=q.device)
        ds_out = cp_op._fold_gradients(stash, q, k, g, beta, do.to(q.dtype), ds_user, ctx.scale, ctx.backend,
                                       ctx.chunk_size)
        return (do, ds_out.to(ctx.s_dtype), None, None, None, None, None, None, None, None, None)
