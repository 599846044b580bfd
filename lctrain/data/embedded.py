"""The embedded default dataset: the machine's own text (corpus.py) + synthetic needle samples, as MDS.

`ensure_embedded_dataset(data_cfg)` builds it once under
`<data.cache_dir>/embedded-<hash>` where the hash covers everything that changes the samples
(seq_len, needle_fraction, tokenizer, seed, sample count, corpus fingerprint, format version), and
returns that path; later calls reuse it.

Several ranks may call it at once: one builder per node (LOCAL_RANK 0 by default) writes it into a
temporary directory and renames it into place (atomic, so a concurrent builder on another node
sharing the cache just finds it done); the other ranks wait for the directory to appear (no
torch.distributed barrier is needed). A failed build leaves `<path>.failed` with the error so that
waiting ranks stop at once instead of timing out (markers from more than STALE_FAILURE_S before a
rank started waiting are ignored as left over from an earlier run).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lctrain.data.corpus import corpus_fingerprint, embedded_documents
from lctrain.data.mds import DatasetExistsError, write_mds
from lctrain.data.needle import (
    NEEDLE_DIGITS,
    _SentenceIds,
    min_training_length,
    packed_needle_sample,
    training_needle_sample,
)
from lctrain.data.packing import packed_epochs, token_dtype
from lctrain.data.tokenizer import get_tokenizer

# 3: answer_mask column, 7-digit values, no digit-copy units (see NEEDLE_DIGITS and mix_samples)
FORMAT_VERSION = 3
# Share of needle samples that pack several passkey units; the rest hold one needle over the whole
# length (the eval's length stays in distribution).
PACKED_NEEDLE_SHARE = 0.8
# Enough samples for the default job (train.steps 300 x micro_batch 8 = 2400) without repeating
# one, and ~2M tokens for short sequence lengths (at most MAX_SAMPLES samples).
MIN_SAMPLES = 2400
MAX_SAMPLES = 16384
MIN_TOKENS = 1 << 21
# A failure marker older than this (before the waiting rank started) is left over from an earlier run.
STALE_FAILURE_S = 120.0


def default_num_samples(seq_len: int) -> int:
    return max(MIN_SAMPLES, min(MAX_SAMPLES, math.ceil(MIN_TOKENS / (seq_len + 1))))


def embedded_settings(data_cfg: Any, num_samples: int | None = None) -> dict:
    tok = get_tokenizer(data_cfg)
    return {
        "format": FORMAT_VERSION,
        "packed_needle_share": PACKED_NEEDLE_SHARE,
        "needle_digits": NEEDLE_DIGITS,
        "seq_len": int(data_cfg.seq_len),
        "needle_fraction": float(data_cfg.needle_fraction),
        "tokenizer": tok.name,
        "seed": int(data_cfg.seed),
        "num_samples": int(num_samples or default_num_samples(int(data_cfg.seq_len))),
        "corpus": corpus_fingerprint(),
    }


def embedded_dataset_path(data_cfg: Any, num_samples: int | None = None) -> Path:
    settings = embedded_settings(data_cfg, num_samples)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return Path(os.path.expanduser(str(data_cfg.cache_dir))).absolute() / f"embedded-{digest}"


def holds_needle(tokenizer: Any, length: int, digits: int = NEEDLE_DIGITS) -> bool:
    """Whether a sample of `length` tokens is long enough for a passkey unit of `digits` digits."""
    return length >= min_training_length(tokenizer, digits)


def mix_samples(text: list[np.ndarray], n_needle: int, tokenizer: Any, length: int, seed: int, *,
                digits: int = NEEDLE_DIGITS,
                packed_share: float = PACKED_NEEDLE_SHARE) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(samples, answer_masks): `text` samples and `n_needle` synthetic needle samples (each `length`
    ids), interleaved in a seeded order, and per sample a uint8 mask that is 1 on the needle answers'
    tokens (all 0 for text), which training can weight (train.answer_loss_weight).

    A share `packed_share` of the needle samples holds several passkey units (dense retrieval
    signal), the rest one needle over the whole length; values have `digits` digits. (Probes may
    vary both; the embedded dataset uses the module's defaults.) Digit-copy units are gone: in probes
    (docs/eval-notes.md) they made the sliding-window layer learn to copy digits by position, and the
    global layer then never learned the long-distance retrieval.

    Samples shorter than `needle.min_training_length` cannot hold a needle: then none are added.
    """
    if not holds_needle(tokenizer, length, digits):
        n_needle = 0
    rng = random.Random(f"needle-{seed}")
    cache = _SentenceIds(tokenizer)
    needles = []
    for _ in range(n_needle):
        build = packed_needle_sample if rng.random() < packed_share else training_needle_sample
        ids, mask = build(tokenizer, length, rng, digits=digits, with_answer_mask=True, _encode_cache=cache)
        needles.append((np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8)))
    kinds = [0] * len(text) + [1] * n_needle
    random.Random(f"mix-{seed}").shuffle(kinds)
    it_text, it_needle = iter(text), iter(needles)
    no_answers = np.zeros(length, dtype=np.uint8)
    samples, masks = [], []
    for k in kinds:
        ids, mask = next(it_needle) if k else (next(it_text), no_answers)
        samples.append(ids)
        masks.append(mask)
    return samples, masks


