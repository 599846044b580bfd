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
  entry/exit and where the gradient reaches each block's output and input, summed over all the
  step's micro-batches and printed per micro-batch; the backward of a block includes its
  recomputation under checkpointing. Head + loss (last block's output to its gradient), the rest of
  the micro-batches (embedding, its backward), and per step the gradient reduction + clipping, the
  optimizer and what remains.
- `--profile [DIR]`: one more (untimed) step under torch.profiler: the top 30 GPU kernels by total
  time with their call counts, the time by kind of kernel (GEMM, the mixers' Triton kernels, flex
  attention, eager elementwise, copies, ...) and the GPU's idle time; the table and the chrome trace
  go to DIR (default: the --json's folder).

`--activation-memory` instead measures what one block of each kind keeps for its backward, per token
(saved tensors, through torch.autograd.graph.saved_tensors_hooks, at two lengths so that weights and
other length-independent tensors cancel), split into norm1 + mixer and norm2 + MLP: the numbers that
decide which blocks to checkpoint and whether the MLP needs chunks (docs/long_context.md).

`--lengths L1 L2 ...` instead runs one training step per data.seq_len, increasing, and stops at the
first that runs out of memory: the longest context one step runs at, with its peak memory. Its `--json`
is rewritten after every length (marked `"partial": true` until the search ends; a kill during a longer
length keeps the shorter ones), and `--time-limit S` starts no new length after S seconds.
`--json PATH` writes the result, `--record [MD]` appends it to BENCHMARKS.md (lctrain.bench.report).
Runs on CPU too (tiny recipes; no MFU or GPU memory there). Under parallel.cp/tp > 1 it launches
its own ranks like `lctrain train` does.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from lctrain.bench.report import Clock, result_dict, time_limit_seconds, utc_date, write_json, write_partial

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
    p.add_argument("--time-limit", type=time_limit_seconds, default=None, metavar="S",
                   help="--lengths: start no new length after S seconds (every rank stops at the same one; the "
                        "notes name the lengths not run)")
    p.add_argument("--no-split", action="store_true", help="skip the per-layer-kind timing step")
    p.add_argument("--profile", nargs="?", const=True, default=None, metavar="DIR",
                   help="one more step under torch.profiler: prints the top 30 GPU kernels (time, calls) and the "
                        "time by kind of kernel; writes profile_kernels.txt and profile_trace.json.gz to DIR "
                        "(default: the --json's folder, else the current one)")
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
                                           ("--no-split", args.no_split), ("--profile", args.profile is not None))
                  if given]
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
    if args.time_limit is not None and not args.lengths:
        p.error("--time-limit stops the --lengths search between lengths; a timed run or --activation-memory is "
                "one case")
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
        write_json(result, args.json)
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
    """Forward and backward time of every block, summed by layer kind over ALL micro-batches of a step,
    plus the rest of each micro-batch and the step's gradient finishing and optimizer (module docstring).

    `attach(trainer)` wraps the trainer's compute_loss (a micro-batch's forward starts: the forward
    hooks count again), finish_gradients (reduction + clipping) and optimizer_step, so each span is
    timed where it happens. Forward: pre-hook / hook on each block, ignored while the backward runs
    (those are checkpoint recomputations, counted in the backward). Backward of block i: from the
    gradient reaching its output to the gradient reaching its input (tensor hooks). Each hook fires
    once per micro-batch, and the k-th start is paired with the k-th end."""

    def __init__(self, model, device):
        self.model, self.clock = model, _Clock(device)
        self.handles, self.marks, self.in_backward = [], [], False
        self._patched: list[tuple[object, str]] = []
        for i, block in enumerate(model.blocks):
            self.handles.append(block.register_forward_pre_hook(self._pre(i)))
            self.handles.append(block.register_forward_hook(self._post(i)))

    def attach(self, trainer) -> "LayerTimer":
        """Time the trainer's micro-batches and its gradient / optimizer phases (undone by `remove`)."""
        for name, what in (("compute_loss", "micro"), ("finish_gradients", "grads"), ("optimizer_step", "optim")):
            original = getattr(trainer, name)

            def wrapped(*args, _original=original, _what=what, **kw):
                if _what == "micro":
                    self.in_backward = False  # a new micro-batch's forward
                self.marks.append((_what + "_start", -1, self.clock.mark()))
                out = _original(*args, **kw)
                if _what != "micro":  # a micro-batch ends after its backward: the next start or "grads" closes it
                    self.marks.append((_what + "_end", -1, self.clock.mark()))
                return out

            setattr(trainer, name, wrapped)
            self._patched.append((trainer, name))
        return self

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
        """Sums over the step's micro-batches, in ms: {'fwd': {kind: ms}, 'bwd': {kind: ms},
        'head_loss': ms (last block's output to its gradient: final norm, head, loss), 'micro_rest': ms
        (the rest of the micro-batches: embedding, its backward, loss bookkeeping), 'micro_batches': n,
        'gradients': ms (reduction + clipping), 'optimizer': ms (AdamW, LR schedule, zeroing),
        'other': ms (step minus all of these), 'step': ms}."""
        end = self.clock.mark()
        if self.clock.cuda:
            import torch

            torch.cuda.synchronize()
        spans: dict = {}
        for what, i, t in self.marks:
            spans.setdefault((what, i), []).append(t)

        def total(start, stop) -> float:
            return sum(self.clock.ms(a, b) for a, b in zip(spans.get(start, []), spans.get(stop, [])))

        fwd, bwd = {}, {}
        pattern = self.model.pattern
        for i, kind in enumerate(pattern):
            fwd[kind] = fwd.get(kind, 0.0) + total(("fwd_start", i), ("fwd_end", i))
            bwd[kind] = bwd.get(kind, 0.0) + total(("bwd_start", i), ("bwd_end", i))
        last = len(pattern) - 1
        head = total(("fwd_end", last), ("bwd_start", last))
        # micro-batch k runs from its start to the next one's (or to the gradient phase)
        starts = spans.get(("micro_start", -1), [])
        bounds = starts[1:] + spans.get(("grads_start", -1), [end])[:1]
        micro = sum(self.clock.ms(a, b) for a, b in zip(starts, bounds))
        grads = total(("grads_start", -1), ("grads_end", -1))
        optim = total(("optim_start", -1), ("optim_end", -1))
        step = self.clock.ms(spans[("step_start", -1)][0], end)
        blocks = sum(fwd.values()) + sum(bwd.values())
        return {"fwd": fwd, "bwd": bwd, "head_loss": head, "micro_rest": micro - blocks - head,
                "micro_batches": len(starts), "gradients": grads, "optimizer": optim,
                "other": step - micro - grads - optim, "step": step}

    def remove(self):
        for h in self.handles:
            h.remove()
        for obj, name in self._patched:
            delattr(obj, name)  # back to the class's method
        self._patched = []


