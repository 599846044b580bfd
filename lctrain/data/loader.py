"""The training loader: MDS samples of seq_len + 1 tokens -> this CP rank's slice of inputs and labels.

All ranks of one TP x CP (x PP) group read the same samples (`replication` in StreamingDataset, which
groups consecutive global ranks: this matches megatron-core's rank order, where data-parallel is the
outer dimension); data-parallel ranks read different samples. Each CP rank keeps its contiguous slice
[cp_rank * T / cp, (cp_rank + 1) * T / cp) of input_ids = tokens[:-1] and labels = tokens[1:], so the
labels are the global shift even at slice edges.

StreamingDataset reads RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE from the environment (not
from torch.distributed); `build_train_loader` checks that they agree with the ranks it is given.
Building several loaders in one process is safe: local-only datasets (remote=None) each register
their own shared-memory prefix; across the processes of a machine, TokenSamples registers it under
lctrain.data.streaming_lock, so that two never claim the same one.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from lctrain.data.mds import read_meta
from lctrain.errors import UserError


class DataError(UserError, ValueError):
    """The data settings or files are wrong; the message says what to change."""


def cp_slice(tokens: np.ndarray | torch.Tensor, cp_rank: int, cp_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) of CP rank `cp_rank` from one sample (or a batch) of seq_len + 1 tokens."""
    t = torch.as_tensor(np.asarray(tokens).astype(np.int64)) if not torch.is_tensor(tokens) else tokens.long()
    seq_len = t.shape[-1] - 1
    if seq_len % cp_size:
        raise DataError(f"data.seq_len={seq_len} does not split into parallel.cp={cp_size} equal slices; make seq_len "
                        "a multiple of cp")
    if not 0 <= cp_rank < cp_size:
        raise DataError(f"cp_rank={cp_rank} is outside [0, {cp_size})")
    n = seq_len // cp_size
    lo, hi = cp_rank * n, (cp_rank + 1) * n
    return t[..., lo:hi].contiguous(), t[..., lo + 1:hi + 1].contiguous()


def document_bounds(input_ids, end_id: int) -> list[int]:
    """[0, ..., T]: where packed documents of one sample's input ids [T] start (right after each
    `end_id` token, which belongs to the document it ends) and end. The loader computes them from
    the whole sample once, on the host, so the model needs no scan of its own."""
    ids = np.asarray(input_ids)
    T = ids.shape[-1]
    ends = np.flatnonzero(ids[:-1] == int(end_id)) + 1
    return [0] + ends.tolist() + [T]


def collate_samples(items: list[dict]) -> dict:
    """Default collation, except "doc_bounds" (one list per sample, of varying length), which stays a
    list of lists."""
    from torch.utils.data import default_collate

    bounds = [item.pop("doc_bounds") for item in items] if items and "doc_bounds" in items[0] else None
    batch = default_collate(items)
    if bounds is not None:
        batch["doc_bounds"] = bounds
    return batch


class TrainLoader:
    """Iterates batches for ever (epoch after epoch); state_dict()/load_state_dict() for checkpoints."""

    def __init__(self, dataset, loader, *, path: Path, seq_len: int, cp_rank: int, cp_size: int):
        self.dataset, self.loader, self.path = dataset, loader, path
        self.seq_len, self.cp_rank, self.cp_size = seq_len, cp_rank, cp_size

    def __iter__(self) -> Iterator[dict]:
        while True:
            empty = True
            for batch in self.loader:
                empty = False
                yield batch
            if empty:
                raise DataError(f"the dataset {self.path} yields no full batch for this rank; use a smaller "
                                "data.micro_batch_size or fewer data-parallel ranks, or prepare more data")

    def state_dict(self) -> dict:
        return {"streaming": self.loader.state_dict(), "path": str(self.path), "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seq_len") not in (None, self.seq_len):
            raise DataError(f"the checkpoint's loader state is for seq_len={state['seq_len']}, this run uses "
                            f"{self.seq_len}; resume with the same data.seq_len or start a fresh out_dir")
        if state.get("streaming") is not None:
            self.loader.load_state_dict(state["streaming"])


