"""StreamingDataset of packed token samples, yielding one CP rank's slice (imports mosaicml-streaming;
kept apart so that `import lctrain.data` stays light, and at module level so that workers can pickle it)."""
from __future__ import annotations

import torch
from streaming import StreamingDataset

from lctrain.data.loader import cp_slice


class TokenSamples(StreamingDataset):
    """Items are this CP rank's {"input_ids", "labels"} (LongTensor [seq_len / cp_size]), plus
    "answer_mask" (aligned with labels) when the dataset has that column."""

    def __init__(self, *, cp_rank: int, cp_size: int, **kwargs):
        super().__init__(**kwargs)
        self.cp_rank, self.cp_size = cp_rank, cp_size

    def get_item(self, idx: int, retry: int = 7) -> dict:
        sample = super().get_item(idx, retry)
        input_ids, labels = cp_slice(sample["tokens"], self.cp_rank, self.cp_size)
        item = {"input_ids": input_ids, "labels": labels}
        if sample.get("answer_mask") is not None:
            item["answer_mask"] = cp_slice(sample["answer_mask"], self.cp_rank, self.cp_size)[1].to(torch.uint8)
        return item