def split_text(split: dict) -> str:
    """'per micro-batch (n): G fwd/bwd, S fwd/bwd, head+loss, rest; per step: gradients, optimizer, other'."""
    n = max(1, split.get("micro_batches", 1))
    kinds = sorted(set(split["fwd"]) | set(split["bwd"]))
    parts = [f"{k} {split['fwd'].get(k, 0) / n:.0f}/{split['bwd'].get(k, 0) / n:.0f}" for k in kinds]
    parts.append(f"head+loss {split['head_loss'] / n:.0f}")
    parts.append(f"rest {split['micro_rest'] / n:.0f}")
    return (f"per micro-batch (mean of {n}): " + ", ".join(parts)
            + f"; per step: gradients (reduce + clip) {split['gradients']:.0f}, optimizer {split['optimizer']:.0f}, "
              f"other {split['other']:.0f}, step {split['step']:.0f}")


# ------------------------------------------------------------------------------------------ profile

# kernel name patterns -> what they are (first match wins); the mixers' Triton kernels are ours
KERNEL_CATEGORIES = [
    ("communication (NCCL)", ("nccl",)),
    ("mixer kernels (Triton, lctrain.kernels)", ("state_fwd_kernel", "state_bwd_kernel", "dqk_kernel",
                                                 "wy_solve_kernel", "wy_apply_kernel", "wy_bwd_kernel",
                                                 "output_fwd_kernel", "dv_local_kernel", "_chunk_stats_kernel")),
    ("short conv (Triton, lctrain.kernels.short_conv)", ("conv_fwd_kernel", "conv_dpre_kernel", "conv_dx_kernel")),
    ("RMS / L2 norms (Triton, lctrain.kernels.rms_norm)", ("row_norm_fwd_kernel", "row_norm_bwd_kernel")),
    ("SwiGLU activation (Triton, lctrain.kernels.swiglu)", ("swiglu_fwd_kernel", "swiglu_bwd_kernel")),
    ("RoPE (Triton, lctrain.kernels.rope)", ("rope_kernel",)),
    ("flex attention", ("flex", "triton_tem_fused")),
    ("compiled fused (inductor)", ("triton_poi_", "triton_red_", "triton_per_")),
    ("matmul (GEMM)", ("gemm", "cutlass", "xmma", "nvjet", "wgmma", "cublas", "sm90_", "sm80_")),
    ("conv (cuDNN / native)", ("conv", "cudnn", "depthwise")),
    ("optimizer", ("multi_tensor_apply", "adam")),
    ("softmax / cross-entropy", ("softmax", "nll_loss", "cross_entropy")),
    ("reduction (eager)", ("reduce_kernel",)),
    ("copy / cast / cat (eager)", ("copy", "memcpy", "memset", "catarray", "cat_")),
    ("elementwise (eager)", ("elementwise", "vectorized", "unrolled")),
]


