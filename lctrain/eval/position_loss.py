"""`lctrain eval position-loss --ckpt DIR [--ckpt DIR2 ...] --data PATH --seq-len 131072 [RECIPE] [key=value ...]`

Mean next-token loss at every position of --seq-len-token windows, per checkpoint, on one plot.

Windows (`--num-windows`, each seq_len + 1 tokens: inputs and the shifted labels):
- `--data` an MDS folder (written by `lctrain data prepare`, column "tokens"): its samples read in
  order as one token stream, cut into consecutive windows (samples are already packed documents);
- `--data` a .txt / .jsonl file or a folder of them (`lctrain data prepare`'s readers): every
  document is one window starting at its first token; documents shorter than the window count only
  at the positions they cover (the rest is masked), unless `--pack` concatenates them with EOS first;
- `--data embedded`: the embedded text corpus (no needle samples), packed with EOS.
Position p (1-based) is the loss of predicting token p+1 from the p tokens before it.

Smoothing: per position the mean over windows (token-weighted); the plotted curve averages those
over log-spaced position bins (`--bins-per-decade`, default 20: bin edges at 10^(i/20), rounded to
whole positions, so bins below ~20 tokens hold single positions), weighting every token equally,
at x = the geometric mean of the bin's first and last position.

Under parallel.cp=N every window is split into N contiguous shards (global positions) and each rank
scores its own; under data parallelism the windows are dealt out round-robin; per-position sums and
counts are summed over all ranks at the end. Outputs in --out (default <first run>/eval):
position_loss.json (per checkpoint: raw per-position mean and count, smoothed curve),
position_loss.csv (label, position, mean_loss, count), position_loss_smoothed.csv and position_loss.png.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lctrain eval position-loss", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example: lctrain eval position-loss --ckpt runs/a --ckpt runs/b --data "
                                       "embedded --seq-len 512")
    p.add_argument("--ckpt", action="append", required=True, help="checkpoint (repeat for several curves on one plot)")
    p.add_argument("--label", action="append", help="legend label per --ckpt (default: <run>/step_<n>)")
    p.add_argument("--data", default="embedded", help="MDS folder, .txt/.jsonl file or folder, or 'embedded' (default)")
    p.add_argument("--seq-len", type=int, help="window length in tokens (default: the first run's data.seq_len)")
    p.add_argument("--num-windows", type=int, default=16, help="windows to score (default 16)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward (default 1)")
    p.add_argument("--pack", action="store_true", help="pack .txt/.jsonl documents with EOS instead of one per window")
    p.add_argument("--text-field", default="text", help="JSON field of .jsonl documents (default text)")
    p.add_argument("--bins-per-decade", type=int, default=20,
                   help="log-spaced smoothing bins per factor 10 (default 20)")
    p.add_argument("--out", help="output folder (default: <first run out_dir>/eval)")
    p.add_argument("args", nargs="*", help="an optional recipe YAML (its parallel section), then key=value overrides")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------- data


def _mds_stream(path: Path) -> Iterator[int]:
    """Every token of an MDS folder's samples (column "tokens"), shard by shard, in order."""
    from streaming.base.format import reader_from_json

    index = json.loads((path / "index.json").read_text())
    for shard in index["shards"]:
        if "tokens" not in shard.get("column_names", []):
            raise ValueError(f"{path}: MDS shards have no 'tokens' column (found {shard.get('column_names')}); "
                             "write the data with `lctrain data prepare`")
        if not (path / shard["raw_data"]["basename"]).is_file():
            raise ValueError(f"{path}: shard {shard['raw_data']['basename']} is missing (compressed shards are not "
                             "supported here); point --data at a local uncompressed MDS folder")
        reader = reader_from_json(str(path), None, shard)
        for i in range(reader.samples):
            yield from reader.get_item(i)["tokens"].astype(np.int64).tolist()


def _pack(docs: Iterable[list[int]], length: int, eos_id: int) -> Iterator[list[int]]:
    buf: list[int] = []
    for doc in docs:
        buf.extend(doc)
        buf.append(eos_id)
        while len(buf) >= length:
            yield buf[:length]
            del buf[:length]


