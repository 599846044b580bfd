"""Log-linear mixers: log-linear Gated DeltaNet ("L") and log-linear Mamba-2 ("K").

Each is its base mixer (linear_mixers.py) with the op swapped for its log-linear form
(lctrain.kernels.loglinear_*) and one more projection: the level weights
lambda = softplus(x W_lambda + b_lambda), [B, T, H, model.loglinear_levels], per head as in the paper.
b_lambda starts at softplus^-1(1), so a fresh layer starts close to its base mixer (every lambda ~ 1).

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

from .linear_mixers import DeltaNetMixer, Mamba2Mixer


class _LevelWeights:
    """Mixin: the lambda projection and the op's extra arguments."""

    def _init_levels(self, d_model: int, levels: int) -> None:
        if levels < 1:
            raise ValueError(f"model.loglinear_levels must be >= 1, got {levels}")
        self.levels = levels
        self.l_proj = nn.Linear(d_model, self.n_heads * levels, bias=False)
        self.l_bias = nn.Parameter(torch.full((self.n_heads, levels), math.log(math.e - 1.0)))

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

    def __init__(self, d_model: int, *, levels: int, **kw):
        DeltaNetMixer.__init__(self, d_model, gated=True, **kw)
        self.op_name = "loglinear_gated_delta_rule"
        self._init_levels(d_model, levels)


class LogLinearMamba2Mixer(_LevelWeights, Mamba2Mixer):
    """Mamba-2 on loglinear_gated_linear_attn (layer letter "K")."""

    op_name = "loglinear_gated_linear_attn"

    def __init__(self, d_model: int, *, levels: int, **kw):
        Mamba2Mixer.__init__(self, d_model, **kw)
        self._init_levels(d_model, levels)
