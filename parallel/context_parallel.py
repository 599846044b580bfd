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

Nothing is computed that nobody reads (docs/design.md §3, "What each rank computes"):
- the last rank's (A, B) are read by nobody (the fold of rank r uses ranks < r): it runs no state
  pass and sends zeros of the right size (it computes its own A in the backward only when its
  returned final state has a gradient);
- where a rank's incoming state is known, A would only ever multiply that known state: rank 0
  (its S_in is the caller's initial state, or zero) and a shard whose last document piece starts a
  document (``cu_seqlens``) run the pass WITHOUT A, from that known start (``shard_final_state``:
  about half the programs of the (A, B) pass on the Triton backend), and send that outgoing state
  as B with A = 0; the fold for later ranks is unchanged, since it starts from zero;
- rank 0's G'_0 is read by nobody (the fold from the right uses ranks > r): rank 0 runs no
  state-gradient pass; the last rank's incoming final-state gradient is zero (without a gradient
  of its own), so it needs G alone, which is all that pass computes.
So at P = 2 the forward adds one A-free pass on rank 0 and the backward one G pass on rank 1;
middle ranks (P >= 3) compute (A, B) and G. ``transition="sequential_all"`` is the reference that
skips nothing: every rank computes (A, B) from zero and G, and rank 0 folds its initial state in
with A_0 (tests compare the two). The (A, B) pass itself is ``shard_transition``
(``transition="sequential"``) or ``grouped_shard_transition`` (``transition="grouped"``: groups of
chunks in parallel, then a log-depth fold; the groups' A are needed by that fold, so grouped ranks
keep computing A even where only B is read); for gated linear attention ``transition="direct"``
computes both passes in closed form (``kernels/scalar_decay.py``; its A is one exp per head, nothing
to skip).

Steps 5-7 live in ``_StateGradExchange``, an identity on (o, final_state) whose backward turns the
local output gradient into the missing final-state gradient before autograd runs the local backward.

