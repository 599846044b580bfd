"""StreamingDataset of packed token samples, yielding one CP rank's slice (imports mosaicml-streaming;
kept apart so that `import lctrain.data` stays light, and at module level so that workers can pickle it)."""
from __future__ import annotations

import torch
from streaming import StreamingDataset

from lctrain.data.loader import cp_slice, document_bounds
from lctrain.data.streaming_lock import streaming_construction_lock


class TokenSamples(StreamingDataset):
    """Items are this CP rank's {"input_ids", "labels"} (LongTensor [seq_len / cp_size]), plus
    "answer_mask" (aligned with labels) when the dataset has that column, plus "doc_bounds" when
    `document_end_id` is given: the document boundaries of the WHOLE sample's input ids (see
    lctrain.data.loader.document_bounds), so the model needs neither a scan nor, under CP, an
    all-gather to find them. Batch them with `collate_samples`.

    Construction holds the machine-wide `streaming_construction_lock` (two processes building
    datasets at once can otherwise claim the same shared-memory prefix); under torch.distributed
    every rank must construct it."""

    def __init__(self, *, cp_rank: int, cp_size: int, document_end_id: int | None = None, **kwargs):
        with streaming_construction_lock():
            super().__init__(**kwargs)
        self.cp_rank, self.cp_size = cp_rank, cp_size
        self.document_end_id = document_end_id

    def get_item(self, idx: int, retry: int = 7) -> dict:
        sample = super().get_item(idx, retry)
        input_ids, labels = cp_slice(sample["tokens"], self.cp_rank, self.cp_size)
        item = {"input_ids": input_ids, "labels": labels}
        if self.document_end_id is not None:
            item["doc_bounds"] = document_bounds(sample["tokens"][:-1], self.document_end_id)
        if sample.get("answer_mask") is not None:
            item["answer_mask"] = cp_slice(sample["answer_mask"], self.cp_rank, self.cp_size)[1].to(torch.uint8)
        return item
