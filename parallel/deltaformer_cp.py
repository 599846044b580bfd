"""Deltaformer under context parallelism (CP rank r holds the contiguous tokens [r L, (r+1) L)).

The u-pass of a token reads the keys and u of EVERY earlier token, and u depends on all earlier u:
the sequential dependency runs through the ranks. Two schedules (docs/deltaformer.md):

``"pipeline"`` (the default): every rank gathers the keys (they depend on
nothing), then waits for the earlier ranks' u, which they stream piece by piece (``piece_size``
tokens) as soon as each piece is solved. Each arriving piece is folded into an online softmax over
the rank's rows at once, so when the previous rank sends its last piece only that piece and the
rank's own local chunk pass are left: the critical path is about P local passes (L^2 / 2 each)
instead of the whole sequence's (P L)^2 / 2. The backward runs the same pipeline in reverse: the
last rank solves its adjoint first and streams (k, lse, beta d, beta d . w) of its finished rows to
the earlier ranks, which pull those rows' share onto their own keys (rhs of their adjoint solve and
dk) as the pieces arrive. The work is not balanced (the last rank reads every key in the forward,
the first rank every row in the backward), but no rank repeats another's u-pass. With documents
only a rank's first document reaches back (``_Plan``: which pieces go where).

``"gather"`` (``backend="naive"``, or asked for): every rank gathers k, v and beta and solves the
u-pass over its whole prefix itself (the last rank repeats the single-process u-pass).

Both read out each rank's queries against its prefix of keys and u (no Ulysses step).
``PHASES`` collects the pipeline's per-phase wall times for ``lctrain bench deltaformer-cp``.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch
import torch.distributed as dist
from lctrain.kernels.deltaformer import chunk
from lctrain.kernels.deltaformer.api import chunk_stages, deltaformer_by_documents, deltaformer_u_by_documents, resolve
from lctrain.kernels.deltaformer.readout import prefix_readout
from lctrain.kernels.naive import compute_dtype

from .halo import _comm_device, gather_sequence

SCHEDULES = ("auto", "pipeline", "gather")


class PhaseTimes:
    """Wall time (ms) per phase of the pipelined schedule, summed over calls while ``enabled``.
    Each phase edge synchronises the CUDA device, so it is for benchmarks only (off by default)."""

    def __init__(self):
        self.enabled = False
        self.ms: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str, device: torch.device):
        if not self.enabled:
            yield
            return
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.ms[name] = self.ms.get(name, 0.0) + 1e3 * (time.perf_counter() - t0)


PHASES = PhaseTimes()
PHASE_ORDER = ("fwd: all-gather k", "fwd: wait for earlier u", "fwd: fold earlier u", "fwd: local chunk pass",
               "fwd: drain sends", "fwd: read-out", "bwd: sum prefix grads to owners", "bwd: wait for later rows",
               "bwd: pull later rows", "bwd: local chunk pass", "bwd: own rows vs earlier keys", "bwd: drain sends")


def _sum_to_owners(full: torch.Tensor, group) -> torch.Tensor:
    """full [B, P T, ...] on the comm device: the sum over ranks of every rank's ``full``, this
    rank's slice [B, T, ...] (reduce-scatter on NCCL, all-reduce + slice on gloo)."""
    P, r = dist.get_world_size(group), dist.get_rank(group)
    T = full.shape[1] // P
    if dist.get_backend(group) == "nccl":
        chunks = full.unflatten(1, (P, T)).movedim(1, 0).contiguous()
        out = torch.empty_like(chunks[0])
        dist.reduce_scatter_tensor(out, chunks, group=group)
        return out
    dist.all_reduce(full, group=group)
    return full[:, r * T:(r + 1) * T]