def resolve_dataset(data_cfg: Any) -> Path:
    """Local MDS directory for data.source: "embedded" or "synthetic:<task>" (built on first use) or a path from
    `lctrain data prepare`."""
    if str(data_cfg.source) == "embedded":
        from lctrain.data.embedded import ensure_embedded_dataset

        return ensure_embedded_dataset(data_cfg)
    if str(data_cfg.source).startswith("synthetic:"):
        from lctrain.data.task_dataset import ensure_task_dataset

        return ensure_task_dataset(data_cfg)
    src = str(data_cfg.source)
    if "://" in src:
        raise DataError(f"data.source={src!r}: remote datasets are not supported yet; copy the MDS directory locally "
                        "and pass its path")
    path = Path(os.path.expanduser(src)).absolute()
    if not (path / "index.json").is_file():
        raise DataError(f"data.source={src!r} is not an MDS dataset (no index.json); "
                        "write one with `lctrain data prepare --out DIR` or use data.source=embedded")
    return path


class _FreshStartReplicationNote(logging.Filter):
    """StreamingDataset warns about "resuming from the wrong sample" whenever `replication` is set, even
    on a fresh start (sample 0), where nothing is resumed; a CP run would print it on every start."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("`replication` arg" in msg and "resuming from sample 0." in msg)


def _quiet_fresh_start_warning() -> None:
    logger = logging.getLogger("streaming.base.dataset")
    if not any(isinstance(f, _FreshStartReplicationNote) for f in logger.filters):
        logger.addFilter(_FreshStartReplicationNote())


def check_shards(path: Path, *, embedded: bool) -> None:
    """Every shard index.json lists is there with its size (a partly deleted cache fails here, not in
    a streaming worker's traceback)."""
    import json

    fix = (f"delete {path} (data.cache_dir) so that it is built again" if embedded
           else "prepare the data again with `lctrain data prepare`")
    try:
        shards = json.loads((path / "index.json").read_text())["shards"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}/index.json is unreadable ({type(err).__name__}); {fix}") from None
    for shard in shards:
        raw = shard.get("raw_data") or {}
        name, size = raw.get("basename"), raw.get("bytes")
        if name is None:
            continue
        f = path / name
        if not f.is_file() or (size is not None and f.stat().st_size != size):
            state = "is missing" if not f.is_file() else f"holds {f.stat().st_size} bytes, index.json says {size}"
            raise DataError(f"dataset {path}: shard {name} {state}; {fix}")


def _check_env(global_rank: int, world_size: int) -> None:
    """StreamingDataset takes the world from env vars; make sure they say what the trainer says."""
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    env_rank = int(os.environ.get("RANK", "0"))
    if (env_rank, env_world) != (global_rank, world_size):
        if "WORLD_SIZE" not in os.environ and world_size > 1:
            raise DataError(f"rank {global_rank} of {world_size}: RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE are not "
                            "set; launch with torchrun (or `lctrain train`), which sets them for mosaicml-streaming")
        raise DataError(f"the environment says RANK={env_rank} WORLD_SIZE={env_world} but the loader was built for "
                        f"global_rank={global_rank} world_size={world_size}; pass the torch.distributed rank and world "
                        "size")


def _check_same_dataset_everywhere(path: Path, meta: dict) -> None:
    """Every rank must read the same samples (the embedded corpus depends on each machine's files)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    mine = (path.name, meta.get("num_samples"), meta.get("corpus"))
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    odd = [r for r, x in enumerate(everyone) if x != everyone[0]]
    if odd:
        raise DataError(f"ranks read different datasets (rank 0: {everyone[0]}, rank {odd[0]}: {everyone[odd[0]]}); "
                        "on several machines the embedded corpus can differ: write one with `lctrain data prepare` "
                        "to a shared path and pass it as data.source")


def build_train_loader(data_cfg: Any, *, dp_rank: int, dp_size: int, cp_rank: int, cp_size: int, tp_size: int = 1,
                       global_rank: int = 0, world_size: int = 1, document_end_id: int | None = None) -> TrainLoader:
    """Batches {"input_ids", "labels"}: LongTensor [micro_batch_size, seq_len / cp_size] for this rank;
    with `document_end_id` also "doc_bounds": per sample, the global document boundaries [0, ..., seq_len]
    (pass them to the model as doc_bounds)."""
    from streaming import StreamingDataLoader

    seq_len, batch = int(data_cfg.seq_len), int(data_cfg.micro_batch_size)
    if world_size % dp_size:
        raise DataError(f"world_size={world_size} is not a multiple of dp_size={dp_size}")
    replication = world_size // dp_size  # TP x CP x PP ranks that read the same sample
    if world_size > 1 and global_rank // replication != dp_rank:
        raise DataError(f"global rank {global_rank} with {replication} ranks per data-parallel group should be dp rank "
                        f"{global_rank // replication}, got dp_rank={dp_rank}: the mesh must put data parallelism "
                        "outermost (megatron-core's default order)")
    if seq_len % cp_size:
        raise DataError(f"data.seq_len={seq_len} does not split into parallel.cp={cp_size} equal slices; make seq_len "
                        "a multiple of cp")
    _check_env(global_rank, world_size)
    path = resolve_dataset(data_cfg)
    check_shards(path, embedded=str(data_cfg.source) == "embedded" or str(data_cfg.source).startswith("synthetic:"))
    meta = read_meta(path)
    _check_same_dataset_everywhere(path, meta)
    if meta.get("tokenizer") is not None:
        from lctrain.data.tokenizer import get_tokenizer

        ours = get_tokenizer(data_cfg).name
        if meta["tokenizer"] != ours:
            raise DataError(f"{path} was tokenized with {meta['tokenizer']!r} but "
                            f"data.tokenizer={data_cfg.tokenizer!r} is {ours!r}; "
                            "set data.tokenizer to the tokenizer the data was prepared with, or prepare it again")
    if meta.get("sample_len") not in (None, seq_len + 1):
        raise DataError(f"{path} holds samples of {meta['sample_len']} tokens but data.seq_len={seq_len} needs "
                        f"{seq_len + 1}; "
                        f"set data.seq_len={meta['sample_len'] - 1} or prepare the data again with --seq-len {seq_len}")
    from lctrain.data.token_dataset import TokenSamples

    _quiet_fresh_start_warning()

    # a curriculum dataset (data.task.curriculum_samples) is read in its stored order: no shuffle, one
    # canonical node, so that global batch b holds samples b*B..(b+1)*B-1 for any number of ranks
    ordered = bool(meta.get("ordered"))
    dataset = TokenSamples(
        local=str(path), remote=None, shuffle=not ordered, shuffle_seed=int(data_cfg.seed), batch_size=batch,
        **({"num_canonical_nodes": 1} if ordered else {}),
        replication=replication if replication > 1 else None, cp_rank=cp_rank, cp_size=cp_size,
        document_end_id=document_end_id,
    )
    if dataset.num_samples < batch * dp_size:
        raise DataError(f"{path} holds {dataset.num_samples} samples, fewer than one global batch "
                        f"(micro_batch_size {batch} x {dp_size} data-parallel ranks); prepare more data")
    workers = int(getattr(data_cfg, "num_workers", 0) or 0)
    loader = StreamingDataLoader(dataset, batch_size=batch, num_workers=workers, drop_last=True,
                                 persistent_workers=workers > 0, collate_fn=collate_samples)
    return TrainLoader(dataset, loader, path=path, seq_len=seq_len, cp_rank=cp_rank, cp_size=cp_size)
