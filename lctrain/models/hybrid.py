"""HybridLM: embedding -> blocks from model.layer_pattern -> final RMSNorm -> LM head (tied or not).

Each block: x = x + mixer(norm1(x)); x = x + mlp(norm2(x)), mixer chosen by the block's letter
(G gated DeltaNet, D DeltaNet, M Mamba-2 style, L log-linear gated DeltaNet, K log-linear Mamba-2,
S sliding-window attention, A global attention, F Deltaformer).

Context parallelism: every rank passes its contiguous shard of the sequence and
position_offset = cp_rank * T_local; the mixers do the cross-rank work (see their modules).
Tensor parallelism (tp_group of size tp > 1): every mixer and MLP holds 1/tp of its heads / hidden
units (see their modules), the embedding is vocabulary-parallel and the LM head column-parallel, so
`forward` returns this rank's vocabulary slice of the logits (`lm_loss` then uses the vocab-parallel
cross-entropy). Sequence parallelism (`sequence_parallel`, parallel.sequence_parallel): the residual
stream between blocks holds the TP rank's 1/tp of the sequence (see `Block`), the last stage gathers it
before the final norm. Pipeline parallelism (`pp_stage=(stage, stages)`): the model holds only its stage's
contiguous blocks (lctrain.parallel.pipeline.stage_layers), under their whole-model names (blocks.<i>);
the first stage holds the embedding, the last the final norm and the LM head (and, with tied
embeddings, a copy of the embedding table for it); `hidden_states` of a later stage starts from the
previous stage's output (`stage_input`). `build_model` initialises TP and PP models from the full
one-process model (same RNG draws), so every layout starts from the same weights.
Incremental decoding: `cache = model.new_cache(B, device)`, then `model(prompt, cache=cache)` (prefill)
and `model(next_token[:, None], cache=cache)` per step; positions continue from the tokens the
cache has seen.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lctrain.config import LOGLINEAR_LAYERS, checkpointed_kinds, init_std
from lctrain.kernels.loglinear.triton_levels import keep_level_states
from lctrain.parallel.mesh import group_size
from lctrain.parallel.pipeline import mark_pipeline_copy, stage_layers
from lctrain.parallel.tensor_parallel import (
    check_sequence_split,
    column_linear,
    gather_sequence,
    local_size,
    mark_partial_grad,
    reduce_over_tp,
    reduce_scatter_sequence,
    scatter_sequence,
    shard_from_full,
    skip_row_all_reduce,
    vocab_embedding,
)

from .attention import Attention
from .deltaformer import DeltaformerMixer
from .documents import Documents, documents_from_bounds, find_documents
from .layers import RMSNorm, SwiGLU, swiglu_hidden_size
from .linear_mixers import DeltaNetMixer, Mamba2Mixer
from .loglinear_mixers import LogLinearDeltaNetMixer, LogLinearMamba2Mixer
from .mla import MLAttention
from .rope import RotaryEmbedding

LAYER_LETTERS = "GDMLKSAF"


def _cfg(cfg_model: Any, key: str, default=None):
    return getattr(cfg_model, key, default) if not isinstance(cfg_model, dict) else cfg_model.get(key, default)


def _pattern(cfg_model: Any) -> str:
    pattern = _cfg(cfg_model, "layer_pattern")
    if not isinstance(pattern, str):
        pattern = "".join(str(x) for x in pattern)
    if not pattern:
        raise ValueError("model.layer_pattern is empty; give one letter per block, e.g. 'GSGA'")
    for i, letter in enumerate(pattern):
        if letter not in LAYER_LETTERS:
            raise ValueError(f"model.layer_pattern: unknown layer letter {letter!r} at position {i}; use only "
                             f"{LAYER_LETTERS}")
    return pattern


def _attn_conv_size(cfg_model: Any, kind: str) -> int:
    """model.attn_conv_size for this attention layer: 0 for "S" layers when model.attn_conv_layers=global."""
    if kind == "S" and str(_cfg(cfg_model, "attn_conv_layers", "all")) == "global":
        return 0
    return int(_cfg(cfg_model, "attn_conv_size", 0) or 0)


class Block(nn.Module):
    """Pre-norm mixer + residual, pre-norm SwiGLU MLP + residual.

    With `sequence_parallel` (a TP group of size > 1) the block's input and output are this TP rank's
    1/tp of the sequence: the norms and residual adds run on the slice, the normed slices are gathered
    to the whole sequence before the mixer and the MLP (whose TP layers see their usual replicated
    input), and the partial sums of their row-parallel output projections are reduce-scattered back to
    the slice (instead of all-reduced). The norm weights see only the slice: their gradients are
    partial and summed over TP. Decoding (a cache) runs on the whole sequence: the partial sums are
    then all-reduced."""

    def __init__(self, kind: str, cfg_model: Any, rope: RotaryEmbedding | None, cp_group=None, tp_group=None,
                 sequence_parallel: bool = False):
        super().__init__()
        m = cfg_model
        d = m.d_model
        self.kind = kind
        self.norm1 = RMSNorm(d, m.norm_eps)
        self.norm2 = RMSNorm(d, m.norm_eps)
        lin = dict(n_heads=m.n_heads, head_dim=m.head_dim, conv_size=m.conv_size, backend=m.kernel_backend,
                   chunk_size=m.chunk_size, norm_eps=m.norm_eps, cp_group=cp_group)
        if kind in "GD":
            self.mixer = DeltaNetMixer(d, gated=kind == "G", tp_group=tp_group, **lin)
        elif kind == "M":
            self.mixer = Mamba2Mixer(d, tp_group=tp_group, **lin)
        elif kind == "L":
            self.mixer = LogLinearDeltaNetMixer(d, levels=int(_cfg(m, "loglinear_levels", 24)), tp_group=tp_group,
                                                **lin)
        elif kind == "K":
            self.mixer = LogLinearMamba2Mixer(d, levels=int(_cfg(m, "loglinear_levels", 24)), tp_group=tp_group, **lin)
        elif kind == "F":
            nope = str(_cfg(m.rope, "layers", "all")) == "sliding"
            self.mixer = DeltaformerMixer(d, m.attn_heads, m.attn_head_dim, rope=None if nope else rope,
                                          backend=m.kernel_backend, chunk_size=m.chunk_size, cp_group=cp_group,
                                          tp_group=tp_group)
        elif kind == "A" and int(_cfg(m, "mla_kv_rank", 0) or 0) > 0:
            nope = str(_cfg(m.rope, "layers", "all")) == "sliding"
            self.mixer = MLAttention(d, m.attn_heads, m.attn_head_dim, kv_rank=int(m.mla_kv_rank),
                                     rope_dim=int(m.mla_rope_dim), rope=None if nope else rope,
                                     norm_eps=m.norm_eps, cp_group=cp_group, tp_group=tp_group)
        else:
            nope = kind == "A" and str(_cfg(m.rope, "layers", "all")) == "sliding"
            self.mixer = Attention(d, m.attn_heads, m.attn_head_dim, window=m.window if kind == "S" else None,
                                   rope=None if nope else rope, conv_size=_attn_conv_size(m, kind),
                                   cp_group=cp_group, tp_group=tp_group, kv_heads=_cfg(m, "attn_kv_heads", None))
        self.mlp = SwiGLU(d, swiglu_hidden_size(d, m.mlp_ratio), int(_cfg(m, "mlp_chunk_tokens", 0) or 0), tp_group)
        self.sp_group = tp_group if sequence_parallel and group_size(tp_group) > 1 else None
        if self.sp_group is not None:
            skip_row_all_reduce(self)  # every mixer and the MLP return their row-parallel projection's output
            mark_partial_grad(self.norm1.weight)
            mark_partial_grad(self.norm2.weight)

    def forward(self, x: torch.Tensor, position_offset: int = 0, cache: dict | None = None,
                docs: Documents | None = None) -> torch.Tensor:
        sp = self.sp_group
        if sp is None:
            x = x + self.mixer(self.norm1(x), position_offset, cache, docs)
            return x + self.mlp(self.norm2(x))
        if cache is not None:  # decoding: the whole (replicated) sequence
            x = x + reduce_over_tp(self.mixer(self.norm1(x), position_offset, cache, docs), sp)
            return x + reduce_over_tp(self.mlp(self.norm2(x)), sp)
        x = x + reduce_scatter_sequence(self.mixer(gather_sequence(self.norm1(x), sp), position_offset, None, docs), sp)
        return x + reduce_scatter_sequence(self.mlp(gather_sequence(self.norm2(x), sp)), sp)


class _ToHost(torch.autograd.Function):
    """x -> a copy in pinned host memory (asynchronous, stream-ordered); the gradient goes back to x's device."""

    @staticmethod
    def forward(ctx, x):
        ctx.device = x.device
        out = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=True)
        return out.copy_(x, non_blocking=True)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.device, non_blocking=True)


