"""`lctrain bench train RECIPE [key=value ...] --steps N`: real training steps on synthetic tokens.

Runs the steps of `lctrain train` (its `Trainer`, on the recipe's mesh, without the loader), feeds uniformly
random token ids (the speed and memory of a step do not depend on the text), runs `--warmup` untimed
steps and then `--steps` timed ones, and reports:

- tokens/s: global tokens per optimizer step (micro_batch_size x seq_len x grad_accum x dp) over the
  mean step time (the slowest rank's, wall clock, device synchronised);
- MFU: model FLOPs per step / step time / (--peak-tflops x GPUs). Model FLOPs (what the model needs,
  recomputation by activation checkpointing is NOT counted, so checkpointing lowers MFU):
    dense    6 x P_matmul x tokens, P_matmul = parameters of every nn.Linear (LM head included, the
             embedding lookup excluded) + the short convs' weights;
    attention per S/A layer 12 x heads x head_dim x keys_per_query summed over the queries
             (3 x the forward's 2 matmuls of 2 flops per multiply-add; causal: (t+1) keys for query t,
             sliding window: min(t+1, window));
    mixers   per G/D/M layer 3 x forward, forward per token and head of the chunkwise algorithm with
             chunk C, Dk = Dv = head_dim: delta rules 2 x (3 Dk Dv + C (3 Dk + 2 Dv)) (state read,
             state update, delta correction; in-chunk scores, WY/UT weights, outputs),
             gated linear attention (Mamba-2 style) 2 x (2 Dk Dv + C (Dk + Dv)).
- peak memory per GPU: torch.cuda.max_memory_allocated over the timed steps (each rank; the max);
- time split by layer kind: one extra (untimed) step with CUDA events at every block's forward
  entry/exit and where the gradient reaches each block's output and input; the backward of a block
  includes its recomputation under checkpointing. Head + loss, and the rest (embedding, gradient
  reduction, clipping, optimizer) are the remainder.

`--activation-memory` instead measures what one block of each kind keeps for its backward, per token
(saved tensors, through torch.autograd.graph.saved_tensors_hooks, at two lengths so that weights and
other length-independent tensors cancel), split into norm1 + mixer and norm2 + MLP: the numbers that
decide which blocks to checkpoint and whether the MLP needs chunks (docs/long_context.md).

`--lengths L1 L2 ...` instead runs one training step per data.seq_len, increasing, and stops at the
first that runs out of memory: the longest context one step runs at, with its peak memory.
`--json PATH` writes the result, `--record [MD]` appends it to BENCHMARKS.md (lctrain.bench.report).
Runs on CPU too (tiny recipes; no MFU or GPU memory there). Under parallel.cp/tp > 1 it launches
its own ranks like `lctrain train` does.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from lctrain.bench.report import result_dict, utc_date

DEFAULT_PEAK_TFLOPS = 989.0  # H100 / H200 SXM dense bf16 tensor-core peak
COLUMNS = ["recipe", "seq_len", "world (dp x cp)", "checkpointing", "tokens/s", "MFU %", "model TFLOP/s per GPU",
           "step s", "peak GiB per GPU", "fwd/bwd ms by layer kind"]
LENGTH_COLUMNS = ["recipe", "seq_len", "world (dp x cp)", "checkpointing", "result", "step s", "peak GiB per GPU"]


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lctrain bench train", description=__doc__.split("\n\n")[0],
                                epilog="example: lctrain bench train recipes/gdn_h1_1p3b.yaml data.seq_len=32768 "
                                       "--steps 10")
    p.add_argument("args", nargs="*", help="an optional recipe YAML, then key=value overrides (as lctrain train)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (default 5)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first (kernel compilation, allocator; default 2)")
    p.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS,
                   help=f"peak dense TFLOP/s of one GPU for MFU (default {DEFAULT_PEAK_TFLOPS:g}: H100/H200 bf16)")
    p.add_argument("--lengths", type=int, nargs="+", metavar="SEQ_LEN",
                   help="instead of timing: one step per seq_len (increasing) until one runs out of memory")
    p.add_argument("--no-split", action="store_true", help="skip the per-layer-kind timing step")
    p.add_argument("--activation-memory", action="store_true",
                   help="instead of timing: KB per token each block kind keeps for the backward (mixer, MLP)")
    p.add_argument("--json", metavar="PATH", help="write the result as JSON here")
    p.add_argument("--record", nargs="?", const="BENCHMARKS.md", metavar="MD",
                   help="append the result to BENCHMARKS.md (or MD)")
    args = p.parse_args(argv)
    other_mode = "--lengths" if args.lengths else "--activation-memory" if args.activation_memory else None
    if args.lengths and args.activation_memory:
        p.error("--lengths and --activation-memory are two different runs; give one")
    if other_mode:
        timing = [flag for flag, given in (("--steps", args.steps is not None), ("--warmup", args.warmup is not None),
                                           ("--no-split", args.no_split)) if given]
        if timing:
            p.error(f"{timing[0]} times steps, which {other_mode} does not; leave it out")
    args.steps = 5 if args.steps is None else args.steps
    args.warmup = 2 if args.warmup is None else args.warmup
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.peak_tflops <= 0:
        p.error("--peak-tflops must be positive")
    if args.lengths and any(n < 2 for n in args.lengths):
        p.error("--lengths: every seq_len must be >= 2")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    from lctrain.config import ConfigError, load_config, split_recipe_and_overrides, world_size_needed

    try:
        recipe, overrides = split_recipe_and_overrides(args.args)
        cfg = load_config(recipe, overrides)
        for n in args.lengths or ():
            load_config(recipe, [*overrides, f"data.seq_len={n}"])  # every length valid before any work
    except ConfigError as err:
        print(f"lctrain bench train: configuration error: {err}", file=sys.stderr)
        return 2
    import torch

    if cfg.parallel.pp > 1:
        print("lctrain bench train: parallel.pp > 1 is not measured here (its FLOP count and layer split see one "
              "stage); use `lctrain bench layouts RECIPE --layouts pp=2`, which times `lctrain train`", file=sys.stderr)
        return 2
    if args.activation_memory:
        if world_size_needed(cfg) > 1:
            print("lctrain bench train: --activation-memory measures one block in one process; leave parallel.* at 1 "
                  "(the per-token numbers do not depend on it)", file=sys.stderr)
            return 2
        return _write(_activation_memory(cfg, recipe, "lctrain bench train " + " ".join(argv)), args)
    nproc = world_size_needed(cfg)
    if "WORLD_SIZE" not in os.environ and nproc > 1:
        use_cuda = cfg.train.device != "cpu" and torch.cuda.is_available()
        if use_cuda and nproc > torch.cuda.device_count():
            print(f"lctrain bench train: configuration error: parallel needs {nproc} processes but this node has "
                  f"{torch.cuda.device_count()} GPUs; lower parallel.cp/tp", file=sys.stderr)
            return 2
        from lctrain.local_launch import self_launch

        return self_launch(["bench", "train"], argv, nproc, use_cuda)
    result = run(cfg, args, recipe=recipe, command="lctrain bench train " + " ".join(argv))
    if result is None:  # not the main rank
        return 0
    return _write(result, args)


def _write(result: dict, args) -> int:
    """--json and --record of a finished result."""
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"lctrain bench train: wrote {args.json}")
    if args.record:
        from lctrain.bench.report import append_to_benchmarks_md

        append_to_benchmarks_md(result, args.record)
        print(f"lctrain bench train: recorded in {args.record}")
    return 0


# ------------------------------------------------------------------------------------------ activation memory

def saved_kib_per_token(cfg, device, lengths=(128, 256)) -> dict:
    """{kind: {"mixer": KiB, "mlp": KiB, "block": KiB}}: what one block of each kind of cfg's pattern
    saves for its backward per token (norm1 + mixer, norm2 + MLP, the whole block), under the
    training dtype's autocast with the residual stream in model.residual_dtype."""
    import torch

    from lctrain.models.hybrid import Block
    from lctrain.models.rope import RotaryEmbedding
    from lctrain.train.device import pick_dtype

    m = cfg.model
    dtype = pick_dtype(cfg.train, device)
    residual = dtype if (m.residual_dtype == "compute" and dtype != torch.float32) else torch.float32
    rope = RotaryEmbedding(m.attn_head_dim, float(m.rope.base), "none", 1.0, 0)

    def saved_bytes(fn, x) -> int:
        storages = {}  # data_ptr -> (bytes, tensor): holding the tensor keeps its address from being reused

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn(x)
        del out
        return sum(n for n, _ in storages.values())

    out = {}
    for kind in sorted(set(m.layer_pattern if isinstance(m.layer_pattern, str) else "".join(m.layer_pattern))):
        torch.manual_seed(0)
        block = Block(kind, m, rope).to(device)
        # used only within this iteration, so the closures' late binding of `block` is harmless
        parts = {"mixer": lambda x: block.mixer(block.norm1(x)),  # noqa: B023
                 "mlp": lambda x: block.mlp(block.norm2(x)),  # noqa: B023
                 "block": lambda x: block(x)}  # noqa: B023
        out[kind] = {}
        for name, fn in parts.items():
            sizes = []
            for T in lengths:
                x = torch.randn(1, T, m.d_model, device=device, dtype=residual, requires_grad=True)
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    sizes.append(saved_bytes(fn, x))
            out[kind][name] = (sizes[1] - sizes[0]) / (lengths[1] - lengths[0]) / 1024
    return out


