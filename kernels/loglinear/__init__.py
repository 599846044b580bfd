"""Log-linear attention over the Gated DeltaNet and Mamba-2 transitions (Fenwick-tree levels).

levels.py (the level structure), naive.py (token recurrence, ground truth), dense.py (masked T x T
form), chunk.py (per-level runs of the base ops: backends "torch", "triton_composed"), fused.py with
triton_intra.py and triton_levels.py (backend "triton": the Triton kernels), ops.py (public entry points).
"""
from .levels import level, levels_needed
from .ops import loglinear_gated_delta_rule, loglinear_gated_linear_attn

__all__ = ["loglinear_gated_delta_rule", "loglinear_gated_linear_attn", "level", "levels_needed"]
