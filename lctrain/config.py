"""Configuration: OmegaConf structured configs, YAML recipes and `key=value` overrides.

The dataclass defaults below ARE the embedded default job (`lctrain train` with no arguments): a tiny
hybrid that trains on CPU in a few minutes. Recipes in recipes/ override them; the command line
overrides the recipe. `validate` checks every cross-field rule before any work starts and names the
key and the fix in its error.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lctrain.errors import UserError

# One letter per block kind in model.layer_pattern.
LAYER_KINDS = {
    "G": "gated DeltaNet",
    "D": "DeltaNet",
    "M": "Mamba-2 style gated linear attention",
    "L": "log-linear gated DeltaNet",
    "K": "log-linear Mamba-2",
    "S": "sliding-window softmax attention",
    "A": "global softmax attention",
    "F": "Deltaformer (delta rule with a softmax kernel, then causal attention)",
}
LINEAR_LAYERS = set("GDMLK")
LOGLINEAR_LAYERS = set("LK")
ATTENTION_LAYERS = set("SAF")  # layers with attn_heads x attn_head_dim heads and RoPE
ROPE_SCALINGS = ("none", "linear", "ntk", "yarn", "rerope", "leaky_rerope")
EVAL_ONLY_SCALINGS = ("rerope", "leaky_rerope")
ROPE_LAYERS = ("all", "sliding")
KERNEL_BACKENDS = ("auto", "naive", "torch", "triton")
RESIDUAL_DTYPES = ("float32", "compute")




class ConfigError(UserError, ValueError):
    """A configuration value is wrong; the message names the key and what to change."""


class ConfigWarning(UserWarning):
    """A configuration is allowed but likely not what was meant; the message says why."""


@dataclass
class RopeConfig:
    base: float = 10000.0
    # none | linear (position interpolation) | ntk (NTK-aware base change) | yarn, and at eval time only
    # rerope | leaky_rerope (global attention: exact relative positions within rerope_window, clipped /
    # leaked by 1/factor beyond it)
    scaling: str = "none"
    factor: float = 1.0
    # the context length the base was trained for; 0 means data.seq_len
    original_max_position: int = 0
    # ReRoPE / Leaky ReRoPE window w (relative positions < w stay exact)
    rerope_window: int = 0
    # which attention layers rotate q and k: all | sliding (global "A" layers then carry no position
    # signal, "NoPE": they can only retrieve by content, which is what lets retrieval learned at short
    # distances work across the whole context; the sliding-window and recurrent layers give order)
    layers: str = "sliding"
    # share of each head's dims that rotate (partial RoPE): the first 2*round(fraction*D/2) dims; the
    # rest carry no position. 1 = all dims
    fraction: float = 1.0


@dataclass
class ModelConfig:
    vocab_size: int = 264  # byte tokenizer: 256 bytes + specials, rounded up
    d_model: int = 128
    # one letter per block: G gated DeltaNet, D DeltaNet, M Mamba-2, L log-linear gated DeltaNet,
    # K log-linear Mamba-2, S sliding-window attn, A global attn, F Deltaformer
    layer_pattern: Any = "SAGA"  # a string or a list of letters
    n_heads: int = 4  # heads of the linear-recurrent mixers
    head_dim: int = 32  # d_k = d_v of the linear-recurrent mixers
    attn_heads: int = 4
    # key/value heads of the attention layers (S, A): null = attn_heads; fewer = grouped-query
    # attention (1 = MQA), a smaller decoding KV cache
    attn_kv_heads: Optional[int] = None
    # multi-head latent attention for the global ("A") layers: keys and values from a latent of this
    # rank (0 = off) plus a decoupled RoPE part of mla_rope_dim dims shared by the heads; decoding caches
    # only the latent and the rope key (lctrain/models/mla.py)
    mla_kv_rank: int = 0
    mla_rope_dim: int = 16
    attn_head_dim: int = 32
    window: int = 128  # sliding-window attention span (tokens, including the current one)
    conv_size: int = 4  # short causal depthwise conv of the linear mixers
    # short causal conv on the attention layers' q, k, v (residual; 0 = none): keys that see the tokens
    # before them let a single attention layer act as an induction head (lctrain/models/attention.py)
    attn_conv_size: int = 4
    # which attention layers get it: all | global (only "A" layers; with it on the sliding-window
    # layers too, those learn to retrieve by position at short range and the global ones never learn
    # the long-range retrieval: docs/eval-notes.md)
    attn_conv_layers: str = "global"
    # token id that ends a packed document (the tokenizer's EOS: 257 for the byte tokenizer); when set,
    # no layer looks across it (attention masks other documents, recurrent states and short convs
    # restart), so packed documents do not see each other, at any length. null = one stream per sample.
    document_end_id: Optional[int] = 257
    mlp_ratio: float = 4.0  # SwiGLU hidden size = mlp_ratio * 2/3 * d_model, rounded up to 32
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    # activation checkpointing: none | full (every block) | selective:LETTERS (the blocks of those kinds,
    # e.g. selective:GM): a checkpointed block keeps only its input for the backward and runs its forward
    # again there (under CP the linear mixers' replay reuses the states gathered in the forward)
    activation_checkpointing: str = "none"
    # with checkpointing: keep the checkpointed blocks' inputs in pinned host memory (copied back for the
    # recomputation), so the GPU holds no per-block activations between forward and backward (CUDA only)
    checkpoint_offload: bool = False
    # > 0: the SwiGLU MLP runs over the sequence in chunks of this many tokens, each checkpointed, so its
    # hidden-size activations never exist for the whole sequence (lctrain/models/layers.py); 0 = off
    mlp_chunk_tokens: int = 0
    # dtype of the residual stream between blocks: float32, or compute = the autocast dtype when
    # train.dtype autocasts (bf16 halves what full checkpointing keeps per block), else float32
    residual_dtype: str = "float32"
    # true: the blocks' elementwise chains (RMSNorms, the mixers' L2 norms, SwiGLU's activation, RoPE) run
    # as torch.compile'd fused kernels (lctrain/models/fused.py); same formulas, other roundings
    compile: bool = False
    chunk_size: int = 64
    kernel_backend: str = "auto"
    # level weights per head of the log-linear layers (L, K): positions up to 2^(levels-1) - 1 are
    # covered; 24 reaches 8M tokens (fixed at build time: it sizes the lambda projection)
    loglinear_levels: int = 24
    # std of the N(0, std) init; null = sqrt(2 / (5 d_model)), the width-scaled "small init" (0.056 at
    # d_model 128, 0.014 at 2048): 0.02 is tuned for d_model ~1000 and starves the attention of a tiny model
    init_std: Optional[float] = None
    rope: RopeConfig = field(default_factory=RopeConfig)


@dataclass
class ParallelConfig:
    cp: int = 1  # context-parallel degree: the sequence is split into cp contiguous shards
    tp: int = 1  # tensor-parallel degree (heads and vocabulary)
    # pipeline-parallel degree: stages of contiguous blocks (the layer count must divide by it); a step's
    # train.grad_accum micro-batches go through megatron-core's 1F1B schedule (use grad_accum >= pp)
    pp: int = 1
    # sequence parallelism: the residual stream, the block norms and checkpointed block inputs hold
    # 1/tp of the rank's sequence (needs tp > 1 and seq_len divisible by cp * tp; docs/design.md §7)
    sequence_parallel: bool = False
    # processes on this node when `lctrain train` launches them itself; 0 = cp * tp * pp
    nproc_per_node: int = 0
    dist_backend: str = "auto"  # auto = nccl on CUDA, gloo on CPU


@dataclass
class TaskConfig:
    """Knobs of a synthetic task (data.source=synthetic:<task>, lctrain/data/synthetic.py); 0 = the
    task's default where it has one. A knob the chosen task does not take must stay 0."""
    num_pairs: int = 0  # mqar: key-value pairs per sample (required)
    num_queries: int = 0  # mqar: default every key; swap / dag: default 1
    num_elements: int = 0  # swap: elements being swapped (required)
    num_nodes: int = 0  # dag: nodes of the graph (required)
    # swap, training data only (`lctrain eval task` ignores them: it scores the task as defined, every
    # sample holding as many swaps as data.seq_len fits):
    # min_swaps / max_swaps: each training sample holds a number of swaps drawn uniformly from
    # min_swaps..max_swaps (0 = 1 / as many as fit), PAD filling the front; both 0 = every sample full
    min_swaps: int = 0
    max_swaps: int = 0
    # > 0: a curriculum: the most swaps a training sample holds rises from 1 to max_swaps (or all that
    # fit) in equal steps over the first curriculum_samples samples, and stays there; the dataset is
    # then read in its stored order (not shuffled), so num_samples must cover every sample the run reads
    curriculum_samples: int = 0
    vocab_size: int = 256  # the task's ids are < this (<= model.vocab_size)
    num_samples: int = 0  # samples built into the cached dataset; 0 = 20000


