"""Log-linear mixers: log-linear Gated DeltaNet ("L") and log-linear Mamba-2 ("K").

Each is its base mixer (linear_mixers.py) with the op swapped for its log-linear form
(lctrain.kernels.loglinear_*) and one more projection: the level weights
lambda = softplus(x W_lambda + b_lambda), [B, T, H, model.loglinear_levels], per head as in the paper.
b_lambda starts at softplus^-1(1), so a fresh layer starts close to its base mixer (every lambda ~ 1).
Under tensor parallelism the level weights follow their heads: W_lambda is column-parallel (its
outputs are head-major, so rank r's contiguous chunk is the levels of its heads) and b_lambda holds
the rows of this rank's heads.

Decoding: the cache holds the level states [B, H, L, K, V]; the op gets position_offset = the global
position of the first new token (HybridLM passes it), and one-token steps run the token recurrence
(backend "naive": O(L K V) per token, the log-linear decoding cost). Under CP the op is
lctrain.parallel.context_parallel(op, group), which places the tokens itself (no position_offset).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lctrain.parallel.mesh import group_size
from lctrain.parallel.tensor_parallel import column_linear, mark_split

from .linear_mixers import DeltaNetMixer, Mamba2Mixer


class _LevelWeights:
    """Mixin: the lambda projection and the op's extra arguments."""

    def _init_levels(self, d_model: int, levels: int, tp_group=None) -> None:
        """self.n_heads is this rank's heads (all of them without tensor parallelism)."""
        if levels < 1:
            raise ValueError(f"model.loglinear_levels must be >= 1, got {levels}")
        self.levels = levels
        self.l_proj = column_linear(d_model, self.n_heads * group_size(tp_group) * levels, tp_group)
        self.l_bias = nn.Parameter(torch.full((self.n_heads, levels), math.log(math.e - 1.0)))
        mark_split(self.l_bias, 0)

    def level_weights(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        lam = self.l_proj(x).float().view(B, T, self.n_heads, self.levels)
        return F.softplus(lam + self.l_bias.float())

    def _op_extras(self, x, position_offset, cache):
        kw = {}
        if self.cp_group is None:
            kw["position_offset"] = int(position_offset)
        if cache is not None and x.shape[1] == 1:
            kw["backend"] = "naive"
        return (self.level_weights(x),), kw


class LogLinearDeltaNetMixer(_LevelWeights, DeltaNetMixer):
    """Gated DeltaNet on loglinear_gated_delta_rule (layer letter "L")."""

    def __init__(self, d_model: int, *, levels: int, tp_group=None, **kw):
        DeltaNetMixer.__init__(self, d_model, gated=True, tp_group=tp_group, **kw)
        self.op_name = "loglinear_gated_delta_rule"
        self._init_levels(d_model, levels, tp_group)


class LogLinearMamba2Mixer(_LevelWeights, Mamba2Mixer):
    """Mamba-2 on loglinear_gated_linear_attn (layer letter "K")."""

    op_name = "loglinear_gated_linear_attn"

    def __init__(self, d_model: int, *, levels: int, tp_group=None, **kw):
        Mamba2Mixer.__init__(self, d_model, tp_group=tp_group, **kw)
        self._init_levels(d_model, levels, tp_group)