class _GatherSequence(torch.autograd.Function):
    """All ranks' x concatenated along dim 1; backward: the sum over ranks of the gradient of the
    gathered tensor, this rank's slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        comm = x.contiguous().to(_comm_device(x, group))
        parts = [torch.empty_like(comm) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, comm, group=group)
        return torch.cat(parts, dim=1).to(x.device)

    @staticmethod
    def backward(ctx, grad):
        comm = grad.contiguous().to(_comm_device(grad, ctx.group))
        return _sum_to_owners(comm, ctx.group).to(grad.device), None


def _pieces(L: int, piece: int) -> list[tuple[int, int]]:
    return [(a, min(a + piece, L)) for a in range(0, L, piece)]


class _Stream:
    """Sends finished pieces of a rank's per-token data to other ranks (non-blocking), in the order
    the pieces become final; ``finish`` waits for the sends."""

    def __init__(self, group, device):
        self.group, self.device = group, device
        self.works, self.bufs = [], []

    def send_to(self, x: torch.Tensor, dsts):
        """Send x to the group ranks dsts (non-blocking)."""
        buf = x.contiguous().to(self.device)
        self.bufs.append(buf)
        self.works += [dist.isend(buf, dist.get_global_rank(self.group, d), group=self.group) for d in dsts]

    def finish(self):
        for w in self.works:
            w.wait()
        self.works, self.bufs = [], []


def _recv(shape, dtype, src: int, group, comm_device, device) -> torch.Tensor:
    buf = torch.empty(shape, dtype=dtype, device=comm_device)
    dist.recv(buf, dist.get_global_rank(group, src), group=group)
    return buf.to(device)


class _PrefixSoftmax:
    """Online softmax of a rank's rows over the earlier ranks' keys, folded in piece by piece (every
    key earlier than every row): running max m, sum l and acc = sum_j exp(S - m) u_j."""

    def __init__(self, k, scale: float, partials):
        self.k, self.scale, self.partials = k, scale, partials
        self.state = None

    def add(self, keys, u):
        new = self.partials(self.k, keys, u, self.scale)
        if self.state is not None:
            new = chunk.merge_partials(*(torch.stack([a, b], dim=2) for a, b in zip(self.state, new)))
        self.state = new

    def result(self):
        """(lse over the keys seen, acc / l = the softmax-weighted u over them)."""
        m, l, acc = self.state
        return m + torch.log(l), acc / l[..., None]


def _with_prefix(stats, lse_pre, wn_pre):
    """A chunk-statistics function (chunk.StatsFn) whose rows also attend to earlier keys, given as
    their log-sum-exp lse_pre [B, H, L] and softmax-weighted u wn_pre [B, H, L, V]: the two softmax
    parts are merged by their normalisers (the local statistics are normalised over local keys)."""

    def combined(k, u, s, e, scale):
        w_loc, p_cc, lse_loc = stats(k, u, s, e, scale)
        if s == 0:  # the first local row has no local key (its local lse is a placeholder 0)
            lse_loc = lse_loc.clone()
            lse_loc[..., 0] = float("-inf")
        lp = lse_pre[..., s:e]
        lse = torch.logaddexp(lp, lse_loc)
        a_pre, a_loc = torch.exp(lp - lse), torch.exp(lse_loc - lse)
        return a_pre[..., None] * wn_pre[:, :, s:e] + a_loc[..., None] * w_loc, a_loc[..., None] * p_cc, lse

    return combined


class _Plan:
    """Who attends to whom across ranks, for one group of batch rows (all rows without documents,
    one row with them). For every rank q: ``start[q]``, the global position where the document of
    q's first token starts (q L when it starts on q; 0 without documents), and ``first[q]``, how many
    of q's tokens belong to that document (L without documents). ``segs``: this rank's documents as
    local [a, b) ranges. Only the first document of a rank reaches back into earlier ranks."""

    def __init__(self, rows, P: int, r: int, L: int, docs=None):
        self.rows, self.L, self.r = rows, L, r
        if docs is None:
            self.start, self.first, self.segs = [0] * P, [L] * P, [(0, L)]
            return
        d = docs.tolist()                                        # one row's global document ids [P L]
        self.start, self.first = [], []
        for q in range(P):
            t0 = q * L
            lo = t0
            while lo > 0 and d[lo - 1] == d[t0]:
                lo -= 1
            hi = t0
            while hi < (q + 1) * L and d[hi] == d[t0]:
                hi += 1
            self.start.append(lo)
            self.first.append(hi - t0)
        loc = d[r * L:(r + 1) * L]
        cuts = [0] + [i for i in range(1, L) if loc[i] != loc[i - 1]] + [L]
        self.segs = list(zip(cuts, cuts[1:]))

    def prefix_rows(self) -> int:
        """How many of this rank's first rows attend to earlier ranks' keys (0 if none)."""
        return self.first[self.r] if self.start[self.r] < self.r * self.L else 0

    def fwd_needs(self, src: int, dst: int, piece) -> bool:
        """Does rank dst's first document reach into rank src's piece (src < dst)?"""
        return src < dst and src * self.L + piece[1] > self.start[dst]

    def bwd_needs(self, src: int, dst: int, piece) -> bool:
        """Do rows of rank src's piece attend to keys of rank dst (dst < src)?"""
        return dst < src and piece[0] < self.first[src] and self.start[src] < (dst + 1) * self.L


