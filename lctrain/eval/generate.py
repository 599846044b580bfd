"""Greedy generation on the model's decoding cache, with an optional context-parallel prefill.

Single process: `model(prompt, cache=cache)` prefills (chunkwise ops; the linear layers keep their
recurrent state and conv tails, attention layers a KV cache), then one token per step
`model(next[:, None], cache=cache)`: constant memory per token for the linear layers, the prompt is
never re-run.

Context parallel (cp_group of size P): the prompt's first n_cp = floor(n / (P * chunk)) * P * chunk
tokens are prefilled sharded over the P ranks with the CP model (each rank its contiguous n_cp / P
tokens, global positions, the ordinary CP forward: state scan over ranks, conv / window halos,
Ulysses for global attention). While it runs, hooks record what decoding needs: each linear layer's
outgoing state and conv tails (on the last rank these are the prefix's), and each attention layer's
roped keys and values (gathered onto the last rank for global attention; the last window-1 of the
last rank for sliding windows; unrotated keys for (Leaky) ReRoPE layers, which rotate per query; the
latent and the rotated RoPE key part for MLA layers, whose absorbed decoding needs nothing else). The last rank turns
them into an ordinary decoding cache, feeds the
remaining n - n_cp (< P * chunk) prompt tokens through the single-process model with that cache, and
decodes greedily; the tokens are then broadcast to the group. No padding is ever added, so every
token sits at its true position and cp=P computes the same function as cp=1 (up to float rounding).
When the shards would be shorter than a halo (window-1 or conv_size-1), the whole prompt is prefilled
on the last rank.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lctrain.config import LINEAR_LAYERS, LOGLINEAR_LAYERS
from lctrain.models.attention import Attention
from lctrain.models.layers import ShortConv
from lctrain.models.mla import MLAttention
from lctrain.parallel.mesh import group_size


@dataclass
class Generation:
    tokens: list[int]  # the new tokens (greedy), ending at EOS or after max_new_tokens
    first_logits: torch.Tensor  # float32 [vocab] logits that chose the first new token (CPU)
    cp_prefill_tokens: int = 0  # prompt tokens prefilled across CP ranks (0 without CP)


def _decode(model, cache, logits: torch.Tensor, max_new_tokens: int, eos_id: int | None, device) -> list[int]:
    tokens: list[int] = []
    for step in range(max_new_tokens):
        nxt = int(torch.argmax(logits))
        tokens.append(nxt)
        if (eos_id is not None and nxt == eos_id) or step == max_new_tokens - 1:
            break
        logits = model(torch.tensor([[nxt]], device=device), cache=cache)[0, -1]
    return tokens


@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens: int, *, eos_id: int | None = None, cp_model=None, cp_group=None,
             autocast_dtype: torch.dtype | None = None) -> Generation:
    """Greedy continuation of `prompt_ids` (a list of ints, batch 1).

    `model`: the single-process HybridLM (decoding). Under CP also pass `cp_model` (the same weights
    built with `cp_group`) and `cp_group`; every rank of the group must call this with the same prompt
    and gets the same result."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if len(prompt_ids) < 1:
        raise ValueError("the prompt is empty")
    device = next(model.parameters()).device
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    with ctx:
        if group_size(cp_group) == 1:
            cache = model.new_cache(1, device)
            logits = model(torch.tensor([list(prompt_ids)], device=device), cache=cache)[0, -1]
            tokens = _decode(model, cache, logits, max_new_tokens, eos_id, device)
            return Generation(tokens, logits.float().cpu(), 0)
        if cp_model is None:
            raise ValueError("generate under context parallelism needs cp_model (the model built with cp_group)")
        return _generate_cp(model, cp_model, list(prompt_ids), max_new_tokens, eos_id, cp_group, device)


