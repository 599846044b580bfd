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


def find_documents(input_ids: torch.Tensor, end_id: int, *, cp_group=None) -> Documents | None:
    """The documents of ``input_ids`` [B, T_local] (this rank's shard under CP), or None when no row
    holds a document end before its last token (one document per row: nothing to keep apart)."""
    from .attention import _group_size

    B, T = input_ids.shape
    is_end = input_ids == int(end_id)
    P = _group_size(cp_group)
    start = 0
    if P > 1:
        import torch.distributed as dist

        from lctrain.parallel.halo import gather_sequence

        is_end = gather_sequence(is_end.to(torch.uint8), cp_group, dim=1).bool()  # [B, P * T]
        start = dist.get_rank(cp_group) * T
    total = is_end.shape[1]
    rows, cols = is_end[:, :-1].nonzero(as_tuple=True)  # one host sync per forward
    if rows.numel() == 0:
        return None
    bounds = [[0] for _ in range(B)]
    for b, p in zip(rows.tolist(), cols.tolist()):
        bounds[b].append(p + 1)
    for row in bounds:
        row.append(total)
    return Documents(bounds, start, T, total, input_ids.device)