def _chunks(stream: Iterable[int], length: int) -> Iterator[list[int]]:
    buf: list[int] = []
    for t in stream:
        buf.append(t)
        if len(buf) == length:
            yield buf
            buf = []


def iter_windows(data: str, tokenizer, seq_len: int, *, pack: bool = False,
                 text_field: str = "text") -> Iterator[list[int]]:
    """Token windows of at most seq_len + 1 ids (see module doc)."""
    length = seq_len + 1
    if data == "embedded":
        from lctrain.data.corpus import embedded_documents

        yield from _pack((tokenizer.encode(d) for d in embedded_documents()), length, tokenizer.eos_id)
        return
    path = Path(data).expanduser()
    if path.is_dir() and (path / "index.json").is_file():
        yield from _chunks(_mds_stream(path), length)
        return
    if not path.exists():
        raise ValueError(f"--data {data}: no such file or folder; pass an MDS folder, .txt/.jsonl files or 'embedded'")
    from lctrain.data.prepare import iter_documents

    docs = (tokenizer.encode(d) for d in iter_documents([str(path)], text_field, flag="--data"))
    if pack:
        yield from _pack(docs, length, tokenizer.eos_id)
    else:
        for ids in docs:
            if len(ids) >= 2:
                yield ids[:length]


# ----------------------------------------------------------------------------------------- scoring