class _PipelinedUPass(torch.autograd.Function):
    """This rank's shard k, v, beta [B, L, H, *] -> (k, u) of the prefix [0, (r+1) L), token-major in
    the compute dtype: the earlier ranks' keys and u (received; zeros where no document of this rank
    reaches) and this rank's (solved here). The gradients of the returned prefix are summed back
    onto their owners in the backward. ``docs_all`` [B, P L]: global document ids, or None."""

    @staticmethod
    def forward(ctx, k, v, beta, docs_all, group, scale, chunk_size, which, piece, dtype):
        P, r = dist.get_world_size(group), dist.get_rank(group)
        dev = k.device
        comm = _comm_device(k, group)
        stages = chunk_stages(which)
        kh = k.transpose(1, 2).to(dtype).contiguous()
        vh = v.transpose(1, 2).to(dtype).contiguous()
        bh = beta.transpose(1, 2).to(dtype).contiguous()
        B, H, L, K = kh.shape
        V = vh.shape[-1]
        pieces = _pieces(L, piece)
        plans = ([_Plan(slice(None), P, r, L)] if docs_all is None else
                 [_Plan(slice(b, b + 1), P, r, L, docs_all[b]) for b in range(B)])
        tf32 = k.is_cuda and k.dtype in (torch.bfloat16, torch.float16)
        u, lse, w = torch.empty_like(vh), kh.new_empty(B, H, L), torch.empty_like(vh)
        u_pre = vh.new_zeros(B, H, r * L, V)
        with chunk._Tf32Matmuls(tf32):
            with PHASES("fwd: all-gather k", dev):
                parts = [torch.empty_like(kh, device=comm) for _ in range(P)]
                dist.all_gather(parts, kh.to(comm), group=group)
                k_pre = torch.cat(parts[:r], dim=2).to(dev) if r else kh[:, :, :0]
            for plan in plans:
                _PipelinedUPass._forward_group(plan, kh[plan.rows], vh[plan.rows], bh[plan.rows], k_pre[plan.rows],
                                               u[plan.rows], lse[plan.rows], w[plan.rows], u_pre[plan.rows],
                                               group, comm, pieces, stages, scale, chunk_size)
        ctx.save_for_backward(kh, bh, u, lse, w, k_pre, u_pre)
        ctx.group, ctx.scale, ctx.chunk_size, ctx.stages, ctx.tf32 = group, scale, chunk_size, stages, tf32
        ctx.pieces, ctx.piece, ctx.plans = pieces, piece, plans
        ctx.in_dtypes = (k.dtype, v.dtype, beta.dtype)
        return (torch.cat([k_pre, kh], dim=2).transpose(1, 2), torch.cat([u_pre, u], dim=2).transpose(1, 2))

    @staticmethod
    def _forward_group(plan, kh, vh, bh, k_pre, u, lse, w, u_pre, group, comm, pieces, stages, scale, chunk_size):
        """The u-pass of one group of rows, writing u, lse, w (this rank) and u_pre (received) in place."""
        P, r = dist.get_world_size(group), dist.get_rank(group)
        dev, L = kh.device, kh.shape[2]
        Bg, H, _, V = vh.shape
        n0 = plan.prefix_rows()
        prefix = None
        if n0:
            pre = _PrefixSoftmax(kh[:, :, :n0].contiguous(), scale, stages.block_partials)
            for src in range(r):
                for a, b in pieces:
                    if not plan.fwd_needs(src, r, (a, b)):
                        continue
                    with PHASES("fwd: wait for earlier u", dev):
                        got = _recv((Bg, H, b - a, V), vh.dtype, src, group, comm, dev)
                    with PHASES("fwd: fold earlier u", dev):
                        u_pre[:, :, src * L + a:src * L + b] = got
                        lo = max(src * L + a, plan.start[r])            # keys of this rank's first document
                        pre.add(k_pre[:, :, lo:src * L + b], u_pre[:, :, lo:src * L + b])
            prefix = pre.result()
            del pre
        out = _Stream(group, comm)
        todo = [(p, [q for q in range(r + 1, P) if plan.fwd_needs(r, q, p)]) for p in pieces]
        todo = [t for t in todo if t[1]]
        for a, b in plan.segs:
            stats = stages.stats if not (a == 0 and prefix is not None) else _with_prefix(stages.stats, *prefix)
            done = [0]

            def send_finished(e, u_seg, a=a, done=done):
                u[:, :, a + done[0]:a + e] = u_seg[:, :, done[0]:e]
                done[0] = e
                while todo and todo[0][0][1] <= a + e:
                    (pa, pb), dsts = todo.pop(0)
                    out.send_to(u[:, :, pa:pb], dsts)

            with PHASES("fwd: local chunk pass", dev):
                _, lse_s, w_s = chunk.chunk_forward(kh[:, :, a:b].contiguous(), vh[:, :, a:b].contiguous(),
                                                    bh[:, :, a:b].contiguous(), scale, chunk_size, stats,
                                                    on_chunk=send_finished, solve=stages.solve)
                lse[:, :, a:b], w[:, :, a:b] = lse_s, w_s
        with PHASES("fwd: drain sends", dev):
            out.finish()

    @staticmethod
    def backward(ctx, gk_prefix, gu_prefix):
        kh, bh, u, lse, w, k_pre, u_pre = ctx.saved_tensors
        group = ctx.group
        P, r = dist.get_world_size(group), dist.get_rank(group)
        dev, comm = kh.device, _comm_device(kh, group)
        B, H, L, K = kh.shape
        V = u.shape[-1]
        dt = kh.dtype
        with chunk._Tf32Matmuls(ctx.tf32):
            with PHASES("bwd: sum prefix grads to owners", dev):
                g = torch.zeros(B, P * L, H, K + V, dtype=dt, device=comm)
                if gk_prefix is not None:
                    g[:, :(r + 1) * L, :, :K] = gk_prefix.to(comm, dt)
                if gu_prefix is not None:
                    g[:, :(r + 1) * L, :, K:] = gu_prefix.to(comm, dt)
                own = _sum_to_owners(g, group).to(dev)
                gk_own = own[..., :K]
                rhs = own[..., K:].transpose(1, 2).contiguous()
            dk, dv, dbeta = torch.zeros_like(kh), torch.empty_like(u), torch.empty_like(lse)
            for plan in ctx.plans:
                sel = plan.rows
                _PipelinedUPass._backward_group(ctx, plan, kh[sel], bh[sel], u[sel], lse[sel], w[sel], k_pre[sel],
                                                u_pre[sel], rhs[sel], dk[sel], dv[sel], dbeta[sel], comm)
        kd, vd, bd_ = ctx.in_dtypes
        return ((dk.transpose(1, 2) + gk_own).to(kd), dv.transpose(1, 2).to(vd), dbeta.transpose(1, 2).to(bd_),
                None, None, None, None, None, None, None)

    @staticmethod
    def _backward_group(ctx, plan, kh, bh, u, lse, w, k_pre, u_pre, rhs, dk, dv, dbeta, comm):
        """The adjoint pass of one group of rows; rhs (gu) is consumed, dk / dv / dbeta written in place."""
        group, scale, pieces, stages = ctx.group, ctx.scale, ctx.pieces, ctx.stages
        P, r = dist.get_world_size(group), dist.get_rank(group)
        dev = kh.device
        Bg, H, L, K = kh.shape
        V = u.shape[-1]
        # the later ranks' rows, in the order they become final: their share onto this rank's keys
        for src in reversed(range(r + 1, P)):
            kstart = max(plan.start[src] - r * L, 0)       # this rank's keys in src's first document
            for a, b in reversed(pieces):
                if not plan.bwd_needs(src, r, (a, b)):
                    continue
                with PHASES("bwd: wait for later rows", dev):
                    msg = _recv((Bg, H, b - a, K + V + 2), kh.dtype, src, group, comm, dev)
                with PHASES("bwd: pull later rows", dev):
                    kt, bd, lse_t, bdw = msg[:, :, :min(b, plan.first[src]) - a].split([K, V, 1, 1], dim=-1)
                    stages.pull(kt, lse_t[..., 0], bd, bdw[..., 0], kh[:, :, kstart:], u[:, :, kstart:],
                                rhs[:, :, kstart:], dk[:, :, kstart:], scale)
        out = _Stream(group, comm)
        todo = [(p, [q for q in range(r) if plan.bwd_needs(r, q, p)]) for p in reversed(pieces)]
        todo = [t for t in todo if t[1]]
        bd_all, bdw_all = torch.empty_like(u), torch.empty_like(lse)
        for a, b in reversed(plan.segs):
            done = [b - a]

            def send_finished(s, bd, a=a, done=done):
                bd_all[:, :, a + s:a + done[0]] = bd[:, :, s:done[0]]
                done[0] = s
                while todo and todo[0][0][0] >= a + s:
                    (pa, pb), dsts = todo.pop(0)
                    bdw = (bd_all[:, :, pa:pb] * w[:, :, pa:pb]).sum(-1, keepdim=True)
                    out.send_to(torch.cat([kh[:, :, pa:pb], bd_all[:, :, pa:pb], lse[:, :, pa:pb, None], bdw], dim=-1),
                                dsts)

            with PHASES("bwd: local chunk pass", dev):
                dk_s, dv_s, dbeta_s, _, bdw_s = chunk.chunk_backward(
                    *(x[:, :, a:b].contiguous() for x in (kh, bh, u, lse, w)), None, scale, ctx.chunk_size, stages,
                    rhs=rhs[:, :, a:b].contiguous(), on_chunk=send_finished)
                dk[:, :, a:b] += dk_s
                dv[:, :, a:b], dbeta[:, :, a:b], bdw_all[:, :, a:b] = dv_s, dbeta_s, bdw_s
        n0 = plan.prefix_rows()
        if n0:
            with PHASES("bwd: own rows vs earlier keys", dev):
                for a, b in _pieces(r * L - plan.start[r], ctx.piece):
                    a, b = a + plan.start[r], b + plan.start[r]
                    stages.rows_vs_keys(kh[:, :, :n0], lse[:, :, :n0], bd_all[:, :, :n0], bdw_all[:, :, :n0],
                                        k_pre[:, :, a:b], u_pre[:, :, a:b], dk[:, :, :n0], scale)
        with PHASES("bwd: drain sends", dev):
            out.finish()


