"""Packing documents into fixed-length samples (seq_len + 1 tokens) with EOS between documents."""
from __future__ import annotations

import random
from typing import Iterable, Iterator, Sequence

import numpy as np


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def pack_documents(docs: Iterable[Sequence[int]], length: int, eos_id: int) -> Iterator[np.ndarray]:
    """Concatenate doc + [EOS] + doc + [EOS] ... and cut it into consecutive samples of `length` ids.

    The last partial sample is dropped. Every document boundary in a sample is an EOS token.
    """
    if length < 2:
        raise ValueError(f"sample length must be >= 2, got {length}")
    buf: list[int] = []
    for doc in docs:
        buf.extend(doc)
        buf.append(eos_id)
        while len(buf) >= length:
            yield np.asarray(buf[:length], dtype=np.int64)
            del buf[:length]


def packed_epochs(doc_ids: Sequence[Sequence[int]], length: int, eos_id: int, num_samples: int,
                  seed: int) -> list[np.ndarray]:
    """`num_samples` packed samples; when one pass over the corpus is not enough, further passes
    ("epochs") shuffle the document order and start at a random offset so that samples differ."""
    total = sum(len(d) + 1 for d in doc_ids)
    if total < length:
        raise ValueError(f"the corpus holds {total} tokens, fewer than one sample of {length}; give more text or a "
                         "shorter data.seq_len")
    out: list[np.ndarray] = []
    epoch = 0
    while len(out) < num_samples:
        order = list(range(len(doc_ids)))
        skip = 0
        if epoch > 0:
            rng = random.Random(f"{seed}-{epoch}")
            rng.shuffle(order)
            skip = rng.randrange(length)
        docs = (doc_ids[i] for i in order)
        if skip:
            first = list(doc_ids[order[0]])[skip:]
            docs = iter([first] + [doc_ids[i] for i in order[1:]])
        for sample in pack_documents(docs, length, eos_id):
            out.append(sample)
            if len(out) == num_samples:
                break
        epoch += 1
    return out