def build_embedded_samples(tokenizer: Any, seq_len: int, num_samples: int, needle_fraction: float, seed: int, *,
                           digits: int = NEEDLE_DIGITS,
                           packed_share: float = PACKED_NEEDLE_SHARE) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(samples, answer_masks) of the embedded dataset (each seq_len + 1 long): text and needle
    samples interleaved (see mix_samples, which `digits` and `packed_share` go to); all text when
    seq_len is too short for a needle."""
    length = seq_len + 1
    n_needle = round(needle_fraction * num_samples) if holds_needle(tokenizer, length, digits) else 0
    n_text = num_samples - n_needle
    text: list[np.ndarray] = []
    if n_text:
        doc_ids = [tokenizer.encode(d) for d in embedded_documents()]
        text = packed_epochs(doc_ids, length, tokenizer.eos_id, n_text, seed)
    return mix_samples(text, n_needle, tokenizer, length, seed, digits=digits, packed_share=packed_share)


def ensure_embedded_dataset(data_cfg: Any, *, num_samples: int | None = None, builder: bool | None = None,
                            timeout_s: float = 3600.0) -> Path:
    """Local MDS path of the embedded dataset for `data_cfg`, built on first use (see module doc).

    builder: whether this process builds it if missing; default: LOCAL_RANK (0 if unset) == 0.
    Non-builders wait up to timeout_s for the builder.
    """
    settings = embedded_settings(data_cfg, num_samples)

    def write(path: Path) -> None:
        tok = get_tokenizer(data_cfg)
        samples, masks = build_embedded_samples(tok, settings["seq_len"], settings["num_samples"],
                                                settings["needle_fraction"], settings["seed"])
        write_mds(path, samples, answer_masks=masks, sample_len=settings["seq_len"] + 1,
                  dtype=token_dtype(tok.vocab_size),
                  meta=dict(settings, source="embedded", vocab_size=tok.vocab_size, eos_id=tok.eos_id))

    return build_once(embedded_dataset_path(data_cfg, num_samples), write, builder=builder, timeout_s=timeout_s)


def build_once(path: Path, write: Callable[[Path], None], *, builder: bool | None = None,
               timeout_s: float = 3600.0) -> Path:
    """`path` once a cached MDS dataset is there: a builder rank runs `write(path)` if it is missing
    (concurrent builders are fine: write_mds renames atomically), the others wait (see module doc)."""
    failed = path.with_name(path.name + ".failed")
    if (path / "index.json").is_file():
        return path
    if builder is None:
        builder = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if builder:
        failed.unlink(missing_ok=True)
        try:
            write(path)
        except DatasetExistsError:
            pass  # another builder finished it first
        except BaseException as err:
            path.parent.mkdir(parents=True, exist_ok=True)
            failed.write_text(f"{type(err).__name__}: {err}")
            raise
        return path
    deadline = time.monotonic() + timeout_s
    started = time.time()
    while not (path / "index.json").is_file():
        if failed.is_file() and failed.stat().st_mtime > started - STALE_FAILURE_S:
            raise RuntimeError(f"building the dataset {path} failed on the builder rank: {failed.read_text()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f}s for the dataset {path}; the builder (LOCAL_RANK 0) "
                               "did not finish: check its log, or build it first with `lctrain data prepare`")
        time.sleep(0.2)
    return path
