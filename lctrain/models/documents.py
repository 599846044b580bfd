"""Packed documents of one forward: where they start and end, derived once from the input ids.

A token equal to ``model.document_end_id`` ends its document (it belongs to the document it ends),
so a boundary sits right after it. Every layer keeps documents apart with the same boundaries:
the linear mixers pass them to their op as ``cu_seqlens`` (the state restarts), the short convs
drop taps that reach into the previous document, attention masks keys of other documents.

Positions are global stream positions: under context parallelism rank r holds [r T, (r+1) T) and
the boundaries are those of the whole sequence (one all-gather of the end-token mask per forward),
so every rank knows the document of any position without further communication (the halo keys
of sliding-window attention, the full sequence Ulysses attention sees).
"""
from __future__ import annotations

import torch


class Documents:
    """Global document boundaries of each batch row and helpers the layers use.

    ``bounds[b]``: Python list [0, ..., total] of row b's boundaries (global positions);
    ``start``: global position of this rank's first token; ``length``: tokens per rank;
    ``total``: the whole sequence's length. Results are cached: one object lives for one forward
    (and for its activation-checkpoint replays), shared by every layer."""

    def __init__(self, bounds: list[list[int]], start: int, length: int, total: int, device):
        self.bounds, self.start, self.length, self.total = bounds, start, length, total
        self.device = torch.device(device)
        self.cache: dict = {}

    def _cached(self, key, make):
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def doc_ids(self, lo: int, hi: int) -> torch.Tensor:
        """[B, hi - lo] document index of global positions lo .. hi-1 (-1 outside the sequence)."""
        def make():
            pos = torch.arange(lo, hi, device=self.device)
            rows = []
            for b in self.bounds:
                ids = torch.searchsorted(torch.tensor(b, device=self.device), pos, right=True) - 1
                rows.append(torch.where((pos >= 0) & (pos < self.total), ids, torch.full_like(ids, -1)))
            return torch.stack(rows)
        return self._cached(("ids", lo, hi), make)

    def local_doc_ids(self) -> torch.Tensor:
        return self.doc_ids(self.start, self.start + self.length)

    def position_in_document(self) -> torch.Tensor:
        """[B, T_local] tokens before each local token inside its document (0 at a document's start)."""
        def make():
            ids = self.local_doc_ids()
            starts = torch.stack([torch.tensor(b, device=self.device)[i] for b, i in zip(self.bounds, ids)])
            return torch.arange(self.start, self.start + self.length, device=self.device) - starts
        return self._cached("pos", make)

    def local_bounds(self, row: int) -> list[int]:
        """Row ``row``'s boundaries inside this rank's shard, as local positions [0, ..., T_local]."""
        lo, hi = self.start, self.start + self.length
        return [0] + [p - lo for p in self.bounds[row] if lo < p < hi] + [self.length]

    def packed_cu_seqlens(self) -> torch.Tensor | None:
        """cu_seqlens of the batch's rows laid end to end as one B=1 stream of B * T_local tokens
        (single process: each row's documents, and every row end a boundary); None when no row holds
        a boundary inside it and B == 1."""
        def make():
            cu, n_inside = [0], 0
            for b in range(len(self.bounds)):
                local = self.local_bounds(b)
                n_inside += len(local) - 2
                cu += [b * self.length + p for p in local[1:]]
            if n_inside == 0 and len(self.bounds) == 1:
                return None
            return torch.tensor(cu, dtype=torch.int32, device=self.device)
        return self._cached("packed_cu", make)

    def row_cu_seqlens(self, row: int) -> torch.Tensor:
        """The GLOBAL cu_seqlens of one row (what a context-parallel op takes)."""
        return self._cached(("row_cu", row), lambda: torch.tensor(self.bounds[row], dtype=torch.int32,
                                                                  device=self.device))


def _shard(input_ids: torch.Tensor, cp_group) -> tuple[int, int]:
    """(global position of this rank's first token, the whole sequence's length)."""
    from lctrain.parallel.mesh import group_size

    T, P = input_ids.shape[1], group_size(cp_group)
    if P == 1:
        return 0, T
    import torch.distributed as dist

    return dist.get_rank(cp_group) * T, P * T


def documents_from_bounds(bounds: list[list[int]], input_ids: torch.Tensor, *, cp_group=None) -> Documents | None:
    """Documents from boundaries the data loader found (lctrain.data.loader.document_bounds: per row,
    the GLOBAL [0, ..., T_full]); checked, not trusted. None when no row has a boundary inside."""
    B, T = input_ids.shape
    start, total = _shard(input_ids, cp_group)
    if len(bounds) != B:
        raise ValueError(f"doc_bounds holds {len(bounds)} rows for a batch of {B}")
    rows = []
    for b, row in enumerate(bounds):
        row = [int(x) for x in row]
        if len(row) < 2 or row[0] != 0 or row[-1] != total or any(y <= x for x, y in zip(row, row[1:])):
            raise ValueError(f"doc_bounds row {b} must run strictly increasing from 0 to the whole sequence's length "
                             f"{total}; got {row[:4]}{' ...' if len(row) > 4 else ''} "
                             f"{row[-1:] if len(row) > 4 else ''}")
        rows.append(row)
    if all(len(row) == 2 for row in rows):
        return None
    return Documents(rows, start, T, total, input_ids.device)


def find_documents(input_ids: torch.Tensor, end_id: int, *, cp_group=None) -> Documents | None:
    """The documents of ``input_ids`` [B, T_local] (this rank's shard under CP), or None when no row
    holds a document end before its last token (one document per row: nothing to keep apart)."""
    B, T = input_ids.shape
    is_end = input_ids == int(end_id)
    start, total = _shard(input_ids, cp_group)
    if total > T:
        from lctrain.parallel.halo import gather_sequence

        is_end = gather_sequence(is_end.to(torch.uint8), cp_group, dim=1).bool()  # [B, P * T]
    rows, cols = is_end[:, :-1].nonzero(as_tuple=True)  # one host sync per forward
    if rows.numel() == 0:
        return None
    bounds = [[0] for _ in range(B)]
    for b, p in zip(rows.tolist(), cols.tolist()):
        bounds[b].append(p + 1)
    for row in bounds:
        row.append(total)
    return Documents(bounds, start, T, total, input_ids.device)