def _activation_memory(cfg, recipe, command) -> dict:
    from lctrain.train.device import pick_device

    device = pick_device(cfg.train)
    kib = saved_kib_per_token(cfg, device)
    m = cfg.model
    rows = [[kind, round(v["mixer"], 1), round(v["mlp"], 1), round(v["block"], 1),
             round(v["block"] * 1e6 * 1024 / 2**30, 1)] for kind, v in kib.items()]
    for row in rows:
        print(f"{row[0]}: norm1+mixer {row[1]} KiB, norm2+MLP {row[2]} KiB, block {row[3]} KiB per token "
              f"({row[4]} GiB per 1M tokens)", flush=True)
    return result_dict(
        f"Activations saved for the backward: {Path(recipe).stem if recipe else 'default'}",
        command, _device_name(device), _versions(),
        [f"d_model {m.d_model}, heads {m.n_heads} x {m.head_dim}, attention {m.attn_heads} x {m.attn_head_dim}, "
         f"kernel backend {m.kernel_backend}, residual {m.residual_dtype}; per token, without checkpointing"],
        ["layer kind", "norm1 + mixer KiB/token", "norm2 + MLP KiB/token", "block KiB/token",
         "block GiB per 1M tokens"],
        rows, kib_per_token=kib)


# ------------------------------------------------------------------------------------------ FLOPs