def cp_prefill_length(n_tokens: int, cp: int, model_cfg) -> int:
    """How many leading prompt tokens are prefilled across the CP ranks (see the module doc)."""
    pattern = "".join(str(c) for c in model_cfg.layer_pattern)
    if "F" in pattern:
        return 0  # Deltaformer layers record no cache during a CP forward: prefill on the last rank
    unit = cp * int(model_cfg.chunk_size)
    n_cp = (n_tokens // unit) * unit
    if any(c in LOGLINEAR_LAYERS for c in pattern) and n_cp:
        n_cp = cp * (1 << ((n_cp // cp).bit_length() - 1))  # log-linear CP: a power of two per rank
    need = 1
    if any(c in LINEAR_LAYERS for c in pattern):
        need = max(need, int(model_cfg.conv_size) - 1)
    if "S" in pattern:
        need = max(need, int(model_cfg.window) - 1)
    if any(c in "SA" for c in pattern):
        need = max(need, int(getattr(model_cfg, "attn_conv_size", 0) or 0) - 1)
    return n_cp if n_cp // cp >= need else 0


class _StateRecorder:
    """Stands in for a linear mixer's CP op: runs it with output_final_state=True and keeps the state."""

    def __init__(self, op, record: dict):
        self.op, self.record = op, record

    def __call__(self, *args, **kw):
        kw["output_final_state"] = True
        o, state = self.op(*args, **kw)
        self.record["state"] = state
        return o, None


class _PrefillRecorder:
    """Hooks on a CP HybridLM that keep, per block, what a decoding cache needs (see module doc)."""

    def __init__(self, cp_model):
        self.model = cp_model
        self.records: list[dict] = [{} for _ in cp_model.blocks]
        self.handles, self.swapped = [], []
        for block, rec in zip(cp_model.blocks, self.records):
            mixer = block.mixer
            if isinstance(mixer, MLAttention):  # the latent and the shared RoPE key part (before RoPE)
                self.handles.append(mixer.kv_norm.register_forward_hook(self._keep(rec, "c")))
                self.handles.append(mixer.k_rope.register_forward_hook(self._keep(rec, "kr_raw")))
                continue
            if isinstance(mixer, Attention):
                for name in ("k", "v"):  # k and v before RoPE: after the conv when there is one
                    if mixer.conv_size > 0:
                        conv = getattr(mixer, f"{name}_conv")
                        self.handles.append(conv.register_forward_hook(self._keep_residual(rec, f"{name}_raw")))
                    else:
                        proj = getattr(mixer, f"{name}_proj")
                        self.handles.append(proj.register_forward_hook(self._keep(rec, f"{name}_raw")))
                if mixer.conv_size > 0:
                    for name in ("q_conv", "k_conv", "v_conv"):
                        self.handles.append(getattr(mixer, name).register_forward_hook(self._keep_tail(rec, name)))
                continue
            convs = [(name, child) for name, child in mixer.named_children() if isinstance(child, ShortConv)]
            if not hasattr(mixer, "_op") or not hasattr(mixer, "_cp_op") or not convs:
                raise RuntimeError(f"{type(mixer).__name__} no longer has the hooks the CP prefill uses (_op, _cp_op, "
                                   "ShortConv children); update lctrain/eval/generate.py")
            for name, conv in convs:
                self.handles.append(conv.register_forward_hook(self._keep_tail(rec, name)))
            op = mixer._op()  # the layer's context_parallel op
            self.swapped.append((mixer, mixer._cp_op))
            mixer._cp_op = _StateRecorder(op, rec)

    @staticmethod
    def _keep(rec, key):
        def hook(module, inputs, output):
            rec[key] = output.detach()
        return hook

    @staticmethod
    def _keep_residual(rec, key):
        """For a residual conv (y = x + conv(x)): keeps y."""
        def hook(module, inputs, output):
            rec[key] = (inputs[0] + output[0]).detach()
        return hook

    @staticmethod
    def _keep_tail(rec, key):
        def hook(module, inputs, output):
            rec[key] = output[1].detach()
        return hook

    def close(self):
        for h in self.handles:
            h.remove()
        for mixer, original in self.swapped:
            mixer._cp_op = original


def _generate_cp(model, cp_model, ids: list[int], max_new_tokens, eos_id, group, device) -> Generation:
    P, r = dist.get_world_size(group), dist.get_rank(group)
    last = P - 1
    last_global = dist.get_global_rank(group, last)
    n_cp = cp_prefill_length(len(ids), P, cp_model.cfg)
    shard = n_cp // P
    records, local_logits = None, None
    if n_cp:
        recorder = _PrefillRecorder(cp_model)
        try:
            local = torch.tensor([ids[r * shard:(r + 1) * shard]], device=device)
            local_logits = cp_model(local, position_offset=r * shard)[0, -1]
        finally:
            recorder.close()
        records = recorder.records

    cache = model.new_cache(1, device) if r == last else None
    if n_cp:
        for i, (block, rec) in enumerate(zip(cp_model.blocks, records)):
            mixer = block.mixer
            if isinstance(mixer, MLAttention):  # the absorbed-decoding cache: latent, rotated rope key, positions
                pos = torch.arange(r * shard, (r + 1) * shard, device=device)
                k_rope = rec["kr_raw"].view(1, shard, 1, mixer.rope_dim)
                if mixer.rope is not None:
                    k_rope = mixer.rope(k_rope, pos)
                c, k_rope = _gather_to(rec["c"], group, last), _gather_to(k_rope[:, :, 0].contiguous(), group, last)
                if r == last:
                    cache.layers[i].update(c=c, k_rope=k_rope, pos=torch.arange(n_cp, device=device))
            elif isinstance(mixer, Attention):
                H, D = mixer.kv_heads, mixer.head_dim  # k and v have the kv heads (GQA)
                pos = torch.arange(r * shard, (r + 1) * shard, device=device)
                k = rec["k_raw"].view(1, shard, H, D)
                rerope = mixer.rope is not None and mixer.rope.rerope is not None and mixer.window is None
                if mixer.rope is not None and not rerope:  # None: NoPE global layer; ReRoPE caches unrotated keys
                    k = mixer.rope(k, pos)
                v = rec["v_raw"].view(1, shard, H, D)
                if mixer.window is None:
                    k, v = _gather_to(k, group, last), _gather_to(v, group, last)
                if r == last:
                    T = k.shape[1]
                    keep = T if mixer.window is None else min(T, mixer.window - 1)
                    kpos = torch.arange(n_cp - T, n_cp, device=device)
                    cache.layers[i].update(k=k[:, T - keep:].contiguous(), v=v[:, T - keep:].contiguous(),
                                           pos=kpos[T - keep:])
                    cache.layers[i].update({name: rec[name] for name in ("q_conv", "k_conv", "v_conv") if name in rec})
            elif r == last:
                cache.layers[i].update({key: val for key, val in rec.items()})
    result = None
    if r == last:
        if n_cp:
            cache.seen_tokens = n_cp
        rest = ids[n_cp:]
        logits = local_logits
        if rest:
            logits = model(torch.tensor([rest], device=device), cache=cache)[0, -1]
        tokens = _decode(model, cache, logits, max_new_tokens, eos_id, device)
        result = [tokens, logits.float().cpu()]
    box = [result]
    dist.broadcast_object_list(box, src=last_global, group=group)
    tokens, first_logits = box[0]
    return Generation(tokens, first_logits, n_cp)


def _gather_to(x: torch.Tensor, group, dst: int) -> torch.Tensor | None:
    """Concatenate every rank's x along dim 1 on group rank `dst` (None elsewhere)."""
    P = dist.get_world_size(group)
    comm = x.contiguous()
    if dist.get_backend(group) != "nccl":
        comm = comm.cpu()
    bufs = [torch.empty_like(comm) for _ in range(P)] if dist.get_rank(group) == dst else None
    dist.gather(comm, bufs, dst=dist.get_global_rank(group, dst), group=group)
    if bufs is None:
        return None
    return torch.cat([b.to(x.device) for b in bufs], dim=1)
