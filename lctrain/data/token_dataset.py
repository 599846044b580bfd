"""StreamingDataset of packed token samples, yielding one CP rank's slice (imports mosaicml-streaming;
kept apart so that `import lctrain.data` stays light, and at module level so that workers can pickle it)."""
from __future__ import annotations

from streaming import StreamingDataset

from lctrain.data.loader import cp_slice


class TokenSamples(StreamingDataset):
    """Items are this CP rank's {"input_ids", "labels"} (LongTensor [seq_len / cp_size])."""

    def __init__(self, *, cp_rank: int, cp_size: int, **kwargs):
        super().__init__(**kwargs)
        self.cp_rank, self.cp_size = cp_rank, cp_size

    def get_item(self, idx: int, retry: int = 7) -> dict:
        tokens = super().get_item(idx, retry)["tokens"]
        input_ids, labels = cp_slice(tokens, self.cp_rank, self.cp_size)
        return {"input_ids": input_ids, "labels": labels}