def model_flops_per_step(model, cfg, tokens_per_seq: int, sequences: int) -> dict:
    """Training FLOPs of one optimizer step (module docstring): {'dense', 'attention', 'mixer', 'total'}."""
    from torch import nn

    from lctrain.models.layers import ShortConv

    m = cfg.model
    matmul_params = sum(mod.weight.numel() for mod in model.modules() if isinstance(mod, (nn.Linear, ShortConv)))
    tokens = tokens_per_seq * sequences
    dense = 6.0 * matmul_params * tokens
    attention = mixer = 0.0
    T = tokens_per_seq
    for kind in model.pattern:
        if kind in "SA":
            w = T if kind == "A" else min(int(m.window), T)
            # sum over t of min(t+1, w) = w(w+1)/2 + (T-w) w
            keys = w * (w + 1) / 2 + (T - w) * w
            attention += 12.0 * m.attn_heads * m.attn_head_dim * keys * sequences
        else:
            D, C = int(m.head_dim), int(m.chunk_size)
            fwd = 2 * (3 * D * D + C * 5 * D) if kind in "GD" else 2 * (2 * D * D + C * 2 * D)
            mixer += 3.0 * fwd * m.n_heads * tokens
    return {"dense": dense, "attention": attention, "mixer": mixer, "total": dense + attention + mixer,
            "matmul_params": matmul_params}


# ------------------------------------------------------------------------------------------ timing