@dataclass
class DataConfig:
    # "embedded" = text this machine already has + synthetic needle samples, built once into MDS
    # shards under cache_dir; "synthetic:<task>" = a synthetic task (mqar | swap | dag) with the knobs
    # in data.task, also built once; anything else is a local path (or remote URL) of MDS shards
    # written by `lctrain data prepare`.
    source: str = "embedded"
    cache_dir: str = "~/.cache/lctrain"
    tokenizer: str = "byte"  # "byte" or a path to a HF tokenizers `tokenizer.json`
    seq_len: int = 512
    micro_batch_size: int = 8
    # share of synthetic passkey/needle samples in the embedded mix (their haystacks are half essay text)
    needle_fraction: float = 1.0
    num_workers: int = 0
    seed: int = 0
    task: TaskConfig = field(default_factory=TaskConfig)


@dataclass
class TrainConfig:
    steps: int = 400
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    grad_accum: int = 1
    # ZeRO-1: shard the Adam state over the data x context-parallel replicas (train/optim.py says how)
    shard_optimizer: bool = False
    # loss weight of the answer tokens of synthetic needle samples (the dataset's answer_mask column;
    # data without it trains unweighted). A tiny model learns long-distance retrieval in a few hundred
    # steps only with it (docs/eval-notes.md); 1 = the plain LM loss
    answer_loss_weight: float = 20.0
    # > 0: the final norm, LM head and cross-entropy run over chunks of this many tokens with the
    # gradient computed chunk by chunk, so [tokens, vocab] logits never exist whole (lctrain/train/loss.py);
    # 0 = one [tokens, vocab] logits tensor
    loss_chunk_tokens: int = 0
    seed: int = 1234
    out_dir: str = "runs/default"
    log_every: int = 10  # 0 = no log lines (metrics.jsonl still gets every step)
    ckpt_every: int = 0  # save every n steps; 0 = only by time (ckpt_minutes), on a signal and at the end
    # save when this many minutes have passed since the last save (0 = off): a crash or kill -9 then
    # loses at most this much work; SIGTERM / SIGUSR1 / SIGINT save at once anyway
    ckpt_minutes: float = 10.0
    # save a checkpoint after the last step; false: a benchmark or throwaway run writes none at the end
    # (saves by steps, by time and on signals still happen)
    save_final: bool = True
    keep_last: int = 3  # finished checkpoints kept; older ones are deleted once a newer one is complete; 0 = all
    # a step whose loss or gradient norm is not finite is skipped (no optimizer update); this many in a
    # row stop the run
    max_bad_steps: int = 5
    resume: bool = True  # continue from the newest checkpoint in out_dir that verifies, if there is one
    # start a new run from a checkpoint's weights (any parallel layout; new optimizer and schedule,
    # step 0), e.g. to continue a 16K model at 131K with another RoPE base; null = random init.
    # A checkpoint in out_dir (train.resume) takes precedence.
    init_from: Optional[str] = None
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16
    progress: bool = True
    tensorboard: bool = True