def _check_schedule(schedule, which, piece_size):
    if schedule not in SCHEDULES:
        raise ValueError(f"deltaformer_cp: unknown schedule {schedule!r}; choose one of {list(SCHEDULES)}")
    if piece_size is not None and (isinstance(piece_size, bool) or not isinstance(piece_size, int)
                                   or piece_size < 1):
        raise ValueError(f"deltaformer_cp: piece_size must be a positive int or None, got {piece_size!r}")
    if schedule == "auto":
        return "gather" if which == "naive" else "pipeline"
    if schedule == "pipeline" and which == "naive":
        raise ValueError("deltaformer_cp: schedule='pipeline' solves in chunks; backend='naive' needs "
                         "schedule='gather' (or 'auto')")
    if schedule == "gather" and piece_size is not None:
        raise ValueError("deltaformer_cp: piece_size is the pipeline's streaming unit; schedule='gather' takes none")
    return schedule


def deltaformer_cp(q, k, v, beta, group, *, doc_ids=None, scale=None, backend="auto", chunk_size=64,
                   schedule="auto", piece_size=None):
    """Deltaformer output [B, T_local, H, V] (q.dtype) of this rank's shard; q, k, v, beta are the
    local shards ([B, T_local, H, *], beta [B, T_local, H]); doc_ids [B, T_local] are GLOBAL document
    indices (or None). Every rank of ``group`` must call it. Differentiable in q, k, v, beta.
    ``schedule`` (module doc): "auto" = "pipeline" unless backend is "naive";
    ``piece_size`` (pipeline only): tokens per streamed piece, default 4 chunks."""
    which = resolve(backend, q.device)
    schedule = _check_schedule(schedule, which, piece_size)
    if group is None or dist.get_world_size(group) == 1:
        return deltaformer_by_documents(q, k, v, beta, doc_ids, scale=scale, backend=backend, chunk_size=chunk_size)
    B, Tl, H, K = k.shape
    scale = K ** -0.5 if scale is None else float(scale)
    dt = compute_dtype(k, v, beta)
    r = dist.get_rank(group)
    if schedule == "pipeline":
        if which == "triton" and dt != torch.float32:
            raise TypeError("deltaformer_cp: the Triton u-pass computes in float32; float64 inputs need "
                            "backend='torch'")
        piece = piece_size or 4 * chunk_size
        docs_all = None if doc_ids is None else gather_sequence(doc_ids, group, dim=1)
        k_pre, u_pre = _PipelinedUPass.apply(k, v, beta, docs_all, group, scale, chunk_size, which, piece, dt)
        with PHASES("fwd: read-out", q.device):
            return prefix_readout(q, k_pre.to(q.dtype), u_pre, scale, doc_ids,
                                  None if docs_all is None else docs_all[:, :(r + 1) * Tl])
    V = v.shape[-1]
    packed = torch.cat([k.to(dt), v.to(dt), beta.to(dt)[..., None]], dim=-1)
    prefix = _GatherSequence.apply(packed, group)[:, : (r + 1) * Tl]
    k_pre, v_pre, b_pre = prefix.split([K, V, 1], dim=-1)
    docs_pre = None
    if doc_ids is not None:
        docs_pre = gather_sequence(doc_ids, group, dim=1)[:, : (r + 1) * Tl]
    u_pre = deltaformer_u_by_documents(k_pre, v_pre, b_pre[..., 0], docs_pre, scale=scale, backend=backend,
                                       chunk_size=chunk_size)
    return prefix_readout(q, k_pre.to(q.dtype), u_pre, scale, doc_ids, docs_pre)