class _Clock:
    """CUDA events on a GPU (no synchronisation inside the step), perf_counter on CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            import torch

            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3


class LayerTimer:
    """Forward and backward time of every block, summed by layer kind (module docstring).

    Forward: pre-hook / hook on each block, ignored while the backward runs (those are checkpoint
    recomputations, counted in the backward). Backward of block i: from the gradient reaching its
    output to the gradient reaching its input (tensor hooks)."""

    def __init__(self, model, device):
        self.model, self.clock = model, _Clock(device)
        self.handles, self.marks, self.in_backward = [], [], False
        for i, block in enumerate(model.blocks):
            self.handles.append(block.register_forward_pre_hook(self._pre(i)))
            self.handles.append(block.register_forward_hook(self._post(i)))

    def _pre(self, i):
        def hook(module, args):
            if self.in_backward:
                return
            self.marks.append(("fwd_start", i, self.clock.mark()))
            x = args[0]
            if x.requires_grad:
                x.register_hook(lambda g: self._record("bwd_end", i, g))
        return hook

    def _post(self, i):
        def hook(module, args, out):
            if self.in_backward:
                return
            self.marks.append(("fwd_end", i, self.clock.mark()))
            if out.requires_grad:
                out.register_hook(lambda g: self._record("bwd_start", i, g))
        return hook

    def _record(self, what, i, grad):
        self.in_backward = True
        self.marks.append((what, i, self.clock.mark()))

    def start(self):
        self.marks, self.in_backward = [], False
        self.marks.append(("step_start", -1, self.clock.mark()))

    def stop(self) -> dict:
        """Sums in ms: {'fwd': {kind: ms}, 'bwd': {kind: ms}, 'head_loss': ms, 'other': ms, 'step': ms}."""
        end = self.clock.mark()
        if self.clock.cuda:
            import torch

            torch.cuda.synchronize()
        first = {}
        for what, i, t in self.marks:
            first.setdefault((what, i), t)  # a tensor hook may fire once per micro-batch; take each span once
        fwd, bwd = {}, {}
        pattern = self.model.pattern
        for i, kind in enumerate(pattern):
            if ("fwd_start", i) in first and ("fwd_end", i) in first:
                fwd[kind] = fwd.get(kind, 0.0) + self.clock.ms(first["fwd_start", i], first["fwd_end", i])
            if ("bwd_start", i) in first and ("bwd_end", i) in first:
                bwd[kind] = bwd.get(kind, 0.0) + self.clock.ms(first["bwd_start", i], first["bwd_end", i])
        last = len(pattern) - 1
        head = 0.0
        if ("fwd_end", last) in first and ("bwd_start", last) in first:
            head = self.clock.ms(first["fwd_end", last], first["bwd_start", last])
        step = self.clock.ms(first["step_start", -1], end)
        return {"fwd": fwd, "bwd": bwd, "head_loss": head, "other": step - head - sum(fwd.values()) - sum(bwd.values()),
                "step": step}

    def remove(self):
        for h in self.handles:
            h.remove()


def split_text(split: dict) -> str:
    kinds = sorted(set(split["fwd"]) | set(split["bwd"]))
    parts = [f"{k} {split['fwd'].get(k, 0):.0f}/{split['bwd'].get(k, 0):.0f}" for k in kinds]
    parts.append(f"head+loss {split['head_loss']:.0f}")
    parts.append(f"other {split['other']:.0f}")
    return ", ".join(parts)


# ------------------------------------------------------------------------------------------ the run

class _Bench:
    """The training step of `lctrain train` (a `Trainer` without its loader) fed synthetic tokens."""

    def __init__(self, cfg, device):
        import torch

        from lctrain.parallel import mesh
        from lctrain.train.trainer import Trainer

        self.cfg, self.device = cfg, device
        self.trainer = Trainer(cfg, device, data=False)
        tr = self.trainer
        self.model, self.params, self.dtype = tr.model, tr.params, tr.dtype
        self.cp_rank, self.cp_size, self.dp_size = tr.cp_rank, tr.cp_size, tr.dp_size
        self.gen = torch.Generator(device="cpu").manual_seed(cfg.data.seed + 1000 * mesh.dp_rank())

    def batch(self, seq_len: int) -> dict:
        """Synthetic `input_ids` / `labels` of this rank's shard: the same sample on every CP rank."""
        import torch

        B, V = self.cfg.data.micro_batch_size, self.cfg.model.vocab_size
        tokens = torch.randint(0, V, (B, seq_len + 1), generator=self.gen)
        local = seq_len // self.cp_size
        sl = slice(self.cp_rank * local, (self.cp_rank + 1) * local)
        return {"input_ids": tokens[:, :-1][:, sl], "labels": tokens[:, 1:][:, sl]}

    def step(self, seq_len: int) -> float:
        """One optimizer step of train.grad_accum micro-batches (Trainer.step); returns the mean loss."""
        return self.trainer.step([self.batch(seq_len) for _ in range(self.cfg.train.grad_accum)]).loss

    def drop_gradients(self) -> None:
        self.trainer.optimizer.zero_grad(set_to_none=True)

    def sync(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reduce_max(self, values: list[float]) -> list[float]:
        """Element-wise max over every rank."""
        import torch
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()


def _peak_gib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _reset_peak(device):
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _versions() -> dict:
    import torch

    out = {"torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def run(cfg, args, *, recipe=None, command="lctrain bench train") -> dict | None:
    """Initialise the mesh, run the benchmark (timed steps or the length search), tear down.
    Returns the result on the main rank, None elsewhere."""
    from lctrain.parallel import mesh
    from lctrain.train.device import pick_device

    device = pick_device(cfg.train)
    mesh.init_mesh(cfg.parallel, device)
    try:
        bench = _Bench(cfg, device)
        if args.lengths:
            result = _length_search(bench, args, recipe)
        else:
            result = _timed(bench, args, recipe)
    finally:
        mesh.destroy_mesh()
    if result is None:  # not the main rank
        return None
    result.update(command=command, device=_device_name(device), versions=_versions(),
                  date=utc_date())
    return result


def _world_text(bench) -> str:
    return f"{bench.dp_size * bench.cp_size} ({bench.dp_size} x {bench.cp_size})"


def _checkpointing_text(cfg) -> str:
    m = cfg.model
    extra = [f"mlp chunk {m.mlp_chunk_tokens}"] if m.mlp_chunk_tokens else []
    if cfg.train.loss_chunk_tokens:
        extra.append(f"loss chunk {cfg.train.loss_chunk_tokens}")
    return ", ".join([str(m.activation_checkpointing), *extra])


def _is_main() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def _timed(bench, args, recipe) -> dict | None:
    cfg, device = bench.cfg, bench.device
    T = cfg.data.seq_len
    say = print if _is_main() else (lambda *a, **k: None)
    n_params = sum(p.numel() for p in bench.params)
    say(f"lctrain bench train: {n_params / 1e6:.1f}M parameters, layers {bench.model.pattern}, seq_len {T}, "
        f"world {_world_text(bench)}, {device} {str(bench.dtype).replace('torch.', '')}, checkpointing "
        f"{_checkpointing_text(cfg)}", flush=True)
    losses = []
    for i in range(args.warmup):
        t0 = time.perf_counter()
        losses.append(bench.step(T))
        bench.sync()
        say(f"warm-up step {i + 1}/{args.warmup}: {time.perf_counter() - t0:.2f}s, loss {losses[-1]:.4f}", flush=True)
    _reset_peak(device)
    times = []
    for i in range(args.steps):
        bench.sync()
        t0 = time.perf_counter()
        losses.append(bench.step(T))
        bench.sync()
        times.append(time.perf_counter() - t0)
        say(f"step {i + 1}/{args.steps}: {times[-1]:.3f}s, loss {losses[-1]:.4f}", flush=True)
    peak = _peak_gib(device)
    split = None
    if not args.no_split:
        timer = LayerTimer(bench.model, device)
        timer.start()
        bench.step(T)
        split = timer.stop()
        timer.remove()
    step_s, peak_all = bench.reduce_max([sum(times) / len(times), peak or 0.0])
    if not _is_main():
        return None
    sequences = cfg.data.micro_batch_size * cfg.train.grad_accum * bench.dp_size
    tokens = sequences * T
    flops = model_flops_per_step(bench.model, cfg, T, sequences)
    world = bench.dp_size * bench.cp_size
    tflops_per_gpu = flops["total"] / step_s / world / 1e12
    mfu = 100.0 * tflops_per_gpu / args.peak_tflops if device.type == "cuda" else None
    tps = tokens / step_s
    say(f"lctrain bench train: {tps:,.0f} tokens/s, step {step_s:.3f}s, model {tflops_per_gpu:.1f} TFLOP/s per GPU"
        + (f", MFU {mfu:.1f}% of {args.peak_tflops:g} TFLOP/s" if mfu is not None else " (CPU: no MFU)")
        + (f", peak {peak_all:.2f} GiB per GPU" if device.type == "cuda" else ""), flush=True)
    if split:
        say(f"time split (ms, fwd/bwd by layer kind; bwd includes checkpoint recomputation): {split_text(split)}",
            flush=True)
    row = [Path(recipe).name if recipe else "default", T, _world_text(bench), _checkpointing_text(cfg), round(tps, 1),
           None if mfu is None else round(mfu, 2), round(tflops_per_gpu, 3), round(step_s, 4),
           round(peak_all, 2) if device.type == "cuda" else None, split_text(split) if split else None]
    notes = [f"{args.steps} timed steps after {args.warmup} warm-up steps, synthetic tokens, "
             f"dtype {str(bench.dtype).replace('torch.', '')}, micro_batch_size {cfg.data.micro_batch_size}, "
             f"grad_accum {cfg.train.grad_accum}",
             f"MFU counts model FLOPs (lctrain/bench/train.py): 6 x {flops['matmul_params'] / 1e9:.3f}B matmul "
             "parameters x tokens "
             f"+ attention {flops['attention'] / 1e12:.1f} + linear mixers {flops['mixer'] / 1e12:.1f} TFLOP per step, "
             f"against {args.peak_tflops:g} TFLOP/s per GPU; checkpoint recomputation is not counted"]
    return {"title": f"Training step: {Path(recipe).stem if recipe else 'default'} at {T} tokens", "notes": notes,
            "columns": COLUMNS, "rows": [row], "tokens_per_s": tps, "step_s": step_s, "mfu_percent": mfu,
            "peak_tflops": args.peak_tflops, "model_flops_per_step": flops,
            "peak_gib_per_gpu": peak_all if device.type == "cuda" else None,
            "time_split_ms": split, "losses": losses, "parameters": n_params}


def _length_search(bench, args, recipe) -> dict | None:
    import torch

    cfg, device = bench.cfg, bench.device
    say = print if _is_main() else (lambda *a, **k: None)
    rows, longest = [], None
    for T in sorted(args.lengths):
        _reset_peak(device)
        bench.sync()
        t0 = time.perf_counter()
        try:
            bench.step(T)
            bench.sync()
            ok = 1.0
        except torch.OutOfMemoryError:
            ok = 0.0
        seconds = time.perf_counter() - t0
        bench.drop_gradients()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # every rank must agree: one rank's OOM ends the search for all
        ok = -bench.reduce_max([-ok])[0]
        seconds, peak = bench.reduce_max([seconds, _peak_gib(device) or 0.0])
        result = "ok" if ok else "out of memory"
        peak_text = f", peak {peak:.2f} GiB per GPU" if device.type == "cuda" else ""
        say(f"seq_len {T}: {result}, {seconds:.2f}s" + peak_text, flush=True)
        rows.append([Path(recipe).name if recipe else "default", T, _world_text(bench), _checkpointing_text(cfg),
                     result,
                     round(seconds, 3), round(peak, 2) if device.type == "cuda" else None])
        if ok:
            longest = (T, peak)
        if _is_main() and args.json:  # so far, in case a later length kills the process (not an OOM)
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"rows": rows, "longest_seq_len": longest and longest[0],
                                                   "partial": True}) + "\n")
        if not ok:
            break
    if not _is_main():
        return None
    say(f"lctrain bench train: longest context one step ran at: {longest[0] if longest else 'none'}"
        + (f" (peak {longest[1]:.2f} GiB per GPU)" if longest and device.type == "cuda" else ""), flush=True)
    return {"title": f"Longest context of one training step: {Path(recipe).stem if recipe else 'default'}",
            "notes": ["one optimizer step per length (forward, backward, AdamW), synthetic tokens; the first length "
                      "includes kernel compilation; the search stops at the first out-of-memory"],
            "columns": LENGTH_COLUMNS, "rows": rows, "longest_seq_len": longest[0] if longest else None,
            "longest_peak_gib": longest[1] if longest and device.type == "cuda" else None}