@dataclass
class EvalConfig:
    niah_lengths: list = field(default_factory=lambda: [512])
    niah_depths: list = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    niah_tasks: list = field(default_factory=lambda: ["s_niah_1"])
    niah_samples: int = 10
    seed: int = 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def default_config() -> DictConfig:
    return OmegaConf.structured(Config)


def load_config(recipe: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Defaults <- recipe YAML <- `key=value` overrides, then `validate`."""
    cfg = default_config()
    if recipe is not None:
        path = Path(recipe)
        loaded = load_recipe(path)
        try:
            cfg = OmegaConf.merge(cfg, loaded)
        except OmegaConfBaseException as err:
            raise ConfigError(f"recipe {path}: {_explain(err)}") from None
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not of the form key=value (e.g. train.steps=50 parallel.cp=2)")
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        raise ConfigError(f"override: {_explain(err)}") from None
    validate(cfg)
    return cfg


def load_recipe(path: str | os.PathLike) -> DictConfig:
    """A recipe YAML as a DictConfig; any unreadable or malformed file is a ConfigError naming the line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {str(path)!r} does not exist; pass a YAML file such as recipes/default.yaml")
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ConfigError(f"recipe {path} is not valid YAML{at} ({problem}); fix the file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"recipe {path} cannot be read ({type(err).__name__}); pass a YAML text file") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"recipe {path}: {_explain(err)}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"recipe {path} holds a {type(loaded).__name__}, not a mapping of sections; "
                          "write it like recipes/default.yaml (model:, data:, train: ...)")
    return loaded


def _explain(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    msg = str(err).splitlines()[0]
    if "not in struct" in msg or "Key" in msg and "not" in msg:
        return f"unknown key {key!r}: check the spelling against `lctrain config show` ({msg})"
    if key:
        return f"{key}: {msg}"
    return msg


def _fail(key: str, problem: str, fix: str) -> None:
    raise ConfigError(f"{key}: {problem}; {fix}")


def init_std(model_cfg: Any) -> float:
    """The model's init std: model.init_std, or sqrt(2 / (5 d_model)) when it is null."""
    std = getattr(model_cfg, "init_std", None)
    return float(std) if std is not None else (2.0 / (5.0 * int(model_cfg.d_model))) ** 0.5


def validate(cfg: DictConfig) -> None:
    """Every rule that can be checked without building anything. Raises ConfigError."""
    m, p, d, t = cfg.model, cfg.parallel, cfg.data, cfg.train
    pattern = m.layer_pattern
    if isinstance(pattern, (list, ListConfig)):
        pattern = "".join(str(x) for x in pattern)
    if not pattern:
        _fail("model.layer_pattern", "is empty", f"give one letter per block, e.g. 'GSGA' ({_letters()})")
    for i, letter in enumerate(pattern):
        if letter not in LAYER_KINDS:
            _fail("model.layer_pattern", f"unknown layer letter {letter!r} at position {i}", f"use only {_letters()}")
    for key in ("d_model", "n_heads", "head_dim", "attn_heads", "attn_head_dim", "vocab_size", "chunk_size",
                "conv_size"):
        if getattr(m, key) < 1:
            _fail(f"model.{key}", f"must be positive, got {getattr(m, key)}", "set a positive integer")
    if m.attn_conv_size < 0:
        _fail("model.attn_conv_size", f"must be >= 0, got {m.attn_conv_size}",
              "use 0 (no conv) or a kernel size such as 4")
    if m.attn_conv_layers not in ("all", "global"):
        _fail("model.attn_conv_layers", f"unknown value {m.attn_conv_layers!r}", "use all or global")
    if m.attn_kv_heads is not None and (m.attn_kv_heads < 1 or m.attn_heads % m.attn_kv_heads):
        _fail("model.attn_kv_heads", f"{m.attn_kv_heads} key/value heads do not divide model.attn_heads={m.attn_heads}",
              "use a divisor of attn_heads (1 = MQA) or null for one per query head")
    if m.mla_kv_rank < 0:
        _fail("model.mla_kv_rank", f"must be >= 0, got {m.mla_kv_rank}",
              "use 0 (off) or the latent rank, e.g. 4 * attn_head_dim")
    if m.mla_kv_rank > 0 and "A" in pattern:
        if m.mla_rope_dim < 2 or m.mla_rope_dim % 2:
            _fail("model.mla_rope_dim", f"must be even and >= 2, got {m.mla_rope_dim}", "use e.g. 16 or 64")
        if m.attn_conv_size > 0:
            _fail("model.attn_conv_size", "short q/k/v convs are not supported on MLA layers (model.mla_kv_rank > 0)",
                  "set model.attn_conv_size=0, or model.attn_conv_layers=all with MLA off")
    # (an id >= model.vocab_size is refused by the tokenizer check of `lctrain train` and by the model)
    if m.document_end_id is not None and m.document_end_id < 0:
        _fail("model.document_end_id", f"{m.document_end_id} is not a token id",
              "use the tokenizer's EOS id (257 for the byte tokenizer) or null")
    if m.init_std is not None and m.init_std <= 0:
        _fail("model.init_std", f"must be positive, got {m.init_std}",
              "set a positive std, or null for sqrt(2 / (5 d_model))")
    if not checkpointed_kinds(m, pattern) and m.checkpoint_offload:  # (raises on a bad activation_checkpointing)
        _fail("model.checkpoint_offload",
              "offloads the inputs of checkpointed blocks but model.activation_checkpointing=none",
              "set model.activation_checkpointing=full (or selective:LETTERS), or checkpoint_offload=false")
    if m.mlp_chunk_tokens < 0:
        _fail("model.mlp_chunk_tokens", f"must be >= 0, got {m.mlp_chunk_tokens}",
              "use 0 (off) or a token count such as 16384")
    if m.residual_dtype not in RESIDUAL_DTYPES:
        _fail("model.residual_dtype", f"unknown value {m.residual_dtype!r}", f"use one of {RESIDUAL_DTYPES}")
    if m.kernel_backend not in KERNEL_BACKENDS:
        _fail("model.kernel_backend", f"unknown backend {m.kernel_backend!r}", f"use one of {KERNEL_BACKENDS}")
    if any(c in LOGLINEAR_LAYERS for c in pattern):
        from lctrain.kernels.loglinear.levels import levels_needed
        if m.loglinear_levels < levels_needed(d.seq_len):
            _fail("model.loglinear_levels", f"{m.loglinear_levels} levels do not reach position {d.seq_len - 1}",
                  f"use at least {levels_needed(d.seq_len)} (= bit_length(seq_len - 1) + 1)")
    validate_rope_scaling(m)
    if m.rope.scaling in EVAL_ONLY_SCALINGS:
        _fail("model.rope.scaling", f"{m.rope.scaling} is an eval-time position scaling",
              "train with none/linear/ntk/yarn and pass it to `lctrain eval ... model.rope.scaling=...`")
    if m.rope.layers not in ROPE_LAYERS:
        _fail("model.rope.layers", f"unknown value {m.rope.layers!r}", f"use one of {ROPE_LAYERS}")
    if any(c in ATTENTION_LAYERS for c in pattern):
        from lctrain.models.rope import rotary_dim
        try:
            rotary_dim(int(m.attn_head_dim), float(m.rope.fraction))
        except ValueError as err:
            _fail("model.rope.fraction", str(err).replace("model.rope.fraction", "value"), "use a fraction in (0, 1]")
    if m.rope.base <= 1.0:
        _fail("model.rope.base", f"must exceed 1, got {m.rope.base}", "use e.g. 10000 (grow it with context length)")
    if any(c in ATTENTION_LAYERS for c in pattern) and m.attn_head_dim % 2:
        _fail("model.attn_head_dim", f"must be even for RoPE, got {m.attn_head_dim}", "use an even head dim")
    if "S" in pattern and m.window < 1:
        _fail("model.window", f"must be positive, got {m.window}", "set the sliding-window span in tokens")

    for key in ("cp", "tp", "pp"):
        if getattr(p, key) < 1:
            _fail(f"parallel.{key}", f"must be >= 1, got {getattr(p, key)}", "use 1 to switch it off")
    if p.pp > len(pattern):
        _fail("parallel.pp", f"{len(pattern)} layers are fewer than {p.pp} pipeline stages",
              "use pp <= the number of layers")
    if p.pp > 1 and len(pattern) % p.pp:
        _fail("parallel.pp", f"{len(pattern)} layers do not split into {p.pp} pipeline stages",
              "choose pp dividing the number of layers")
    model_size = p.tp * p.cp * p.pp
    if p.nproc_per_node and p.nproc_per_node % model_size:
        _fail("parallel.nproc_per_node",
              f"{p.nproc_per_node} processes do not factor into tp*cp*pp = {p.tp}*{p.cp}*{p.pp} = {model_size} "
              "times a data-parallel size",
              f"use a multiple of {model_size}, or lower parallel.tp / parallel.cp / parallel.pp")
    if p.sequence_parallel and p.tp == 1:
        _fail("parallel.sequence_parallel", "splits the sequence over the tensor-parallel group, and parallel.tp=1",
              "use parallel.tp > 1 with it, or parallel.sequence_parallel=false")
    if p.sequence_parallel and d.seq_len % (p.cp * p.tp):
        _fail("data.seq_len", f"{d.seq_len} tokens do not split into parallel.cp={p.cp} shards of parallel.tp={p.tp} "
              "sequence-parallel slices each", f"make seq_len a multiple of cp * tp = {p.cp * p.tp}, or "
              "parallel.sequence_parallel=false")
    if p.pp > 1 and p.nproc_per_node > model_size:
        _fail("parallel.pp", f"pipeline parallelism with data parallelism ({p.nproc_per_node} processes = "
              f"{p.nproc_per_node // model_size} replicas of tp*cp*pp = {model_size}) is not supported yet (the "
              "data loader needs each replica's ranks consecutive, megatron-core numbers pipeline stages outermost)",
              f"use parallel.nproc_per_node={model_size} (or 0), or parallel.pp=1")
    if p.pp > 1 and t.dtype == "float16":
        _fail("train.dtype", "float16's loss scaler skips a step on the stage that overflowed only, and pipeline "
              "stages would then drift apart", "use bfloat16 (or auto) with parallel.pp > 1")
    if p.tp > 1:
        if any(c in ATTENTION_LAYERS for c in pattern) and m.attn_kv_heads is not None and m.attn_kv_heads % p.tp:
            _fail("model.attn_kv_heads", f"{m.attn_kv_heads} key/value heads do not divide over parallel.tp={p.tp}",
                  "make attn_kv_heads a multiple of tp")
        if any(c in LINEAR_LAYERS for c in pattern) and m.n_heads % p.tp:
            _fail("model.n_heads", f"{m.n_heads} heads do not divide over parallel.tp={p.tp}",
                  "make n_heads a multiple of tp")
        if any(c in ATTENTION_LAYERS for c in pattern) and m.attn_heads % p.tp:
            _fail("model.attn_heads", f"{m.attn_heads} heads do not divide over parallel.tp={p.tp}",
                  "make attn_heads a multiple of tp")
        from lctrain.models.layers import swiglu_hidden_size

        hidden = swiglu_hidden_size(m.d_model, m.mlp_ratio)
        if hidden % p.tp:
            _fail("model.mlp_ratio", f"the MLP's {hidden} hidden units do not divide over parallel.tp={p.tp}",
                  "use a tp dividing it")
        if m.vocab_size % p.tp:
            _fail("model.vocab_size", f"{m.vocab_size} does not divide over parallel.tp={p.tp}",
                  "pad vocab_size to a multiple of tp")
    if p.cp > 1:
        shard = d.seq_len // p.cp
        if d.seq_len % p.cp:
            _fail("data.seq_len", f"{d.seq_len} does not split into parallel.cp={p.cp} equal shards",
                  "make seq_len a multiple of cp")
        if any(c in LOGLINEAR_LAYERS for c in pattern) and m.document_end_id is not None:
            _fail("model.document_end_id", "the log-linear layers (L, K) do not take packed documents under context "
                  "parallelism", "set model.document_end_id=null or parallel.cp=1")
        if any(c in LOGLINEAR_LAYERS for c in pattern) and shard & (shard - 1):
            _fail("data.seq_len",
                  f"each of the {p.cp} context-parallel shards holds {shard} tokens; the log-linear layers "
                  "(L, K) need a power of two per shard", "make seq_len / cp a power of two")
        if any(c in LINEAR_LAYERS for c in pattern) and shard % m.chunk_size:
            _fail("data.seq_len",
                  f"each of the {p.cp} context-parallel shards holds {shard} tokens, not a multiple of "
                  f"model.chunk_size={m.chunk_size}",
                  f"make seq_len a multiple of cp * chunk_size = {p.cp * m.chunk_size}")
        if "A" in pattern and (m.attn_heads // p.tp) % p.cp:
            _fail("model.attn_heads",
                  f"{m.attn_heads // p.tp} attention heads per TP rank do not split over parallel.cp={p.cp} (Ulysses "
                  "all-to-all)",
                  "make attn_heads / tp a multiple of cp")
        kv = (m.attn_kv_heads or m.attn_heads) // p.tp
        if "A" in pattern and kv % p.cp and p.cp % kv:
            _fail("model.attn_kv_heads",
                  f"{kv} key/value heads per TP rank neither split over parallel.cp={p.cp} nor divide it "
                  "(Ulysses gives each rank whole kv heads, replicating them when cp > kv heads)",
                  "use a kv head count that divides or is a multiple of cp")
        if "S" in pattern and m.window - 1 > shard:
            _fail("model.window", f"window {m.window} reaches past the previous rank's shard of {shard} tokens",
                  "use window <= seq_len / cp + 1 or a smaller cp")
        if any(c in LINEAR_LAYERS for c in pattern) and m.conv_size - 1 > shard:
            _fail("model.conv_size", f"conv reaches past the previous rank's shard of {shard} tokens",
                  "use a smaller conv_size or cp")
        if any(c in ATTENTION_LAYERS for c in pattern) and m.attn_conv_size - 1 > shard:
            _fail("model.attn_conv_size", f"conv reaches past the previous rank's shard of {shard} tokens",
                  "use a smaller attn_conv_size or cp")
    if p.dist_backend not in ("auto", "nccl", "gloo"):
        _fail("parallel.dist_backend", f"unknown backend {p.dist_backend!r}", "use auto, nccl or gloo")

    if d.seq_len < 2:
        _fail("data.seq_len", f"must be >= 2, got {d.seq_len}", "set the training context length in tokens")
    if d.micro_batch_size < 1:
        _fail("data.micro_batch_size", f"must be >= 1, got {d.micro_batch_size}", "set a positive batch size")
    if not 0.0 <= d.needle_fraction <= 1.0:
        _fail("data.needle_fraction", f"must lie in [0, 1], got {d.needle_fraction}", "set the share of needle samples")
    if d.tokenizer != "byte" and not Path(os.path.expanduser(d.tokenizer)).is_file():
        _fail("data.tokenizer", f"{d.tokenizer!r} is neither 'byte' nor an existing tokenizer.json",
              "pass 'byte' or the path of a HF tokenizer.json")

    if t.steps < 1:
        _fail("train.steps", f"must be >= 1, got {t.steps}", "set the number of optimizer steps")
    for key in ("lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "grad_clip", "answer_loss_weight",
                "ckpt_minutes"):
        if not math.isfinite(float(t[key])):
            _fail(f"train.{key}", f"must be a finite number, got {t[key]}", "set a real value")
    if t.lr <= 0:
        _fail("train.lr", f"must be positive, got {t.lr}", "set a learning rate such as 3e-4")
    if t.loss_chunk_tokens < 0:
        _fail("train.loss_chunk_tokens", f"must be >= 0, got {t.loss_chunk_tokens}",
              "use 0 (whole logits) or a token count such as 8192")
    for key in ("beta1", "beta2"):
        if not 0.0 <= t[key] < 1.0:
            _fail(f"train.{key}", f"must lie in [0, 1), got {t[key]}", "use e.g. beta1=0.9, beta2=0.95")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        _fail("train.min_lr_ratio", f"must lie in [0, 1], got {t.min_lr_ratio}",
              "set the final LR as a fraction of train.lr")
    if t.weight_decay < 0:
        _fail("train.weight_decay", f"must be >= 0, got {t.weight_decay}", "use 0 to switch it off")
    for key in ("warmup_steps", "log_every", "ckpt_every", "keep_last"):
        if t[key] < 0:
            _fail(f"train.{key}", f"must be >= 0, got {t[key]}", "use 0 to switch it off")
    if t.ckpt_minutes < 0:
        _fail("train.ckpt_minutes", f"must be >= 0, got {t.ckpt_minutes}",
              "use 0 to save only by steps, on signals and at the end")
    if t.max_bad_steps < 1:
        _fail("train.max_bad_steps", f"must be >= 1, got {t.max_bad_steps}",
              "set how many non-finite steps in a row stop the run")
    _validate_task(cfg)
    if d.num_workers < 0:
        _fail("data.num_workers", f"must be >= 0, got {d.num_workers}", "use 0 to load in the training process")
    if not str(t.out_dir).strip():
        _fail("train.out_dir", "is empty", "name the run's directory, e.g. runs/default")
    blocker = _file_in_path(os.path.expanduser(str(t.out_dir)))
    if blocker is not None:
        _fail("train.out_dir", f"{t.out_dir!r} lies under {blocker!r}, which is a file, not a directory",
              "choose another train.out_dir")
    if t.answer_loss_weight < 0:
        _fail("train.answer_loss_weight", f"must be >= 0, got {t.answer_loss_weight}", "use 1 for the plain LM loss")
    if t.init_from and not Path(os.path.expanduser(str(t.init_from))).exists():
        _fail("train.init_from", f"{t.init_from!r} does not exist",
              "pass a run's out_dir or one of its ckpt/step_<n> folders, or null")
    if t.grad_accum < 1:
        _fail("train.grad_accum", f"must be >= 1, got {t.grad_accum}", "set the micro-batches per step")
    if t.device not in ("auto", "cpu", "cuda"):
        _fail("train.device", f"unknown device {t.device!r}", "use auto, cpu or cuda")
    if t.dtype not in ("auto", "float32", "bfloat16", "float16"):
        _fail("train.dtype", f"unknown dtype {t.dtype!r}", "use auto, float32, bfloat16 or float16")
    _warn_rope_base(m, d, pattern)


def rope_context(m: Any, seq_len: int, pattern: str) -> int:
    """The longest relative distance + 1 that a rotary layer of the pattern sees in training: seq_len
    for global layers ("A", "F") that rotate (model.rope.layers=all), the window for sliding-window
    layers; 0 when no layer rotates."""
    context = 0
    if str(m.rope.layers) == "all" and any(c in "AF" for c in pattern):
        context = seq_len
    if "S" in pattern:
        context = max(context, min(int(m.window), seq_len))
    return context


def _warn_rope_base(m: Any, d: Any, pattern: str) -> None:
    """Warn (not fail) when model.rope.base fails the 'base bounds context length' criterion for the
    distances the rotary layers train on (lctrain/models/rope.py, base_lower_bound). Skipped with a
    context-extension scaling, whose effective base is not model.rope.base."""
    import warnings

    from lctrain.models.rope import decay_criterion_holds

    context = rope_context(m, int(d.seq_len), pattern)
    if context < 2 or m.rope.scaling != "none":
        return
    from lctrain.models.rope import rotary_dim

    dim = rotary_dim(int(m.attn_head_dim), float(m.rope.fraction))
    if not decay_criterion_holds(float(m.rope.base), dim, context):
        warnings.warn(
            f"model.rope.base={m.rope.base:g} is below what the 'base bounds context length' criterion allows "
            f"for {context} tokens with {dim} rotated dims: sum_i cos(m theta_i) turns negative at some distance "
            f"m < {context}, so similar keys far away score below random ones; `lctrain rope bound --head-dim "
            f"{dim} --context {context}` prints the smallest base that passes (a warning, not an error)",
            ConfigWarning, stacklevel=3)


def validate_rope_scaling(m: Any) -> None:
    """The model.rope.scaling / factor rules (also checked for eval-time overrides)."""
    if m.rope.scaling not in ROPE_SCALINGS:
        _fail("model.rope.scaling", f"unknown scaling {m.rope.scaling!r}", f"use one of {ROPE_SCALINGS}")
    if m.rope.scaling in EVAL_ONLY_SCALINGS and m.rope.rerope_window < 1:
        _fail("model.rope.rerope_window", f"is {m.rope.rerope_window} with scaling={m.rope.scaling}",
              "set the window of exact relative positions, e.g. the training seq_len")
    if m.rope.scaling not in ("none", "rerope") and m.rope.factor <= 1.0:
        _fail("model.rope.factor", f"is {m.rope.factor} with scaling={m.rope.scaling}",
              "set a factor > 1 (context extension ratio)")
    if m.rope.original_max_position < 0:
        _fail("model.rope.original_max_position", f"must be >= 0, got {m.rope.original_max_position}",
              "use 0 for data.seq_len")


REQUIRED_TASK_KNOBS = {"mqar": "num_pairs", "swap": "num_elements", "dag": "num_nodes"}
TASK_CONFIG_KNOBS = ("num_pairs", "num_queries", "num_elements", "num_nodes", "min_swaps", "max_swaps",
                     "curriculum_samples", "vocab_size", "num_samples")


def _validate_task(cfg: DictConfig) -> None:
    """data.source=synthetic:<task> and data.task: the task exists, its required knob is set, no other
    task's knob is set, and one sample can be built at data.seq_len (the generator's own check)."""
    from lctrain.data.synthetic import DEFAULT_TASK_SAMPLES, TASK_KNOBS, TASKS, TRAIN_KNOBS, TaskError, task_samples

    d, task = cfg.data, cfg.data.task
    source = str(d.source)
    defaults = TaskConfig()
    if not source.startswith("synthetic:"):
        changed = [k for k in TASK_CONFIG_KNOBS if task[k] != getattr(defaults, k)]
        if changed:
            _fail(f"data.task.{changed[0]}", f"is set but data.source={source!r} is not a synthetic task",
                  "set data.source=synthetic:<task> (mqar | swap | dag) or drop data.task")
        return
    name = source.split(":", 1)[1]
    if name not in TASKS:
        _fail("data.source", f"unknown synthetic task {name!r}", f"use synthetic:<task> with a task of {sorted(TASKS)}")
    for k in TASK_CONFIG_KNOBS:
        if task[k] < 0:
            _fail(f"data.task.{k}", f"must be >= 0, got {task[k]}", "use 0 for the task's default")
    for k in ("num_pairs", "num_elements", "num_nodes", "min_swaps", "max_swaps", "curriculum_samples"):
        if task[k] and k not in TASK_KNOBS[name] + TRAIN_KNOBS[name]:
            _fail(f"data.task.{k}", f"is not a knob of the {name} task",
                  f"leave it 0; {name} takes {', '.join(TASK_KNOBS[name] + TRAIN_KNOBS[name])}")
    need = REQUIRED_TASK_KNOBS[name]
    if not task[need]:
        _fail(f"data.task.{need}", f"is required by the {name} task", f"set data.task.{need}")
    if task.vocab_size > cfg.model.vocab_size:
        _fail("data.task.vocab_size", f"{task.vocab_size} exceeds model.vocab_size={cfg.model.vocab_size}",
              "lower data.task.vocab_size or raise model.vocab_size")
    end = cfg.model.document_end_id
    if end is not None and end < task.vocab_size:
        _fail("model.document_end_id",
              f"{end} is a token of the synthetic task (ids < data.task.vocab_size={task.vocab_size})",
              "set model.document_end_id=null (task samples are one stream each)")
    if task.curriculum_samples:
        held = int(task.num_samples) or DEFAULT_TASK_SAMPLES
        if task.curriculum_samples > held:
            _fail("data.task.curriculum_samples", f"{task.curriculum_samples} exceeds the {held} samples the dataset "
                  "holds (data.task.num_samples): the curriculum would never reach its last level",
                  "raise data.task.num_samples or lower data.task.curriculum_samples")
        used = int(cfg.train.steps) * int(d.micro_batch_size) * int(cfg.train.grad_accum)
        if used > held:
            _fail("data.task.num_samples", f"{held} samples are fewer than the {used} that train.steps x "
                  "data.micro_batch_size x train.grad_accum reads (more with data parallelism): a curriculum "
                  "(data.task.curriculum_samples) is read in order and would start over",
                  f"set data.task.num_samples >= {used} x the data-parallel ranks")
    knobs = {k: int(task[k]) for k in TASK_KNOBS[name] + TRAIN_KNOBS[name] if task[k]}
    try:
        task_samples(name, count=1, length=int(d.seq_len) + 1, seed=0, vocab_size=int(task.vocab_size), **knobs)
    except TaskError as err:
        _fail("data.task", f"the {name} task cannot be built at data.seq_len={d.seq_len} ({err})",
              "change the task's knobs, data.task.vocab_size or data.seq_len")


def _file_in_path(path: str) -> str | None:
    """The first existing non-directory on the way to `path` (a file where a folder must be), or None."""
    p = Path(path).absolute()
    for part in [*reversed(p.parents), p]:
        if part.exists() and not part.is_dir():
            return str(part)
        if not part.exists():
            return None
    return None


def _letters() -> str:
    return ", ".join(f"{k}={v}" for k, v in LAYER_KINDS.items())


def checkpointed_kinds(cfg_model: Any, pattern: str | None = None) -> str:
    """The block letters model.activation_checkpointing checkpoints: "" (none), every letter of the
    pattern (full) or the LETTERS of selective:LETTERS. Raises ConfigError naming the key otherwise."""
    pattern = layer_pattern(cfg_model) if pattern is None else pattern
    mode = str(getattr(cfg_model, "activation_checkpointing", "none") if not isinstance(cfg_model, dict)
               else cfg_model.get("activation_checkpointing", "none"))
    key = "model.activation_checkpointing"
    if mode == "none":
        return ""
    if mode == "full":
        return "".join(sorted(set(pattern)))
    kind, _, letters = mode.partition(":")
    if kind != "selective" or not letters:
        _fail(key, f"unknown value {mode!r}",
              "use none, full or selective:LETTERS (block kinds to checkpoint, e.g. selective:GM)")
    for letter in letters:
        if letter not in LAYER_KINDS:
            _fail(key, f"unknown layer letter {letter!r} in {mode!r}", f"use only {_letters()}")
        if letter not in pattern:
            _fail(key, f"{mode!r} names {letter!r} but model.layer_pattern {pattern!r} has no such block",
                  "name only kinds the pattern has")
    return "".join(sorted(set(letters)))


def layer_pattern(cfg_model: Any) -> str:
    """model.layer_pattern as a string, whether the recipe gave a string or a list of letters."""
    pattern = cfg_model.layer_pattern
    if isinstance(pattern, (list, ListConfig)):
        return "".join(str(x) for x in pattern)
    return str(pattern)


def world_size_needed(cfg: DictConfig) -> int:
    p = cfg.parallel
    return p.nproc_per_node or p.cp * p.tp * p.pp


def split_recipe_and_overrides(args: Sequence[str]) -> tuple[str | None, list[str]]:
    """`[RECIPE.yaml] [key=value ...]` as the CLI takes them: the first argument is a recipe unless it is an
    override."""
    args = list(args)
    if args and "=" not in args[0]:
        return args[0], args[1:]
    stray = [a for a in args if "=" not in a]
    if stray:
        raise ConfigError(f"argument {stray[0]!r} is neither the recipe (it must come first) nor a key=value override")
    return None, args
