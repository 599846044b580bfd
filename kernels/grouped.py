"""A shard's transition by a two-level scan: groups of consecutive chunks in parallel, then a fold.

``shard_transition`` walks the shard's T/C chunks one after another (one sequential chain per head
and column block). The affine map of a shard is the ordered product of the maps of any split of it
into consecutive pieces, so the shard is cut into G groups of whole chunks which run as G
independent sequences (the batch becomes B·G: a view, no copy, since groups are contiguous in
time), each through the ordinary ``shard_transition`` of whatever backend; their (A_g, B_g) are
then composed in fp32 by a log-depth tree of batched products:

    (A, B) of [earlier, later] = (A_later A_earlier, A_later B_earlier + B_later)

The chain is G times shorter and G times wider; the extra work is the tree (log2 G levels of one
K×K·K×K and one K×K·K×V product per pair). Exact up to float rounding: the same per-chunk maps,
multiplied in another order.
"""
from __future__ import annotations

import torch

from .api import apply_transition, apply_transition_transposed, shard_state_grad, shard_transition

# programs per head of the Triton state pass at D = 128 (V and A column blocks of 16) times heads
# and groups: aim at a few waves of a 132-SM GPU, and keep each group at least MIN_CHUNKS long
TARGET_CHAINS = 2048
MIN_CHUNKS = 16


def auto_groups(n_chunks: int, chains: int) -> int:
    """The largest power of two G dividing ``n_chunks`` with n_chunks / G >= MIN_CHUNKS and
    chains * G <= TARGET_CHAINS (``chains``: independent sequences before grouping, B·H·16)."""
    G = 1
    while (n_chunks % (2 * G) == 0 and n_chunks // (2 * G) >= MIN_CHUNKS
           and chains * 2 * G <= TARGET_CHAINS):
        G *= 2
    return G


def compose(A_early, B_early, A_late, B_late):
    """The affine map 'early, then late' (matrix A [.., K, K] or scalar A [..])."""
    A = A_late * A_early if A_early.dim() == B_early.dim() - 2 else A_late @ A_early
    return A, apply_transition(A_late, B_early) + B_late


def fold_groups(A: torch.Tensor, B: torch.Tensor):
    """(A, B) [b, G, ...] of G consecutive pieces -> (A, B) [b, ...] of the whole, by a tree."""
    while A.shape[1] > 1:
        n = A.shape[1]
        even = n - n % 2
        A2, B2 = compose(A[:, 0:even:2], B[:, 0:even:2], A[:, 1:even:2], B[:, 1:even:2])
        if n % 2:  # the last piece waits one level
            A2, B2 = torch.cat([A2, A[:, -1:]], 1), torch.cat([B2, B[:, -1:]], 1)
        A, B = A2, B2
    return A[:, 0], B[:, 0]


def _groups(T: int, chunk_size: int, chains: int, groups: int | None) -> int:
    """The number of groups: ``groups`` checked (a positive divisor of the chunk count), or auto."""
    if T % chunk_size:
        if groups not in (None, 1):
            raise ValueError(f"grouped transition: groups={groups} needs T={T} to be a multiple of "
                             f"chunk_size={chunk_size}")
        return 1
    n_chunks = T // chunk_size
    G = auto_groups(n_chunks, chains) if groups is None else groups
    if isinstance(G, bool) or not isinstance(G, int) or G < 1 or n_chunks % G:
        raise ValueError(f"grouped transition: groups={G!r} must be a positive divisor of the "
                         f"{n_chunks} chunks of the shard")
    return G


def grouped_shard_transition(kind, k, v, *, g=None, beta=None, backend="auto", chunk_size=64,
                             groups: int | None = None):
    """Same result as ``shard_transition`` (no ``cu_seqlens``), by G parallel groups of chunks.

    ``groups``: G, which must divide the number of chunks T / chunk_size (T a multiple of
    chunk_size); None picks ``auto_groups``. G = 1 is ``shard_transition`` itself."""
    Bt, T, H = k.shape[:3]
    G = _groups(T, chunk_size, Bt * H * 16, groups)
    if G == 1:
        return shard_transition(kind, k, v, g=g, beta=beta, backend=backend, chunk_size=chunk_size)
    split = lambda x: None if x is None else x.reshape(Bt * G, T // G, *x.shape[2:])  # noqa: E731
    A, Bs = shard_transition(kind, split(k), split(v), g=split(g), beta=split(beta), backend=backend,
                             chunk_size=chunk_size)
    dt = torch.promote_types(torch.float32, Bs.dtype)  # the fold stays in (at least) fp32
    with torch.no_grad(), torch.autocast(device_type=k.device.type, enabled=False):
        return fold_groups(A.to(dt).view(Bt, G, *A.shape[1:]), Bs.to(dt).view(Bt, G, *Bs.shape[1:]))


def fold_group_grads(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """G [b, n, ...] of n consecutive pieces (each one's gradient w.r.t. its own incoming state)
    and their transitions A [b, n, ...] -> the whole's G, by a tree: for 'early, then late',
    G = G_early + A_early^T G_late and A = A_late A_early."""
    while G.shape[1] > 1:
        n = G.shape[1]
        even = n - n % 2
        Ae, Al, Ge, Gl = A[:, 0:even:2], A[:, 1:even:2], G[:, 0:even:2], G[:, 1:even:2]
        G2 = Ge + apply_transition_transposed(Ae, Gl)
        A2 = Al * Ae if Ae.dim() == Ge.dim() - 2 else Al @ Ae
        if n % 2:
            A2, G2 = torch.cat([A2, A[:, -1:]], 1), torch.cat([G2, G[:, -1:]], 1)
        A, G = A2, G2
    return G[:, 0]


def grouped_shard_state_grad(kind, q, k, v, do, *, g=None, beta=None, scale=None, backend="auto",
                             chunk_size=64, groups: int | None = None):
    """Same result as ``shard_state_grad`` by G parallel groups: each group's own state gradient
    and its transition (a state pass over the group: ``v`` is needed for nothing else, its B is
    dropped) run as a G-times wider batch, then a tree fold from the right. It costs one extra
    forward-type pass over the shard's chunks in exchange for a G-times shorter chain."""
    Bt, T, H = k.shape[:3]
    G = _groups(T, chunk_size, Bt * H * 16, groups)
    if G == 1:
        return shard_state_grad(kind, q, k, do, g=g, beta=beta, scale=scale, backend=backend,
                                chunk_size=chunk_size)
    split = lambda x: None if x is None else x.reshape(Bt * G, T // G, *x.shape[2:])  # noqa: E731
    A, _ = shard_transition(kind, split(k), split(v), g=split(g), beta=split(beta), backend=backend,
                            chunk_size=chunk_size)
    Gs = shard_state_grad(kind, split(q), split(k), split(do), g=split(g), beta=split(beta), scale=scale,
                          backend=backend, chunk_size=chunk_size)
    dt = torch.promote_types(torch.float32, Gs.dtype)
    with torch.no_grad(), torch.autocast(device_type=k.device.type, enabled=False):
        return fold_group_grads(A.to(dt).view(Bt, G, *A.shape[1:]), Gs.to(dt).view(Bt, G, *Gs.shape[1:]))