class PositionLoss:
    """Per-position sums and counts of next-token losses for windows of seq_len tokens."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.sums = torch.zeros(seq_len, dtype=torch.float64)
        self.counts = torch.zeros(seq_len, dtype=torch.float64)

    @torch.no_grad()
    def add(self, model, window_ids: torch.Tensor, window_valid: torch.Tensor, *, cp_rank: int = 0, cp_size: int = 1,
            autocast_dtype=None) -> None:
        """Score windows [B, seq_len + 1] (valid: bool mask of real tokens); under CP this rank scores its
        shard [r T/P, (r+1) T/P) with `model` built for the CP group."""
        B, L = window_ids.shape
        if L != self.seq_len + 1:
            raise ValueError(f"windows must hold seq_len + 1 = {self.seq_len + 1} tokens, got {L}")
        T = self.seq_len // cp_size
        a, b = cp_rank * T, (cp_rank + 1) * T
        device = next(model.parameters()).device
        inputs = window_ids[:, a:b].to(device)
        labels = window_ids[:, a + 1:b + 1].clone()
        labels[~(window_valid[:, a + 1:b + 1] & window_valid[:, a:b])] = IGNORE_INDEX
        labels = labels.to(device)
        ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
        with ctx:
            logits = model(inputs, position_offset=a)
        loss = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
        mask = labels != IGNORE_INDEX
        self.sums[a:b] += (loss * mask).sum(0).double().cpu()
        self.counts[a:b] += mask.sum(0).double().cpu()

    def mean(self) -> torch.Tensor:
        """Per-position mean loss (NaN where no window had a token)."""
        return torch.where(self.counts > 0, self.sums / self.counts.clamp(min=1),
                           torch.full_like(self.sums, float("nan")))


def log_bins(n: int, per_decade: int = 20) -> list[tuple[int, int]]:
    """[first, last] 1-based position ranges covering 1..n, edges at 10^(i/per_decade) rounded."""
    if per_decade < 1:
        raise ValueError(f"--bins-per-decade must be >= 1, got {per_decade}")
    edges, i = [1], 1
    while edges[-1] <= n:
        e = int(round(10 ** (i / per_decade)))
        if e > edges[-1]:
            edges.append(e)
        i += 1
    edges[-1] = n + 1
    return [(edges[k], edges[k + 1] - 1) for k in range(len(edges) - 1)]


def smooth(sums: torch.Tensor, counts: torch.Tensor, per_decade: int = 20) -> dict:
    """Token-weighted mean loss per log-spaced bin: {"position", "first", "last", "loss", "tokens"}."""
    out = {"position": [], "first": [], "last": [], "loss": [], "tokens": []}
    for first, last in log_bins(len(sums), per_decade):
        c = float(counts[first - 1:last].sum())
        if c == 0:
            continue
        out["position"].append(math.sqrt(first * last))
        out["first"].append(first)
        out["last"].append(last)
        out["loss"].append(float(sums[first - 1:last].sum()) / c)
        out["tokens"].append(int(c))
    return out


def score_checkpoint(model, windows: Iterable[list[int]], seq_len: int, *, num_windows: int, batch_size: int = 1,
                     pad_id: int = 0, ctx=None) -> PositionLoss:
    """Run `model` (under CP: the CP model) over the windows; sums are complete on every rank."""
    acc = PositionLoss(seq_len)
    cp_rank, cp_size = (ctx.cp_rank, ctx.cp_size) if ctx is not None else (0, 1)
    dp_rank, dp_size = (ctx.dp_rank, ctx.dp_size) if ctx is not None else (0, 1)
    autocast = ctx.autocast_dtype if ctx is not None else None
    batch: list[list[int]] = []

    def flush():
        ids = torch.full((len(batch), seq_len + 1), pad_id, dtype=torch.long)
        valid = torch.zeros((len(batch), seq_len + 1), dtype=torch.bool)
        for i, w in enumerate(batch):
            ids[i, :len(w)] = torch.tensor(w, dtype=torch.long)
            valid[i, :len(w)] = True
        acc.add(model, ids, valid, cp_rank=cp_rank, cp_size=cp_size, autocast_dtype=autocast)
        batch.clear()

    seen = 0
    for j, w in enumerate(windows):
        if j >= num_windows:
            break
        seen += 1
        if j % dp_size != dp_rank:
            continue
        batch.append(w)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if seen == 0:
        raise ValueError("the data gave no window; give more text or a shorter --seq-len")
    if ctx is not None:
        acc.sums = ctx.all_reduce_sum(acc.sums)
        acc.counts = ctx.all_reduce_sum(acc.counts)
    return acc


# -------------------------------------------------------------------------------------------- main


def main(argv: list[str]) -> int:
    ns = _parse(argv)
    from lctrain.config import LINEAR_LAYERS, ConfigError, split_recipe_and_overrides
    from lctrain.local_launch import self_launch

    from . import runtime

    try:
        recipe, overrides = split_recipe_and_overrides(ns.args)
        cfg = runtime.eval_config(ns.ckpt[0], recipe, overrides)
        for extra in ns.ckpt[1:]:
            runtime.eval_config(extra, recipe, overrides)  # every checkpoint must resolve
        if ns.label and len(ns.label) != len(ns.ckpt):
            raise runtime.EvalError(f"give one --label per --ckpt ({len(ns.ckpt)}), got {len(ns.label)}")
        seq_len = ns.seq_len if ns.seq_len is not None else int(cfg.data.seq_len)
        for key in ("num_windows", "batch_size"):
            if getattr(ns, key) < 1:
                raise runtime.EvalError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(ns, key)}")
        if seq_len < 1:
            raise runtime.EvalError(f"--seq-len must be >= 1, got {seq_len}")
        cp = cfg.parallel.cp
        pattern = "".join(str(c) for c in cfg.model.layer_pattern)
        unit = cp * int(cfg.model.chunk_size) if any(c in LINEAR_LAYERS for c in pattern) else cp
        if cp > 1 and seq_len % unit:
            raise runtime.EvalError(f"--seq-len {seq_len} does not split into parallel.cp={cp} shards of whole chunks; "
                                    f"use a multiple of {unit}")
        if ns.data != "embedded" and not Path(ns.data).expanduser().exists():
            raise runtime.EvalError(f"--data {ns.data}: no such file or folder; pass an MDS folder, .txt/.jsonl files "
                                    "or 'embedded'")
    except (ConfigError, ValueError) as err:
        print(f"lctrain eval position-loss: error: {err}", file=sys.stderr)
        return 2
    if runtime.needs_launch(cfg):
        return self_launch(["eval", "position-loss"], list(argv), runtime.nproc(cfg), runtime.launch_uses_cuda(cfg))

    from .niah import _tokenizer

    ctx = runtime.start(cfg)
    try:
        results = []
        for n, ckpt in enumerate(ns.ckpt):
            model, cp_model, ckpt_cfg, path = runtime.load_models(ckpt, ctx, cfg)
            tokenizer = _tokenizer(ckpt_cfg)
            label = ns.label[n] if ns.label else runtime.checkpoint_label(path)
            start = time.perf_counter()
            windows = iter_windows(ns.data, tokenizer, seq_len, pack=ns.pack, text_field=ns.text_field)
            acc = score_checkpoint(cp_model if cp_model is not None else model, windows, seq_len,
                                   num_windows=ns.num_windows, batch_size=ns.batch_size, pad_id=tokenizer.pad_id,
                                   ctx=ctx)
            sm = smooth(acc.sums, acc.counts, ns.bins_per_decade)
            total = float(acc.sums.sum() / acc.counts.sum().clamp(min=1))
            if ctx.main:
                print(f"position-loss: {label}: mean {total:.4f} over {int(acc.counts.sum())} tokens "
                      f"({time.perf_counter() - start:.1f}s)", flush=True)
            results.append({"label": label, "checkpoint": str(path), "train_seq_len": int(ckpt_cfg.data.seq_len),
                            "mean_loss": total, "tokens": int(acc.counts.sum()),
                            "per_position": {"mean": _nan_to_none(acc.mean().tolist()),
                                             "count": acc.counts.long().tolist()},
                            "smoothed": sm})
            del model, cp_model
        if ctx.main:
            from lctrain.train.checkpoint import resolve_checkpoint

            out = Path(ns.out) if ns.out else runtime.default_out_dir(resolve_checkpoint(ns.ckpt[0]))
            write_outputs(out, results, seq_len=seq_len, data=ns.data, bins_per_decade=ns.bins_per_decade,
                          parallel={"cp": ctx.cp_size, "dp": ctx.dp_size}, num_windows=ns.num_windows)
    except ValueError as err:
        print(f"lctrain eval position-loss: error: {err}", file=sys.stderr)
        return 2
    finally:
        runtime.stop()
    return 0


def _nan_to_none(values: list[float]) -> list:
    return [None if v != v else v for v in values]


def write_outputs(out: Path, results: list[dict], *, seq_len: int, data: str, bins_per_decade: int, parallel: dict,
                  num_windows: int) -> list[Path]:
    from .plots import loss_curves

    out.mkdir(parents=True, exist_ok=True)
    report = {
        "seq_len": seq_len, "data": data, "num_windows": num_windows, "parallel": parallel,
        "position": "1-based: position p is the loss of predicting token p+1 from the p tokens before it",
        "smoothing": f"token-weighted mean over log-spaced position bins, {bins_per_decade} per decade "
                     "(edges 10^(i/k) rounded to whole positions), plotted at the geometric mean of each bin's ends",
        "checkpoints": results,
    }
    paths = [out / "position_loss.json", out / "position_loss.csv", out / "position_loss_smoothed.csv",
             out / "position_loss.png"]
    paths[0].write_text(json.dumps(report))
    with paths[1].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "position", "mean_loss", "count"])
        for r in results:
            for p, (m, c) in enumerate(zip(r["per_position"]["mean"], r["per_position"]["count"]), 1):
                w.writerow([r["label"], p, "" if m is None else f"{m:.6f}", c])
    with paths[2].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "position", "first", "last", "loss", "tokens"])
        for r in results:
            s = r["smoothed"]
            for row in zip(s["position"], s["first"], s["last"], s["loss"], s["tokens"]):
                w.writerow([r["label"], f"{row[0]:.2f}", row[1], row[2], f"{row[3]:.6f}", row[4]])
    curves = [(r["label"], r["smoothed"]["position"], r["smoothed"]["loss"]) for r in results]
    loss_curves(paths[3], curves, f"next-token loss by position: seq_len {seq_len}, data {Path(data).name or data}, "
                                  f"{num_windows} windows\nmean over {bins_per_decade} log-spaced bins per decade; "
                                  "dotted: training length",
                train_lengths=[r.get("train_seq_len") for r in results])
    for r in results:
        print(f"  {r['label']}: mean loss {r['mean_loss']:.4f}")
    print(f"lctrain eval position-loss: wrote {', '.join(str(p) for p in paths)}", flush=True)
    return paths