def kernel_category(name: str) -> str:
    low = name.lower()
    for category, patterns in KERNEL_CATEGORIES:
        if any(p in low for p in patterns):
            return category
    return "other"


def _event_time_us(evt, cuda: bool) -> float:
    if not cuda:
        return float(evt.self_cpu_time_total)
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(evt, attr):
            return float(getattr(evt, attr))
    return 0.0


def kernel_rows(prof, cuda: bool) -> list[dict]:
    """[{name, category, count, total_ms}] from a finished torch.profiler run, largest first: the GPU
    kernels (CUDA), or the CPU ops by self time (CPU, where there are no kernels)."""
    from torch.autograd import DeviceType

    rows = []
    for evt in prof.key_averages():
        on_device = getattr(evt, "device_type", DeviceType.CPU) == DeviceType.CUDA
        if on_device != cuda:
            continue
        if cuda and (getattr(evt, "is_user_annotation", False) or evt.key.startswith("Optimizer.")):
            continue  # a range on the GPU timeline around kernels listed on their own (AdamW.step's)
        ms = _event_time_us(evt, cuda) / 1e3
        if ms > 0:
            rows.append({"name": evt.key, "category": kernel_category(evt.key) if cuda else "cpu op",
                         "count": int(evt.count), "total_ms": ms})
    return sorted(rows, key=lambda r: -r["total_ms"])


def kernel_table(rows: list[dict], top: int = 30) -> str:
    """Text table: the top kernels (total ms, % of all kernel time, calls, mean us) and the time by category."""
    total = sum(r["total_ms"] for r in rows) or 1.0
    lines = [f"{'total ms':>10} {'%':>6} {'calls':>7} {'mean us':>9}  kernel"]
    for r in rows[:top]:
        lines.append(f"{r['total_ms']:10.2f} {100 * r['total_ms'] / total:6.1f} {r['count']:7d} "
                     f"{1e3 * r['total_ms'] / r['count']:9.1f}  {r['name'][:120]}")
    by_cat: dict[str, list] = {}
    for r in rows:
        c = by_cat.setdefault(r["category"], [0.0, 0])
        c[0] += r["total_ms"]
        c[1] += r["count"]
    lines.append("")
    lines.append(f"{'total ms':>10} {'%':>6} {'calls':>7}  category")
    for cat, (ms, n) in sorted(by_cat.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"{ms:10.2f} {100 * ms / total:6.1f} {n:7d}  {cat}")
    lines.append(f"{total:10.2f} {100.0:6.1f} {sum(r['count'] for r in rows):7d}  all")
    return "\n".join(lines)


