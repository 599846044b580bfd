"""Halo exchange: each CP rank gets the previous rank's last ``halo`` positions prepended
(docs/design.md §4).

Used by the short causal conv of the linear mixers (halo = conv_size - 1) and by sliding-window
attention (halo = window - 1 keys/values). Point to point: rank r sends its tail to r + 1 and receives
r - 1's tail; CP rank 0 gets zeros. The backward sends the halo's gradient back to the rank it came
from, which adds it to the gradient of its tail. Every rank of the group must call it (the calls pair
up rank by rank, so ranks may run different layers' exchanges only in the same order).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def prepend_halo(x: torch.Tensor, halo: int, group=None, dim: int = 1) -> torch.Tensor:
    """``x`` with the previous CP rank's last ``halo`` positions along ``dim`` prepended.

    Zeros stand in on CP rank 0 and when ``group`` is None or of size 1, so the result always has
    ``x.shape[dim] + halo`` positions. Differentiable in ``x`` (the halo's gradient reaches the
    previous rank). ``halo`` may not exceed the local length (a halo spanning several ranks is not
    supported: lower the window / conv size or the CP degree)."""
    if isinstance(halo, bool) or not isinstance(halo, int) or halo < 0:
        raise ValueError(f"prepend_halo: halo must be an int >= 0, got {halo!r}")
    dim = dim % x.dim()
    if halo == 0:
        return x
    if halo > x.shape[dim]:
        raise ValueError(f"prepend_halo: halo of {halo} positions exceeds the local shard of {x.shape[dim]} along dim "
                         f"{dim}; each rank's shard must be at least window-1 (attention) / conv_size-1 (conv) long: "
                         "use a longer data.seq_len, a smaller parallel.cp, or a smaller model.window / "
                         "model.conv_size")
    if group is None or dist.get_world_size(group) == 1:
        shape = list(x.shape)
        shape[dim] = halo
        return torch.cat([x.new_zeros(shape), x], dim=dim)
    return _PrependHalo.apply(x, halo, group, dim)


def _neighbours(group) -> tuple[int | None, int | None]:
    """Global ranks of the previous and next CP rank (None at the ends)."""
    r, P = dist.get_rank(group), dist.get_world_size(group)
    prev = dist.get_global_rank(group, r - 1) if r > 0 else None
    nxt = dist.get_global_rank(group, r + 1) if r < P - 1 else None
    return prev, nxt


def _comm_device(x: torch.Tensor, group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return x.device
    return torch.device("cpu")


def _shift(send: torch.Tensor | None, recv_like: torch.Tensor, src: int | None, dst: int | None,
           group) -> torch.Tensor | None:
    """Send ``send`` to ``dst`` and receive a tensor shaped like ``recv_like`` from ``src`` (either may be None)."""
    device = _comm_device(recv_like, group)
    recv = torch.empty(recv_like.shape, dtype=recv_like.dtype, device=device) if src is not None else None
    ops = []
    if recv is not None:
        ops.append(dist.P2POp(dist.irecv, recv, src, group))
    if dst is not None:
        ops.append(dist.P2POp(dist.isend, send.contiguous().to(device), dst, group))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    return None if recv is None else recv.to(recv_like.device)


class _PrependHalo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, halo, group, dim):
        prev, nxt = _neighbours(group)
        ctx.halo, ctx.group, ctx.dim, ctx.length = halo, group, dim, x.shape[dim]
        tail = x.narrow(dim, x.shape[dim] - halo, halo)
        like = torch.empty_like(tail, memory_format=torch.contiguous_format)
        got = _shift(tail, like, prev, nxt, group)
        head = torch.zeros_like(like) if got is None else got
        return torch.cat([head, x], dim=dim)

    @staticmethod
    def backward(ctx, grad):
        prev, nxt = _neighbours(ctx.group)
        halo, dim = ctx.halo, ctx.dim
        g_halo = grad.narrow(dim, 0, halo)
        g_x = grad.narrow(dim, halo, ctx.length).clone()
        like = torch.empty_like(g_halo, memory_format=torch.contiguous_format)
        # the halo came from prev: its gradient goes back there; ours comes from nxt
        got = _shift(g_halo, like, nxt, prev, ctx.group)
        if got is not None:
            g_x.narrow(dim, ctx.length - halo, halo).add_(got)
        return g_x, None, None, None


def gather_sequence(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """Every CP rank's ``x`` concatenated along ``dim`` in rank order (the full sequence), on every
    rank; not differentiable (used for token bookkeeping such as document ids)."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    comm = x.contiguous().to(_comm_device(x, group))
    parts = [torch.empty_like(comm) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, comm, group=group)
    return torch.cat(parts, dim=dim).to(x.device)
