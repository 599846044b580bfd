"""The language-model loss, correct under context parallelism.

Under CP each rank holds a contiguous shard of one sequence. `loss` is this rank's share:
(sum of its token losses) / (number of valid tokens in the whole CP group's sequence), so that the
SUM of parameter gradients over the CP ranks is the gradient of the full-sequence mean loss.

`token_weights` (same shape as labels) scales each token's loss in the differentiable share (e.g. x20
on the answer tokens of synthetic needle samples); the normalisation stays the number of valid
tokens, so weighting some tokens raises their share of the gradient instead of rescaling the rest.
The reported mean is always the unweighted mean. `answer_weights` makes those weights from a batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from lctrain.train.loss import IGNORE_INDEX, chunked_head_loss, token_cross_entropy


def lm_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, *, cp_group=None, position_offset: int = 0,
            token_weights: torch.Tensor | None = None, doc_bounds: list[list[int]] | None = None,
            loss_chunk_tokens: int = 0, stage_input: torch.Tensor | None = None):
    """-> (loss, mean_loss): this rank's differentiable share and the detached full-sequence mean.

    Labels equal to -100 are ignored. With `cp_group` None (or of size 1) and no token_weights both
    are the plain mean. `doc_bounds` (from the loader): the packed documents' global boundaries per
    sample, handed to the model so that it need not find them itself. `loss_chunk_tokens` > 0
    (train.loss_chunk_tokens): the head and the loss run in chunks of that many tokens
    (lctrain.train.loss), never materialising the whole logits. `stage_input`: on the last pipeline
    stage, the previous stage's output (the model starts from it instead of embedding input_ids).
    """
    if input_ids.shape != labels.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} must have the same "
                         "shape [B, T_local]")
    if token_weights is not None and token_weights.shape != labels.shape:
        raise ValueError(f"token_weights {tuple(token_weights.shape)} must have the labels' shape "
                         f"{tuple(labels.shape)}")
    model_kwargs = {} if doc_bounds is None else {"doc_bounds": doc_bounds}
    if stage_input is not None:
        model_kwargs["stage_input"] = stage_input
    tp_group = getattr(model, "tp_group", None)  # vocabulary-split logits under tensor parallelism
    if loss_chunk_tokens > 0:
        hidden = model.hidden_states(input_ids, position_offset=position_offset, **model_kwargs)
        weighted, token_losses = chunked_head_loss(hidden, model.norm.weight, model.lm_head.weight, labels,
                                                   norm_fn=model.norm.norm_fn, chunk_tokens=loss_chunk_tokens,
                                                   token_weights=token_weights, tp_group=tp_group)
    else:
        logits = model(input_ids, position_offset=position_offset, **model_kwargs)
        per_token = token_cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), tp_group)
        token_losses = per_token.sum()
        weighted = token_losses if token_weights is None else (per_token * token_weights.reshape(-1).float()).sum()
    stats = torch.stack([token_losses.detach(), (labels != IGNORE_INDEX).sum().to(token_losses.dtype)])
    if cp_group is not None and dist.get_world_size(cp_group) > 1:
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=cp_group)
    total_loss, n_tokens = stats[0], stats[1].clamp(min=1.0)
    return weighted / n_tokens, total_loss / n_tokens


def answer_weights(batch: dict, answer_loss_weight: float, device) -> torch.Tensor | None:
    """Per-token loss weights: train.answer_loss_weight on the tokens the dataset marks as answers
    (its `answer_mask` column: the synthetic needle samples' answer digits), 1 elsewhere. None when
    the data has no such column or the weight is 1."""
    mask = batch.get("answer_mask")
    if mask is None or answer_loss_weight == 1.0:
        return None
    return 1.0 + (float(answer_loss_weight) - 1.0) * mask.to(device, non_blocking=True).float()