def _checkpointed_block(block: Block, x: torch.Tensor, offset: int, docs) -> torch.Tensor:
    """An activation-checkpointed block: it runs here and again right before its backward. A log-linear
    block keeps its level states from that second run for its backward (the Triton kernels' KEEP_H:
    one scan per level fewer there; the first run's states are dropped with everything else it saved, so
    only one block's are alive at a time)."""
    with keep_level_states() if block.kind in LOGLINEAR_LAYERS else contextlib.nullcontext():
        return block(x, offset, None, docs)


def _block_from_host(block: Block, x_host: torch.Tensor, offset: int, docs) -> torch.Tensor:
    """A checkpointed block whose saved input is x_host (model.checkpoint_offload): the GPU copy made
    here lives only while the block runs, in the forward and again in the recomputation."""
    x = x_host.to(block.norm1.weight.device, non_blocking=True)
    return _checkpointed_block(block, x, offset, docs)


class StageBlocks(nn.ModuleList):
    """The blocks of one pipeline stage, registered under their indices in the whole model (`blocks.<i>`)
    so that parameter and state-dict names are the full model's (checkpoints and sharding go by them).
    Indexing and iteration are the stage's own: `blocks[0]` is its first block."""

    def __init__(self, blocks, first: int = 0):
        super().__init__()
        self.first = first
        for i, block in enumerate(blocks):
            self.add_module(str(first + i), block)

    def __getitem__(self, idx):
        blocks = list(self._modules.values())
        return nn.ModuleList(blocks[idx]) if isinstance(idx, slice) else blocks[idx]


