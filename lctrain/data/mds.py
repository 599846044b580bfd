"""Writing token samples as MDS shards (mosaicml-streaming), atomically.

A dataset directory holds `index.json` + shards written by `streaming.MDSWriter` (one column,
`tokens`: a fixed-length ndarray of uint16 or uint32; optionally `answer_mask`, uint8 of the same length,
1 on tokens that answer a synthetic needle question) and `lctrain.json` describing it (sample length,
tokenizer, count). It is written into a temporary sibling directory and renamed into place, so a
directory that exists is complete; an existing dataset is never clobbered unless overwrite=True.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from lctrain.errors import UserError

META_FILE = "lctrain.json"


class DatasetExistsError(UserError, FileExistsError):
    """The output directory already holds something."""


def _tmp_sibling(path: Path, tag: str) -> Path:
    return path.parent / f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def write_mds(out_dir: str | os.PathLike, samples: Iterable[np.ndarray], *, sample_len: int, dtype: np.dtype,
              meta: dict[str, Any] | None = None, overwrite: bool = False, size_limit: int = 1 << 26,
              answer_masks: Iterable[np.ndarray] | None = None) -> Path:
    """Write every sample (exactly `sample_len` ids) to `out_dir`; returns the final path.
    `answer_masks` (one 0/1 array per sample, in the same order) adds the `answer_mask` column.

    Raises DatasetExistsError if `out_dir` exists and overwrite is False. If another process
    finishes the same directory first, this raises DatasetExistsError too (callers building a cache
    entry treat that as success).
    """
    from streaming import MDSWriter

    out = Path(os.path.expanduser(str(out_dir))).absolute()
    if out.exists() and not overwrite:
        raise DatasetExistsError(f"{out} already exists; choose another output directory or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(dtype)
    tmp = _tmp_sibling(out, "tmp")
    count = 0
    columns = {"tokens": f"ndarray:{dtype.name}:{sample_len}"}
    if answer_masks is not None:
        columns["answer_mask"] = f"ndarray:uint8:{sample_len}"
        masks = iter(answer_masks)
    try:
        with MDSWriter(out=str(tmp), columns=columns,
                       compression=None, size_limit=size_limit, progress_bar=False, exist_ok=False) as writer:
            for sample in samples:
                arr = np.asarray(sample)
                if arr.shape != (sample_len,):
                    raise ValueError(f"sample {count} has shape {arr.shape}, expected ({sample_len},)")
                if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(dtype).max):
                    raise ValueError(f"sample {count} holds ids outside {dtype.name}")
                row = {"tokens": arr.astype(dtype)}
                if answer_masks is not None:
                    mask = np.asarray(next(masks, ()))
                    if mask.shape != (sample_len,):
                        raise ValueError(f"answer mask {count} has shape {mask.shape}, expected ({sample_len},)")
                    row["answer_mask"] = (mask != 0).astype(np.uint8)
                writer.write(row)
                count += 1
        if count == 0:
            raise ValueError("no samples to write: the input holds fewer tokens than one sample (seq_len + 1)")
        info = dict(meta or {}, sample_len=sample_len, dtype=dtype.name, num_samples=count, format=1)
        (tmp / META_FILE).write_text(json.dumps(info, indent=1, sort_keys=True))
        if out.exists() and overwrite:
            trash = _tmp_sibling(out, "old")
            os.rename(out, trash)
            os.rename(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            try:
                os.rename(tmp, out)
            except OSError:
                if out.exists():
                    raise DatasetExistsError(f"{out} was written by another process meanwhile") from None
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The dataset's lctrain.json (empty dict for MDS written by other tools)."""
    f = Path(os.path.expanduser(str(path))) / META_FILE
    return json.loads(f.read_text()) if f.is_file() else {}
