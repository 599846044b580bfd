"""Cross-entropy over sequence chunks: the final norm, LM head and loss without [tokens, vocab] logits.

At long context the logits dominate memory: 131K tokens x 32K vocabulary in float32 is 17 GB, and
the plain loss keeps them (and their gradient, as large) for the backward. `chunked_head_loss` runs
norm -> head -> cross-entropy on `chunk_tokens` tokens at a time and computes that chunk's gradient
(with respect to the hidden states, the norm weight and the head weight) right away, in the forward;
the backward only scales those gradients by the incoming one. So at most one chunk's logits and
logit gradient exist at any moment, in the forward and in the backward alike, and nothing is
recomputed. The loss is a sum over tokens, so the chunks' gradients add up to the whole sequence's:
the result equals the plain loss (up to float summation order).

Autocast applies inside the chunks as it would to the plain head (bf16 matmul, float32 loss).

Under tensor parallelism (`tp_group`) the head weight is this rank's vocabulary shard [V/tp, d]: each
chunk's logits are [chunk, V/tp] and megatron-core's vocab-parallel cross-entropy all-reduces their
max, target logit and sum of exponentials over the TP group. The chunk's normed hidden states enter
through megatron's copy-to-TP-region (`to_tp_region`), whose backward sums the TP ranks' partial
gradients, so the hidden-state and norm-weight gradients come out whole on every rank (as behind the
column-parallel head) and the head-weight gradient is this rank's shard.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from lctrain.parallel.tensor_parallel import to_tp_region

IGNORE_INDEX = -100


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, tp_group=None) -> torch.Tensor:
    """Per-token cross-entropy [N] of logits [N, V] (float32), labels [N] (-100 gives 0); with a
    `tp_group` the logits are this rank's vocabulary slice [N, V/tp] (vocab-parallel cross-entropy)."""
    if tp_group is not None:
        from lctrain.parallel.tensor_parallel import vocab_parallel_cross_entropy

        return vocab_parallel_cross_entropy(logits, labels, IGNORE_INDEX)
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")


class _ChunkedHeadLoss(torch.autograd.Function):
    """(hidden [N, d], norm weight [d], head weight [V, d] or its vocabulary shard under TP) ->
    (weighted token-loss sum, plain token-loss sum); the second output carries no gradient."""

    @staticmethod
    def forward(ctx, hidden, norm_weight, head_weight, labels, token_weights, norm_fn, chunk_tokens, tp_group):
        want = [hidden.requires_grad, norm_weight.requires_grad, head_weight.requires_grad]
        grads = [torch.zeros_like(hidden) if want[0] else None,
                 torch.zeros_like(norm_weight, dtype=torch.float32) if want[1] else None,
                 torch.zeros_like(head_weight, dtype=torch.float32) if want[2] else None]
        weighted_sum = torch.zeros((), device=hidden.device, dtype=torch.float32)
        plain_sum = torch.zeros((), device=hidden.device, dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_tokens):
            stop = min(start + chunk_tokens, hidden.shape[0])
            with torch.enable_grad():
                x = hidden[start:stop].detach().requires_grad_(want[0])
                nw = norm_weight.detach().requires_grad_(want[1])
                hw = head_weight.detach().requires_grad_(want[2])
                logits = F.linear(to_tp_region(norm_fn(x, nw), tp_group), hw).float()
                per_token = token_cross_entropy(logits, labels[start:stop], tp_group)
                weighted = per_token.sum() if token_weights is None else (per_token * token_weights[start:stop]).sum()
                inputs = [t for t, w in zip((x, nw, hw), want) if w]
                chunk_grads = iter(torch.autograd.grad(weighted, inputs) if inputs else ())
            for i in range(3):
                if want[i]:
                    g = next(chunk_grads)
                    if i == 0:
                        grads[0][start:stop] = g
                    else:
                        grads[i] += g.float()
            weighted_sum += weighted.detach()
            plain_sum += per_token.detach().sum()
        ctx.save_for_backward(*[g if g is not None else torch.empty(0) for g in grads])
        ctx.want = want
        ctx.input_dtypes = (hidden.dtype, norm_weight.dtype, head_weight.dtype)
        ctx.mark_non_differentiable(plain_sum)
        return weighted_sum, plain_sum

    @staticmethod
    def backward(ctx, grad_weighted, grad_plain):
        saved = ctx.saved_tensors
        out = []
        for g, want, dtype in zip(saved, ctx.want, ctx.input_dtypes):
            out.append((g * grad_weighted).to(dtype) if want else None)
        return (*out, None, None, None, None, None)


def chunked_head_loss(hidden: torch.Tensor, norm_weight: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor,
                      *, norm_fn: Callable, chunk_tokens: int, token_weights: torch.Tensor | None = None,
                      tp_group=None):
    """-> (sum of token_weights * token losses, sum of token losses), both float32 scalars, over the
    tokens of hidden [..., d] (labels [...], -100 ignored), logits = F.linear(norm_fn(hidden,
    norm_weight), head_weight) computed `chunk_tokens` tokens at a time. Only the first sum is
    differentiable (through hidden, norm_weight and head_weight). `tp_group` (size > 1): head_weight
    is this rank's vocabulary shard (module doc); both sums are then the whole vocabulary's."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1 (train.loss_chunk_tokens), got {chunk_tokens}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} must agree but for the last "
                         "dim")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    weights = None if token_weights is None else token_weights.reshape(-1).float()
    return _ChunkedHeadLoss.apply(flat_hidden, norm_weight, head_weight, labels.reshape(-1), weights, norm_fn,
                                  int(chunk_tokens), tp_group)