class LMCache:
    """Decoding state of a HybridLM: one dict per block (recurrent state + conv tails, or KV cache)
    and the number of tokens seen so far."""

    def __init__(self, n_layers: int, batch_size: int):
        self.layers: list[dict] = [{} for _ in range(n_layers)]
        self.batch_size = batch_size
        self.seen_tokens = 0
        self.last_was_end = False  # the last token fed was a document end (model.document_end_id)


class HybridLM(nn.Module):
    def __init__(self, model_cfg: Any, cp_group=None, *, tp_group=None, max_position: int | None = None,
                 pp_stage: tuple[int, int] = (0, 1), sequence_parallel: bool = False):
        """`max_position`: the original context length YaRN uses when model.rope.original_max_position
        is 0 (pass the training seq_len). `pp_stage`: (this stage, number of stages). With a tp_group of
        size > 1 or several stages the weights are left for `build_model` to fill from the full model.
        `sequence_parallel` (parallel.sequence_parallel; needs a tp_group of size > 1): the residual
        stream between blocks holds this TP rank's 1/tp of the sequence (see `Block`)."""
        super().__init__()
        m = model_cfg
        self.cfg = m
        self.pattern = _pattern(m)
        self.cp_group = cp_group
        self.tp_group = tp_group if group_size(tp_group) > 1 else None
        if sequence_parallel and self.tp_group is None:
            raise ValueError("parallel.sequence_parallel=true needs tensor parallelism (parallel.tp > 1): it splits "
                             "the sequence over the TP group")
        self.sp_group = self.tp_group if sequence_parallel else None
        local_size(m.vocab_size, self.tp_group, "model.vocab_size")
        # the block kinds model.activation_checkpointing checkpoints ("" = none)
        self.checkpointed = checkpointed_kinds(m, self.pattern)
        self.residual_in_compute_dtype = str(_cfg(m, "residual_dtype", "float32")) == "compute"
        self.checkpoint_offload = bool(_cfg(m, "checkpoint_offload", False))
        end = _cfg(m, "document_end_id", None)
        if end is not None and not 0 <= int(end) < m.vocab_size:
            raise ValueError(f"model.document_end_id={end} is not a token id of the vocabulary [0, {m.vocab_size}); "
                             "set it to the tokenizer's EOS id or null")
        self.stage, self.stages = (int(x) for x in pp_stage)
        layers = stage_layers(len(self.pattern), self.stages, self.stage)
        self.has_embedding, self.has_head = self.stage == 0, self.stage == self.stages - 1
        self.embed = self.norm = self.lm_head = None
        if self.has_embedding or (self.has_head and m.tie_embeddings):
            self.embed = vocab_embedding(m.vocab_size, m.d_model, self.tp_group)
        self.max_position = max_position
        rope = self._make_rope(m.rope) if any(c in "SAF" for c in self.pattern) else None
        self.blocks = StageBlocks((Block(self.pattern[i], m, rope, cp_group, self.tp_group, sequence_parallel)
                                   for i in layers),
                                  layers.start)
        if self.has_head:
            self.norm = RMSNorm(m.d_model, m.norm_eps)
            self.lm_head = column_linear(m.d_model, m.vocab_size, self.tp_group)
        self._init_weights(init_std(m))
        if m.tie_embeddings and self.has_head:
            self.lm_head.weight = self.embed.weight
            if not self.has_embedding:  # the first stage owns the table; this copy follows it
                mark_pipeline_copy(self.embed.weight)
        if bool(_cfg(m, "compile", False)):
            from .fused import enable

            enable(self)

    def _make_rope(self, r: Any) -> RotaryEmbedding:
        original = int(r.original_max_position) or int(self.max_position or 0)
        return RotaryEmbedding(self.cfg.attn_head_dim, float(r.base), str(r.scaling), float(r.factor), original,
                               fraction=float(_cfg(r, "fraction", 1.0)), rerope_window=int(_cfg(r, "rerope_window", 0)))

    def set_rope_scaling(self, scaling: str, factor: float, original_max_position: int = 0,
                         rerope_window: int = 0) -> None:
        """Eval-time position scaling of a trained model: rebuild the rotary embedding of every layer
        that rotates with model.rope.scaling / factor / original_max_position / rerope_window changed
        (base, fraction and which layers carry positions stay). Touches no weight: RoPE has no
        parameters. ReRoPE / Leaky ReRoPE apply to the global attention layers ("A"); sliding-window
        layers keep their exact positions, and Deltaformer layers ("F") refuse it."""
        from omegaconf import OmegaConf

        r = OmegaConf.merge(OmegaConf.create(self.cfg.rope),
                            {"scaling": scaling, "factor": float(factor),
                             "original_max_position": int(original_max_position),
                             "rerope_window": int(rerope_window)})
        rope = self._make_rope(r).to(next(self.parameters()).device)
        for block in self.blocks:
            if getattr(block.mixer, "rope", None) is None:
                continue
            if isinstance(block.mixer, MLAttention):
                raise ValueError("eval-time model.rope.scaling is not supported for MLA layers (model.mla_kv_rank > "
                                 "0): their decoupled RoPE part has its own frequencies; evaluate without scaling")
            if rope.rerope is not None and block.kind == "F":
                raise ValueError(f"model.rope.scaling={scaling} applies to global attention layers (A); the "
                                 "Deltaformer layers (F) of this model rotate too: use ntk, yarn or linear")
            if rope.rerope is not None and block.kind == "S":
                continue
            block.mixer.rope = rope

    def _init_weights(self, std: float) -> None:
        """N(0, std) for embeddings and projections; output projections (mixer out, MLP down) use
        std / sqrt(2 * n_layers) so the residual stream's variance does not grow with depth."""
        out_std = std / math.sqrt(2 * len(self.pattern))
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                s = out_std if getattr(module, "is_output_projection", False) else std
                nn.init.normal_(module.weight, mean=0.0, std=s)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def new_cache(self, batch_size: int, device=None) -> LMCache:
        return LMCache(len(self.blocks), batch_size)

    def forward(self, input_ids: torch.Tensor, *, position_offset: int = 0, cache: LMCache | None = None,
                doc_bounds: list[list[int]] | None = None, stage_input: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T_local] -> float32 logits [B, T_local, vocab] (vocab / tp: this rank's
        vocabulary slice under tensor parallelism). Positions of the tokens are
        position_offset + (tokens the cache has seen) + 0 .. T-1. `doc_bounds` (optional, with
        model.document_end_id set): the packed documents' GLOBAL boundaries per row as the data loader
        found them; without it the model finds them in input_ids. `stage_input`: see `hidden_states`."""
        if not self.has_head:
            raise ValueError(f"pipeline stage {self.stage} of {self.stages} has no LM head; call hidden_states")
        x = self.hidden_states(input_ids, position_offset=position_offset, cache=cache, doc_bounds=doc_bounds,
                               stage_input=stage_input)
        return self.lm_head(self.norm(x)).float()

    def hidden_states(self, input_ids: torch.Tensor, *, position_offset: int = 0, cache: LMCache | None = None,
                      doc_bounds: list[list[int]] | None = None, stage_input: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """The residual stream after the last block, before the final norm: [B, T_local, d_model]
        (what `forward` turns into logits; the chunked loss of lctrain.train.loss starts from it).
        A pipeline stage after the first starts from `stage_input`, the previous stage's output
        (`input_ids` still gives the documents); the first stage embeds `input_ids`. Under sequence
        parallelism (training, no cache) a stage without the head returns, and a later stage takes as
        `stage_input`, this TP rank's slice [B, T_local / tp, d_model]; the last stage gathers the whole
        sequence for the final norm and head."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        offset = int(position_offset)
        if cache is not None:
            if cache.batch_size != input_ids.shape[0]:
                raise ValueError(f"cache was made for batch {cache.batch_size}, got input batch {input_ids.shape[0]}")
            offset += cache.seen_tokens
        if (stage_input is None) != self.has_embedding:
            raise ValueError(f"pipeline stage {self.stage} of {self.stages}: stage_input must be "
                             + ("None (the first stage embeds input_ids)" if self.has_embedding else
                                "the previous stage's output"))
        docs = self._documents(input_ids, cache, doc_bounds)
        sp = self.sp_group if cache is None else None
        if sp is not None:
            check_sequence_split(input_ids.shape[1], sp)
        if self.has_embedding:
            x = self.embed(input_ids)
            if self.residual_in_compute_dtype and torch.is_autocast_enabled(x.device.type):
                x = x.to(torch.get_autocast_dtype(x.device.type))
            x = scatter_sequence(x, sp)
        else:
            x = stage_input
        recompute = cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else cache.layers[i]
            if recompute and block.kind in self.checkpointed and self.checkpoint_offload and x.is_cuda:
                x = checkpoint(_block_from_host, block, _ToHost.apply(x), offset, docs, use_reentrant=False)
            elif recompute and block.kind in self.checkpointed:
                x = checkpoint(_checkpointed_block, block, x, offset, docs, use_reentrant=False)
            else:
                x = block(x, offset, layer_cache, docs)
        if cache is not None:
            cache.seen_tokens += input_ids.shape[1]
        return gather_sequence(x, sp) if self.has_head else x

    def _documents(self, input_ids: torch.Tensor, cache: LMCache | None, doc_bounds=None) -> Documents | None:
        """The packed documents of this forward when model.document_end_id is set (every layer keeps
        them apart: see lctrain.models.documents); None when unset or when no row holds a document
        end before its last token (one document per row: nothing to keep apart)."""
        end = _cfg(self.cfg, "document_end_id", None)
        if doc_bounds is not None:
            if end is None or cache is not None:
                raise ValueError("doc_bounds needs model.document_end_id set and no decoding cache; leave doc_bounds "
                                 "out")
            return documents_from_bounds(doc_bounds, input_ids, cp_group=self.cp_group)
        if end is None:
            return None
        if cache is not None:
            is_end = input_ids == int(end)
            if bool(is_end[:, :-1].any()) or (cache.seen_tokens and cache.last_was_end):
                raise ValueError(f"decoding across a document end (token {end}) is not supported with "
                                 "model.document_end_id set; give one document per prompt")
            cache.last_was_end = bool(is_end[:, -1].any())
            return None
        return find_documents(input_ids, int(end), cp_group=self.cp_group)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Distinct parameters of this rank (a tied head counts once); optionally without the embedding table."""
        seen, total = set(), 0
        for p in self.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
        if exclude_embeddings and self.embed is not None:
            total -= self.embed.weight.numel()
        return total


def build_model(cfg_model: Any, cp_group=None, *, tp_group=None, max_position: int | None = None,
                pp_stage: tuple[int, int] = (0, 1), sequence_parallel: bool = False) -> HybridLM:
    """The model for this rank. Under tensor or pipeline parallelism the one-process model is built
    first (the same random draws as tp=pp=1) and each rank copies its shards / its stage's part from
    it; the RNG then continues from where the one-process build leaves it, so any layout starts from
    the same weights and state."""
    if group_size(tp_group) == 1 and pp_stage[1] == 1:
        return HybridLM(cfg_model, cp_group=cp_group, max_position=max_position, sequence_parallel=sequence_parallel)
    full = HybridLM(cfg_model, cp_group=None, max_position=max_position)
    rng = torch.get_rng_state()
    model = HybridLM(cfg_model, cp_group=cp_group, tp_group=tp_group, max_position=max_position, pp_stage=pp_stage,
                     sequence_parallel=sequence_parallel)
    shard_from_full(model, full.state_dict(), tp_group)
    torch.set_rng_state(rng)
    return model