def _profile_dir(args) -> Path:
    """--profile DIR, else the --json's folder, else the current one."""
    if isinstance(args.profile, str):
        return Path(args.profile)
    return Path(args.json).parent if args.json else Path(".")


def profile_step(bench, seq_len: int, out_dir: Path, say, top: int = 30) -> dict | None:
    """One optimizer step (all its micro-batches, gradient reduction, optimizer) under torch.profiler.
    Prints the top `top` kernels by total GPU time with their call counts and the time by kind of
    kernel; writes the table (profile_kernels.txt) and the chrome trace (profile_trace.json.gz, open it
    in https://ui.perfetto.dev) to out_dir (main rank). Returns the summary (None off the main rank)."""
    import gzip
    import shutil

    from torch.profiler import ProfilerActivity, profile

    cuda = bench.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    bench.sync()
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        bench.step(seq_len)
        bench.sync()
    wall_ms = (time.perf_counter() - t0) * 1e3
    if not _is_main():
        return None
    rows = kernel_rows(prof, cuda)
    busy = sum(r["total_ms"] for r in rows)
    what = "GPU kernels" if cuda else "CPU ops (self time; no GPU)"
    head = (f"profile of one step ({what}): step {wall_ms:.0f} ms wall under the profiler, "
            f"{busy:.0f} ms of {'kernel' if cuda else 'op'} time"
            + (f" (GPU idle ~{max(0.0, wall_ms - busy):.0f} ms: launch gaps, host work, syncs)" if cuda else ""))
    table = head + "\n" + kernel_table(rows, top)
    say(table, flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "profile_kernels.txt").write_text(table + "\n")
    trace = out_dir / "profile_trace.json"
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as src, gzip.open(str(trace) + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    trace.unlink()
    say(f"lctrain bench train: wrote {out_dir / 'profile_kernels.txt'} and {trace}.gz", flush=True)
    categories: dict[str, float] = {}
    for r in rows:
        categories[r["category"]] = categories.get(r["category"], 0.0) + r["total_ms"]
    return {"wall_ms": wall_ms, "busy_ms": busy, "device": "cuda" if cuda else "cpu", "top": rows[:top],
            "categories_ms": categories, "table": str(out_dir / "profile_kernels.txt"),
            "trace": f"{trace}.gz"}


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


def _reset_host_peak(device):
    import torch

    if device.type == "cuda" and hasattr(torch.cuda, "reset_peak_host_memory_stats"):
        torch.cuda.reset_peak_host_memory_stats()


def _host_pinned_gib(device) -> float | None:
    """Peak pinned host memory of the caching host allocator (model.checkpoint_offload's copies), if known."""
    import torch

    if device.type != "cuda" or not hasattr(torch.cuda, "host_memory_stats"):
        return None
    stats = torch.cuda.host_memory_stats()
    for key in ("allocated_bytes.peak", "allocated_bytes.all.peak", "reserved_bytes.peak"):
        if key in stats:
            return stats[key] / 2**30
    return None


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
            result = _length_search(bench, args, recipe, command)
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
    if m.checkpoint_offload:
        extra.append("offload")
    if cfg.train.loss_chunk_tokens:
        extra.append(f"loss chunk {cfg.train.loss_chunk_tokens}")
    if m.get("compile"):
        extra.append("compile")
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
        timer = LayerTimer(bench.model, device).attach(bench.trainer)
        try:
            timer.start()
            bench.step(T)
            split = timer.stop()
        finally:
            timer.remove()
    profile = None
    if args.profile:
        profile = profile_step(bench, T, _profile_dir(args), say)
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
        say(f"time split (ms; fwd/bwd by layer kind, bwd includes checkpoint recomputation): {split_text(split)}",
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
            "time_split_ms": split, "profile": profile, "losses": losses, "parameters": n_params}


def _lengths_result(recipe, rows, longest, device) -> dict:
    return {"title": f"Longest context of one training step: {Path(recipe).stem if recipe else 'default'}",
            "notes": ["one optimizer step per length (forward, backward, AdamW), synthetic tokens; the first length "
                      "includes kernel compilation; the search stops at the first out-of-memory"],
            "columns": LENGTH_COLUMNS, "rows": rows, "longest_seq_len": longest[0] if longest else None,
            "longest_peak_gib": longest[1] if longest and device.type == "cuda" else None}


def _length_search(bench, args, recipe, command="lctrain bench train") -> dict | None:
    import torch

    cfg, device = bench.cfg, bench.device
    say = print if _is_main() else (lambda *a, **k: None)
    rows, longest, lengths = [], None, sorted(args.lengths)
    clock = Clock(args.time_limit, "bench train", rank=0 if _is_main() else 1, device=device)
    notes = []
    for i, T in enumerate(lengths):
        if clock.out_of_time():  # the same answer on every rank (the largest elapsed time)
            notes = clock.not_run_note([str(n) for n in lengths[i:]])
            say(notes[0], flush=True)
            break
        _reset_peak(device)
        bench.sync()
        t0 = time.perf_counter()
        _reset_host_peak(device)
        why = ""
        try:
            bench.step(T)
            bench.sync()
            ok = 1.0
        except (torch.OutOfMemoryError, RuntimeError) as err:  # cudaHostAlloc failing (offload) is a RuntimeError
            if not isinstance(err, torch.OutOfMemoryError) and "out of memory" not in str(err).lower():
                raise
            ok, why = 0.0, str(err).splitlines()[0][:200]
        seconds = time.perf_counter() - t0
        host = _host_pinned_gib(device)
        bench.drop_gradients()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            # the pinned blocks model.checkpoint_offload took: cached for reuse by the caching host
            # allocator, but never by a LONGER step; without this the search holds 24 + 48 + 72 GiB
            # of pinned host memory by 786K and the host runs out
            empty_host = getattr(torch._C, "_host_emptyCache", None)
            if empty_host is not None:
                empty_host()
        # every rank must agree: one rank's OOM ends the search for all
        ok = -bench.reduce_max([-ok])[0]
        seconds, peak = bench.reduce_max([seconds, _peak_gib(device) or 0.0])
        result = "ok" if ok else "out of memory"
        peak_text = f", peak {peak:.2f} GiB per GPU" if device.type == "cuda" else ""
        if host:
            peak_text += f", pinned host {host:.1f} GiB"
        say(f"seq_len {T}: {result}, {seconds:.2f}s" + peak_text + (f" ({why})" if why else ""), flush=True)
        rows.append([Path(recipe).name if recipe else "default", T, _world_text(bench), _checkpointing_text(cfg),
                     result,
                     round(seconds, 3), round(peak, 2) if device.type == "cuda" else None])
        if ok:
            longest = (T, peak)
        if _is_main() and ok and len(rows) < len(lengths):
            # so far, in case a later length kills the process (not an OOM, which ends the search here): a
            # complete result (recordable by `lctrain bench record`), marked partial
            partial = _lengths_result(recipe, rows, longest, device)
            partial.update(command=command, device=_device_name(device), versions=_versions(), date=utc_date())
            write_partial(partial, args.json, len(rows), len(lengths), "lengths")
        if not ok:
            break
    if not _is_main():
        return None
    say(f"lctrain bench train: longest context one step ran at: {longest[0] if longest else 'none'}"
        + (f" (peak {longest[1]:.2f} GiB per GPU)" if longest and device.type == "cuda" else ""), flush=True)
    result = _lengths_result(recipe, rows, longest, device)
    result["notes"] += notes
    return result