Conventions
-----------
- ``initial_state`` (the state before the sequence's first token) is taken from CP rank 0 only;
  other ranks may pass None or anything of the right shape: it is ignored there and gets no gradient.
- With ``output_final_state=True`` every rank returns the outgoing state of ITS shard, S_out(r);
  on the last rank that is the sequence's final state. A gradient on any of them is honoured.
- Packed documents: ``cu_seqlens`` is the GLOBAL boundary tensor (``[N+1]`` over the P * T_local
  tokens, B = 1), identical on every rank; documents may start, end or span whole shards. A shard
  holding a boundary (at its first token or inside) cuts the chain: its transition is that of its
  last document piece, with A = 0, so no state crosses a document end. Its first piece continues the
  previous rank's state unless a document starts at the shard's first token; every other piece starts
  from zero or from its document's row of ``initial_state`` ``[N, H, K, V]``, which every rank then
  passes (the same tensor): each rank uses, and gives gradient to, the rows of the documents that
  start in its shard, so the full gradient is the sum over ranks. With ``output_final_state`` each
  rank returns ``[N, H, K, V]``: for every document with tokens in its shard, the state after its
  last token there (the document's final state on the rank where it ends), zeros elsewhere.
- Activation checkpointing (torch.utils.checkpoint, non-reentrant): the replay of the forward during
  the backward reuses the gathered (A, fold) of the original forward instead of a second state pass
  and all-gather when the match is unambiguous: the CP callable (one per layer: create it once, e.g.
  in the layer's ``__init__``) holds exactly one live, not yet back-propagated forward. Otherwise
  (several micro-batches in flight through the same callable, or a callable shared by layers) the
  replay communicates again; every rank makes the same choice, so collectives stay matched.
"""
from __future__ import annotations

import bisect
import contextlib
import weakref
from typing import Callable

import torch
import torch.distributed as dist
from lctrain.kernels import (
    apply_transition,
    apply_transition_transposed,
    check_cu_seqlens,
    delta_rule,
    gated_delta_rule,
    gated_linear_attn,
    grouped_shard_state_grad,
    grouped_shard_transition,
    resolve_backend,
    scalar_decay_shard_state_grad,
    scalar_decay_shard_transition,
    shard_final_state,
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
# how a shard's (A, B) is computed: "sequential" walks its chunks in one chain (shard_transition, the
# reference); "grouped" runs groups of chunks in parallel and folds them (grouped_shard_transition);
# "grouped+grad" groups the backward's state-gradient pass as well (grouped_shard_state_grad: it adds a
# state pass per group for the groups' A); ":G" fixes the number of groups; "direct" (gated linear attention
# only) computes both passes in closed form, one matmul each (kernels/scalar_decay.py). DEFAULT_TRANSITION is
# what context_parallel uses unless told.
# "overlap" (Triton backend) folds both passes into the local op's own passes (kernels/triton/cp_overlap.py);
# "pipeline" is "overlap" where the last rank waits for S_in and rank 0 for dS_out before their plain passes
# (no prefix / suffix programs or fix-ups at P = 2: the ranks run the plain op's kernels one after the other).
# "sequential_all" is "sequential" without skipping what nobody reads (the reference for that skipping:
# every rank runs the (A, B) pass from zero and the state-gradient pass).
# "auto" (the default) picks per call (``auto_transition``): "pipeline" where it was measured faster and is
# verified over NCCL (2 ranks, Triton backend, no packed documents), else "sequential".
TRANSITIONS = ("auto", "sequential", "sequential_all", "grouped", "grouped+grad", "direct", "overlap", "pipeline")
# the transitions that run inside the Triton op (kernels/triton/cp_overlap.py)
IN_OP_TRANSITIONS = ("overlap", "pipeline")
DEFAULT_TRANSITION = "auto"


def auto_transition(size: int, backend: str, device: torch.device, documents: bool) -> str:
    """What transition="auto" runs: "pipeline" at CP = 2 on the Triton backend without packed documents
    (on 2xH200 its CP=2 efficiency beat "sequential" at every length, e.g. Gated DeltaNet 0.67-0.81
    against 0.60-0.66 at 8K-64K tokens per rank); "sequential" otherwise: on the torch / naive backends
    (pipeline runs inside the Triton kernels), with documents (pipeline's passes there are sequential's
    anyway), and at CP > 2, where pipeline's middle ranks run overlap's extra programs and fix-ups and
    no measurement says that it is faster. Pass transition="pipeline" to use it at any CP size."""
    try:
        triton = resolve_backend(backend, "shard_transition", device) == "triton"
    except (RuntimeError, TypeError, ValueError):  # a backend that cannot run here: the op itself says why
        triton = False
    return "pipeline" if size == 2 and not documents and triton else "sequential"


class ContextParallelError(ValueError):
    """Bad input to a context-parallel op; the message says what to change."""


def _op_name(op) -> str:
    name = op if isinstance(op, str) else getattr(op, "__name__", None)
    if name not in _OPS:
        raise ContextParallelError(
            f"context_parallel: unsupported op {op!r}; pass one of lctrain.kernels.delta_rule, "
            "gated_delta_rule, gated_linear_attn (or their names)")
    return name


def context_parallel(op, group, transition: str | None = None) -> "ContextParallelOp":
    """A callable with ``op``'s signature that runs on the local contiguous shard of each rank of
    ``group`` and returns the local outputs. ``group`` None or of size 1 means no CP (plain op).
    ``transition``: how the shard's (A, B) is computed, "sequential" (one chain over the shard's
    chunks), "grouped" (groups of chunks in parallel, then a fold; "grouped:G" for G groups),
    "grouped+grad" (the backward's state-gradient pass grouped too), "direct" (gated_linear_attn's
    closed form), "overlap" (Triton: inside the op's own passes), "pipeline" (Triton: "overlap" with
    the last rank waiting for S_in and rank 0 for dS_out instead), "sequential_all" (the reference:
    "sequential" with every rank computing every pass), "auto" (``auto_transition``: "pipeline" at
    CP = 2 on the Triton backend without packed documents, "sequential" otherwise); None:
    ``DEFAULT_TRANSITION`` ("auto").
    All give the same result up to float rounding.

    Create it once per layer (not per call) so that checkpoint replays can reuse gathered states."""
    return ContextParallelOp(op, group, transition)


def _parse_transition(transition) -> tuple[str, int | None]:
    """"sequential" | "grouped[+grad]" | "grouped[+grad]:G" -> (mode, groups or None)."""
    mode, _, groups = str(transition).partition(":")
    if mode not in TRANSITIONS or (groups and (not mode.startswith("grouped") or not groups.isdigit()
                                               or int(groups) < 1)):
        raise ContextParallelError(f"context_parallel: transition={transition!r}; choose 'auto', 'sequential', "
                                   "'grouped', "
                                   "'grouped+grad', either grouped one with ':G', G a positive number of chunk "
                                   "groups, 'direct' (gated_linear_attn only), 'overlap', 'pipeline' or "
                                   "'sequential_all' (the reference that skips no pass)")
    return mode, (int(groups) if groups else None)


class _ShardDocuments:
    """Where the global document boundaries fall in this rank's shard [lo, lo + T)."""

    def __init__(self, bounds: list[int], rank: int, T: int, device):
        lo = rank * T
        self.n_docs = len(bounds) - 1
        inside = [b - lo for b in bounds if lo < b < lo + T]
        self.local_bounds = [0] + inside + [T]
        self.n_pieces = len(self.local_bounds) - 1
        self.first_doc = bisect.bisect_right(bounds, lo) - 1     # the document holding token lo
        self.fresh = bounds[self.first_doc] == lo                # a document starts at the shard's first token
        self.cut = self.fresh or bool(inside)                    # no state passes through this shard
        self.local_cu = (None if self.n_pieces == 1 else
                         torch.tensor(self.local_bounds, dtype=torch.int32, device=device))
        self.fingerprint = (self.n_docs, sum((i + 1) * b for i, b in enumerate(bounds)) % (2 ** 61))

    def piece_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of ``x`` [N, ...] for the documents of this shard's pieces."""
        return x[self.first_doc:self.first_doc + self.n_pieces]

    def to_global(self, finals: torch.Tensor) -> torch.Tensor:
        """[n_pieces, H, K, V] -> [N, H, K, V] with zeros for documents not in this shard."""
        before = finals.new_zeros(self.first_doc, *finals.shape[1:])
        after = finals.new_zeros(self.n_docs - self.first_doc - self.n_pieces, *finals.shape[1:])
        return torch.cat([before, finals, after])


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

    def __init__(self, op, group, transition: str | None = None):
        self.name = _op_name(op)
        self.transition = DEFAULT_TRANSITION if transition is None else transition
        self._transition_mode = _parse_transition(self.transition)
        self.kind, self._extra = _OPS[self.name]
        if self._transition_mode[0] == "direct" and self.kind != "gla":
            raise ContextParallelError(
                f"context_parallel({self.name}): transition='direct' is the closed form of gated_linear_attn's "
                "scalar decay; a delta rule's shard map is a product of matrices: use 'sequential', "
                "'grouped[:G]', 'grouped+grad[:G]' or 'sequential_all'")
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
        return f"context_parallel({self.name}, cp={self.size}, rank={self.rank}, transition={self.transition})"

    def __call__(self, q, k, v, *args, scale=None, initial_state=None, output_final_state=False,
                 backend="auto", chunk_size=64, cu_seqlens=None):
        if len(args) != len(self._extra):
            raise TypeError(f"{self.name}(q, k, v, {', '.join(self._extra)}, *, ...) takes {3 + len(self._extra)} "
                            f"positional tensors, got {3 + len(args)}")
        local = _LOCAL_OPS[self.kind]
        if self.size == 1:
            return local(q, k, v, *args, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens,
                         output_final_state=output_final_state, backend=backend, chunk_size=chunk_size)
        named = dict(zip(self._extra, args))
        g, beta = named.get("g"), named.get("beta")
        docs, cu_problem = self._documents(cu_seqlens, k)
        overlap = self.resolved_transition(backend, k.device, docs is not None) in IN_OP_TRANSITIONS and docs is None
        if overlap and resolve_backend(backend, "shard_transition", k.device) != "triton":
            raise ContextParallelError(
                f"{self.name}: transition={self.transition!r} runs inside the Triton kernels, but "
                f"backend={backend!r} on {k.device.type} is not Triton; use backend='triton' (CUDA, or "
                "TRITON_INTERPRET=1 on CPU) or another transition")
        stash = self._replay_stash()
        if stash is None:
            signature = _signature(q, k, v, g, beta, chunk_size) + (
                None if docs is None else docs.fingerprint, cu_problem, initial_state is None)
            if signature != self._validated:
                self._check_inputs(q, k, v, g, beta, initial_state, chunk_size, docs, cu_problem)
                self._validated = signature
                self.shape_checks += 1
        if overlap:
            from lctrain.kernels.triton.cp_overlap import overlapped
            link = _OverlapLink(self, stash, torch.is_grad_enabled() and not _in_backward())
            o, s_out = overlapped(q, k, v, g, beta, scale=scale, link=link, chunk_size=chunk_size,
                                  initial_state=initial_state if self.rank == 0 else None)
            return o, (s_out if output_final_state else None)
        if stash is None:
            A_all, S_in = self._gather_and_fold(k, v, g, beta, initial_state, backend, chunk_size, docs)
            stash = _Stash(A_all, S_in)
            if torch.is_grad_enabled() and not _in_backward():
                self._remember(stash)
        if docs is None:
            # rank 0 feeds the caller's initial state itself (differentiable); other ranks the fold
            start = initial_state if self.rank == 0 else stash.S_in
            o, s_out = local(q, k, v, *args, scale=scale, initial_state=start, output_final_state=True,
                             backend=backend, chunk_size=chunk_size)
            finals = None
        else:
            o, finals = local(q, k, v, *args, scale=scale, initial_state=self._piece_starts(docs, initial_state, stash),
                              output_final_state=True, backend=backend, chunk_size=chunk_size,
                              cu_seqlens=docs.local_cu)
            s_out = finals
        if torch.is_grad_enabled() and (o.requires_grad or s_out.requires_grad):
            o, s_out = _StateGradExchange.apply(o, s_out, q, k, v, g, beta, self, stash, scale, backend, chunk_size,
                                                docs)
        if not output_final_state:
            return o, None
        return o, (s_out if docs is None else docs.to_global(s_out))

    def _remember(self, stash: _Stash) -> None:
        """Keep a weak reference to a forward's stash for a checkpoint replay of it."""
        self._stashes = [r for r in self._stashes if r() is not None] + [weakref.ref(stash)]

    def _documents(self, cu_seqlens, k) -> tuple[_ShardDocuments | None, str]:
        """This shard's view of the global boundaries, or the problem with them (raised on every rank
        by _check_inputs, so that no rank is left alone in a collective)."""
        if cu_seqlens is None:
            return None, ""
        if not (isinstance(k, torch.Tensor) and k.dim() == 4):
            return None, ""  # _check_inputs names the bad k
        B, T = k.shape[:2]
        try:
            bounds = check_cu_seqlens(cu_seqlens, B, self.size * T, k.device)
        except (TypeError, ValueError) as err:
            return None, (f"{self.name} under context parallelism: {err} (cu_seqlens is the GLOBAL boundary tensor "
                          f"of the whole sequence, T = {self.size} ranks x {T} tokens, the same on every rank)")
        return _ShardDocuments(bounds, self.rank, T, k.device), ""

    def _piece_starts(self, docs: _ShardDocuments, initial_state, stash: _Stash):
        """Initial state of every document piece of this shard: the fold for a first piece that
        continues the previous rank's document, the document's row of initial_state (or zeros) for
        pieces that start one."""
        if initial_state is None:
            if docs.fresh:
                return None
            zeros = stash.S_in.new_zeros(docs.n_pieces - 1, *stash.S_in.shape[1:])
            return torch.cat([stash.S_in, zeros])
        rows = docs.piece_rows(initial_state)
        if docs.fresh:
            return rows
        return torch.cat([stash.S_in.to(rows.dtype), rows[1:]])

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

    def _check_inputs(self, q, k, v, g, beta, initial_state, chunk_size, docs=None, cu_problem="") -> None:
        """Local checks, then one tiny all-gather so that every rank sees every rank's shapes and
        raises the same error (a rank failing alone would leave the others hanging in a collective).

        Runs on the first call and whenever this rank's shapes change, not on every call: the gather
        costs a host-device sync. Ranks whose shapes agree change them together, so they skip or
        check together; only shapes that change on some ranks alone can then reach the state
        all-gather unchecked (and fail there, or hang on NCCL until its timeout)."""
        problem = cu_problem
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
            if docs is not None and initial_state is not None and (
                    not isinstance(initial_state, torch.Tensor) or initial_state.dim() != 4
                    or initial_state.shape[0] != docs.n_docs):
                raise ContextParallelError(
                    f"{self.name} under context parallelism with cu_seqlens: initial_state must be [N, H, K, V] with "
                    f"N = {docs.n_docs} documents, the same tensor on every rank; got "
                    f"{getattr(initial_state, 'shape', type(initial_state).__name__)}")
        except ContextParallelError as err:
            problem = problem or str(err)
        B, T, H, K = (tuple(k.shape) + (0, 0, 0, 0))[:4] if isinstance(k, torch.Tensor) else (0, 0, 0, 0)
        V = v.shape[-1] if isinstance(v, torch.Tensor) else 0
        meta = torch.tensor([B, T, H, K, V, _KIND_IDS[self.kind],
                             int(chunk_size) if isinstance(chunk_size, int) else -1,
                             int(bool(problem)), -1 if docs is None else docs.fingerprint[0],
                             -1 if docs is None else docs.fingerprint[1],
                             -1 if docs is None else int(initial_state is not None)], dtype=torch.int64,
                            device=_comm_device(k if isinstance(k, torch.Tensor) else None, self.group))
        metas = _all_gather(meta, self.group).tolist()
        if problem:
            raise ContextParallelError(problem)
        bad = [r for r, m in enumerate(metas) if m[7]]
        if bad:
            raise ContextParallelError(f"{self.name}: CP rank(s) {bad} rejected their input (see their error); "
                                       "every rank must pass a valid shard")
        if any(m[8:] != metas[0][8:] for m in metas):
            raise ContextParallelError(f"{self.name}: CP ranks disagree on cu_seqlens or on passing initial_state with "
                                       f"it (rank: [N, fingerprint, has initial_state] = "
                                       f"{ {r: m[8:] for r, m in enumerate(metas)} }); pass the same GLOBAL cu_seqlens "
                                       "(and initial_state, or None) on every rank")
        if any(m != metas[0] for m in metas):
            rows = "; ".join(f"rank {r}: B,T,H,K,V={m[:5]} chunk={m[6]}" for r, m in enumerate(metas))
            raise ContextParallelError(f"{self.name}: CP ranks disagree on shapes ({rows}); every rank must pass "
                                       "an equal-length contiguous shard of the same batch")

    def _transition(self, k, v, g, beta, backend, chunk_size, cu=None):
        """This shard's (A, B) (with documents: of its last piece), by the chosen transition."""
        mode, groups = self._transition_mode
        if mode == "direct" and cu is None:
            return scalar_decay_shard_transition(k, v, g)
        if mode in ("grouped", "grouped+grad") and cu is None:
            return grouped_shard_transition(self.kind, k, v, g=g, beta=beta, backend=backend,
                                            chunk_size=chunk_size, groups=groups)
        return shard_transition(self.kind, k, v, g=g, beta=beta, backend=backend, chunk_size=chunk_size,
                                cu_seqlens=cu)

    def _state_grad(self, q, k, v, do, g, beta, scale, backend, chunk_size, cu=None):
        """This shard's G (with documents: of its first piece), by the chosen transition."""
        mode, groups = self._transition_mode
        if mode == "direct" and cu is None:
            return scalar_decay_shard_state_grad(q, do, g, scale)
        if mode == "grouped+grad" and cu is None:
            return grouped_shard_state_grad(self.kind, q, k, v, do, g=g, beta=beta, scale=scale, backend=backend,
                                            chunk_size=chunk_size, groups=groups)
        return shard_state_grad(self.kind, q, k, do, g=g, beta=beta, scale=scale, backend=backend,
                                chunk_size=chunk_size, cu_seqlens=cu)

    def resolved_transition(self, backend: str, device, documents: bool = False) -> str:
        """The transition a call with this backend on this device runs ("auto" resolved)."""
        mode = self._transition_mode[0]
        if mode != "auto":
            return self.transition
        return auto_transition(self.size, backend, torch.device(device), documents)

    def pass_keys(self) -> tuple[str, str]:
        """Names of how the forward's state pass and the backward's state-gradient pass run (no
        documents), e.g. ("grouped:auto", "sequential"): benchmarks time each distinct pass once."""
        mode, groups = self._transition_mode
        grouped = f"grouped:{groups or 'auto'}"
        if mode == "sequential_all":  # the same passes as "sequential", run on every rank
            return "sequential", "sequential"
        if mode == "auto":  # its separate passes, where it has any, are sequential's
            return "sequential", "sequential"
        if mode in ("sequential", "direct") + IN_OP_TRANSITIONS:  # in-op ones: no separate passes
            return mode, mode
        return (grouped, "sequential") if mode == "grouped" else (grouped, grouped)

    def _own_A(self, k, v, g, beta, backend, chunk_size, docs, dtype):
        """A_r of this rank, computed on demand: the last rank skips its transition in the forward
        (nobody folds its (A, B)) and needs A only for a gradient on its own final state."""
        if docs is not None and docs.cut:
            return torch.zeros(_A_shape(self.kind, k), dtype=dtype, device=k.device)
        A, _ = self._transition(k, v, g, beta, backend, chunk_size, None if docs is None else docs.local_cu)
        return A.to(dtype)

    def _skips(self) -> bool:
        """Whether passes whose results nobody reads are skipped: every transition but the reference
        "sequential_all"."""
        return self._transition_mode[0] != "sequential_all"

    def _forward_summary(self, k, v, g, beta, initial_state, backend, chunk_size, docs=None):
        """(A, B) that this rank sends in the forward's all-gather (fp32): its shard as the map
        S_out = A S_in + B that later ranks fold, computing only what they read. The last rank sends
        zeros (nobody folds it). Where the incoming state of the shard's last piece is known (rank 0:
        the caller's initial state or zero; with documents, a last piece that starts a document: its
        row of initial_state or zero) the outgoing state does not depend on S_in: it is sent as B with
        A = 0, computed by the A-free pass from that start (``shard_final_state``) except where the
        mode's pass must carry A anyway (grouped: the groups' A are needed by its own fold; direct:
        A is one exp per head): then A multiplies the start and is dropped."""
        dt = torch.promote_types(torch.float32, k.dtype)
        skip = self._skips()
        if skip and self.rank == self.size - 1:
            return (torch.zeros(_A_shape(self.kind, k), dtype=dt, device=k.device),
                    torch.zeros(k.shape[0], k.shape[2], k.shape[3], v.shape[3], dtype=dt, device=k.device))
        known = self.rank == 0 if docs is None else docs.cut
        start = None
        if known and initial_state is not None:
            start = (initial_state if docs is None else docs.piece_rows(initial_state)[-1:]).detach()
        mode = self._transition_mode[0]
        if skip and known and (docs is not None or mode in ("sequential", "auto") + IN_OP_TRANSITIONS):
            # the last piece alone (with documents it ends the shard after its last boundary)
            s = 0 if docs is None else docs.local_bounds[-2]
            cut = lambda x: None if x is None else x[:, s:]  # noqa: E731
            Bst = shard_final_state(self.kind, cut(k), cut(v), g=cut(g), beta=cut(beta), initial_state=start,
                                    backend=backend, chunk_size=chunk_size)
            return torch.zeros(_A_shape(self.kind, k), dtype=dt, device=k.device), Bst.to(dt)
        # with documents: the transition of the last piece (the only one when none starts inside)
        A, Bst = self._transition(k, v, g, beta, backend, chunk_size, None if docs is None else docs.local_cu)
        with _exact(Bst.device):
            A, Bst = A.to(dt), Bst.to(dt)
            if start is not None:  # the real outgoing state, A_r start + B_r
                Bst = apply_transition(A, start.to(dt)) + Bst
            if docs is not None and docs.cut:
                A = torch.zeros_like(A)  # the last piece starts a document: no state passes through
        return A, Bst

    def _gather_and_fold(self, k, v, g, beta, initial_state, backend, chunk_size, docs=None):
        A, Bst = self._forward_summary(k, v, g, beta, initial_state, backend, chunk_size, docs)
        return self._share_states(A, Bst)

    def _share_states(self, A, Bst):
        """(A_all, S_in): every rank's (A, B) (``_forward_summary``) all-gathered, and the fold of the
        ranks before this one from zero (rank 0's incoming state is inside its B)."""
        with _exact(Bst.device):
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

    def _fold_gradients(self, stash: _Stash, q, k, v, g, beta, do, u, scale, backend, chunk_size, docs=None):
        """dS_out(r) from this rank's output gradient do and final-state gradient u (or None).

        With documents, S_in(r) feeds only a first piece that continues a document: G comes from its
        outputs and, when it is not also the last piece, from the gradient u_first on its own final
        state (A_first^T u_first); u is then the gradient of the per-piece final states."""
        u_first = None
        if docs is not None and u is not None:
            if docs.n_pieces > 1 and not docs.fresh:
                u_first = u[:1]
            u = u[-1:]
        G = self._own_state_grad(q, k, v, do, g, beta, scale, backend, chunk_size, docs)
        if self.rank == 0 or (docs is not None and docs.fresh):
            u_first = None  # S_in feeds nothing here, nor through the first piece's final state
        if u_first is not None:
            e = docs.local_bounds[1]
            cut = lambda x: None if x is None else x[:, :e]  # noqa: E731
            A_first, _ = shard_transition(self.kind, k[:, :e], v[:, :e], g=cut(g), beta=cut(beta),
                                          backend=backend, chunk_size=chunk_size)
            with _exact(q.device):
                G = G.to(A_first.dtype) + apply_transition_transposed(A_first, u_first.to(A_first.dtype))
        A_all = stash.A_all
        with _exact(q.device):
            G = G.to(A_all.dtype)
            if u is not None and self.rank > 0:
                A_own = (self._own_A(k, v, g, beta, backend, chunk_size, docs, A_all.dtype)
                         if self.rank == self.size - 1 and self._skips() else A_all[self.rank])
                G = G + apply_transition_transposed(A_own, u.to(A_all.dtype))
        return self._share_grads(G, u, A_all)

    def _own_state_grad(self, q, k, v, do, g, beta, scale, backend, chunk_size, docs=None):
        """G of this rank as the backward's all-gather carries it (fp32): zeros where nobody reads it,
        on rank 0 (the fold from the right reads ranks > r only; "sequential_all" computes it anyway)
        and on a shard that starts with a document (its S_in feeds nothing: a zero there is the math,
        not a skip); elsewhere the pass of the shard's first piece. No rank needs A^T here: the fold
        uses the forward's gathered A, and the last rank computes its own only for a gradient on its
        returned final state (``_own_A``)."""
        dt = torch.promote_types(torch.float32, q.dtype)
        if (self.rank == 0 and self._skips()) or (docs is not None and docs.fresh):
            return q.new_zeros(q.shape[0], q.shape[2], q.shape[3], do.shape[3], dtype=dt)
        return self._state_grad(q, k, v, do, g, beta, scale, backend, chunk_size,
                                None if docs is None else docs.local_cu).to(dt)

    def _share_grads(self, G, u, A_all):
        """dS_out(r): every rank's G' (this rank's ``G``, = G + A^T u) all-gathered and folded from
        the right over the ranks after this one, plus this rank's own final-state gradient u."""
        with _exact(G.device):
            G_all = _all_gather(G.reshape(-1), self.group).reshape(self.size, *G.shape)
            # dS_in(P-1) = G'_{P-1}: the last rank's A (never gathered) is not needed
            D = G_all[-1].clone() if self.rank < self.size - 1 else torch.zeros_like(G)
            for j in range(self.size - 2, self.rank, -1):
                D = apply_transition_transposed(A_all[j], D) + G_all[j]
            if u is not None:
                D = D + u.to(D.dtype)
        return D


class _OverlapLink:
    """The two exchanges of one call of the overlapped Triton op (transition="overlap" or "pipeline",
    kernels/triton/cp_overlap.py), called from inside its forward and backward passes."""

    def __init__(self, cp_op: ContextParallelOp, stash: _Stash | None, remember: bool):
        self.cp_op, self.stash, self.remember = cp_op, stash, remember
        pipelined = cp_op._transition_mode[0] in ("pipeline", "auto")  # "auto" reaches here as pipeline only
        # "pipeline": the last rank waits for S_in, rank 0 for dS_out, before their plain passes
        self.start_first = pipelined and cp_op.rank == cp_op.size - 1
        self.end_first = pipelined and cp_op.rank == 0

    def _scalar(self, A):
        """The op's A or A^T [B, H, K, K] as CP keeps it: gla's is a multiple of I, kept as [B, H]."""
        return A[..., 0, 0] if self.cp_op.kind == "gla" else A

    @property
    def start_known(self) -> bool:
        """Rank 0 starts from its own initial state (or zero): it runs the plain state pass from it,
        without the transition's programs, and ``start(None, final_state)`` only sends."""
        return self.cp_op.rank == 0

    def end_known(self, u) -> bool:
        """The last rank without a gradient on its returned final state has dS_out = 0: it runs the
        plain reverse pass, whose gradient of its incoming state is G, and ``end(G, None, None)``
        only sends."""
        return self.cp_op.rank == self.cp_op.size - 1 and u is None

    def start(self, A, Bst):
        """S_in of this rank (None on rank 0: its start is its own) from this shard's summary: A and B
        from zero of the prefix pass, or on rank 0 (A None) its outgoing state; a checkpoint replay
        reuses its forward's gather."""
        op = self.cp_op
        if self.stash is None:
            dt = torch.promote_types(torch.float32, Bst.dtype)
            with _exact(Bst.device):
                Bst = Bst.to(dt)
                A = (torch.zeros(_A_shape_of(op.kind, *Bst.shape[:3]), dtype=dt, device=Bst.device) if A is None
                     else self._scalar(A).to(dt))
                if op.rank == op.size - 1:  # nobody folds the last rank's map: zeros are sent
                    A, Bst = torch.zeros_like(A), torch.zeros_like(Bst)
            A_all, S_in = op._share_states(A, Bst)
            self.stash = _Stash(A_all, S_in)
            if self.remember:
                op._remember(self.stash)
        return None if op.rank == 0 else self.stash.S_in

    def end(self, G, At, u):
        """dS_out of this rank from its shard's own G, A^T and final-state gradient u (None: zero)."""
        op = self.cp_op
        self.stash.backward_done = True
        dt = self.stash.A_all.dtype
        with _exact(G.device):
            G = G.to(dt)
            if op.rank == 0:  # folded by nobody: zeros are sent
                G = torch.zeros_like(G)
            elif u is not None:
                G = G + apply_transition(self._scalar(At).to(dt), u.to(dt))
        D = op._share_grads(G, u, self.stash.A_all)
        # the last rank's outgoing state feeds nobody: without a gradient of its own it needs no fix-up
        return None if op.rank == op.size - 1 and u is None else D


def _A_shape(kind: str, k: torch.Tensor) -> tuple[int, ...]:
    """[B, H, K, K] for the delta rules, [B, H] (a scalar decay) for gated linear attention; k [B, T, H, K]."""
    B, _, H, K = k.shape
    return _A_shape_of(kind, B, H, K)


def _A_shape_of(kind: str, B: int, H: int, K: int) -> tuple[int, ...]:
    return (B, H) if kind == "gla" else (B, H, K, K)


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
    docstring and hands the local op's backward the gradient of its final state, dS_out(r).
    With documents ``s_out`` holds the final state of every document piece of the shard (the last
    is S_out(r)); only the last one's gradient changes."""

    @staticmethod
    def forward(ctx, o, s_out, q, k, v, g, beta, cp_op, stash, scale, backend, chunk_size, docs):
        ctx.save_for_backward(q, k, v, g, beta)
        ctx.cp_op, ctx.stash, ctx.docs = cp_op, stash, docs
        ctx.scale, ctx.backend, ctx.chunk_size = scale, backend, chunk_size
        ctx.o_shape, ctx.s_dtype = o.shape, s_out.dtype
        ctx.set_materialize_grads(False)  # an unused final state costs nothing in the backward
        return o.view_as(o), s_out.view_as(s_out)

    @staticmethod
    def backward(ctx, do, ds_user):
        q, k, v, g, beta = ctx.saved_tensors
        cp_op, stash = ctx.cp_op, ctx.stash
        stash.backward_done = True
        if do is None:  # every rank must still take part in the gather
            do = torch.zeros(ctx.o_shape, dtype=q.dtype, device=q.device)
        ds_out = cp_op._fold_gradients(stash, q, k, v, g, beta, do.to(q.dtype), ds_user, ctx.scale, ctx.backend,
                                       ctx.chunk_size, ctx.docs).to(ctx.s_dtype)
        if ctx.docs is not None and ctx.docs.n_pieces > 1:
            earlier = (torch.zeros((ctx.docs.n_pieces - 1,) + tuple(ds_out.shape[1:]), dtype=ds_out.dtype,
                                   device=ds_out.device) if ds_user is None else ds_user[:-1])
            ds_out = torch.cat([earlier, ds_out])
        return (do, ds_out, None, None, None, None, None, None, None, None, None, None, None)
