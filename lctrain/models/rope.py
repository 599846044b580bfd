"""Rotary position embedding with the context-extension scalings of `model.rope`.

Plain RoPE (head dim d, pairs i = 0 .. d/2-1): theta_i = base^(-2i/d); position p rotates pair i by
the angle p * theta_i. Pairs are the two halves of the head dim (x[:d/2], x[d/2:]), as in GPT-NeoX/Llama.

Scalings, with s = rope.factor and L = the original context length (rope.original_max_position, or
the `max_position` the model was built with when that is 0):
- none:   theta_i unchanged.
- linear: position interpolation, angle = (p / s) * theta_i, i.e. theta_i / s.
- ntk:    NTK-aware base change, base' = base * s^(d / (d - 2)); the lowest frequency is stretched by s
          and the highest is untouched.
- yarn:   "NTK-by-parts": with r_i = L * theta_i / (2 pi) (turns of pair i over L) and the ramp
          gamma_i = clamp((r_i - alpha) / (beta - alpha), 0, 1), alpha = 1, beta = 32,
          theta'_i = (1 - gamma_i) * theta_i / s + gamma_i * theta_i (slow pairs interpolate, fast pairs
          keep theta). Attention temperature: cos/sin are multiplied by m = 0.1 ln(s) + 1, so q.k logits
          grow by m^2 (YaRN's sqrt(1/t) = 0.1 ln(s) + 1).
"""
from __future__ import annotations

import functools
import math

import torch
from torch import nn

RELATIVE_SCALINGS = ("rerope", "leaky_rerope")  # applied inside global attention (lctrain/models/rerope.py)
YARN_ALPHA = 1.0
YARN_BETA = 32.0


def rope_inv_freq(head_dim: int, base: float = 10000.0, scaling: str = "none", factor: float = 1.0,
                  original_max_position: int = 0) -> tuple[torch.Tensor, float]:
    """(theta [head_dim/2] float64, attention magnitude m) for the given scaling (see module doc)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dim (model.attn_head_dim), got {head_dim}")
    if scaling not in ("none", "rerope") and factor < 1.0:
        raise ValueError(f"model.rope.factor must be >= 1 for scaling={scaling!r}, got {factor}")
    d = head_dim
    idx = torch.arange(0, d, 2, dtype=torch.float64)
    theta = base ** (-idx / d)
    if scaling in ("none",) + RELATIVE_SCALINGS:  # (Leaky) ReRoPE changes relative positions, not theta
        return theta, 1.0
    if scaling == "linear":
        return theta / factor, 1.0
    if scaling == "ntk":
        new_base = base * factor ** (d / (d - 2)) if d > 2 else base * factor
        return new_base ** (-idx / d), 1.0
    if scaling == "yarn":
        if original_max_position <= 0:
            raise ValueError("YaRN needs the original context length: set model.rope.original_max_position "
                             "(or build the model with max_position=<training seq_len>)")
        turns = original_max_position * theta / (2 * math.pi)
        gamma = ((turns - YARN_ALPHA) / (YARN_BETA - YARN_ALPHA)).clamp(0.0, 1.0)
        new_theta = (1 - gamma) * theta / factor + gamma * theta
        mscale = 0.1 * math.log(factor) + 1.0 if factor > 1.0 else 1.0
        return new_theta, mscale
    raise ValueError(f"unknown model.rope.scaling {scaling!r}; use none, linear, ntk, yarn, rerope or leaky_rerope")


def rotary_dim(head_dim: int, fraction: float) -> int:
    """Dims rotated by partial RoPE (model.rope.fraction): the even number nearest fraction * head_dim."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"model.rope.fraction must lie in (0, 1], got {fraction}")
    dim = 2 * round(fraction * head_dim / 2)
    if dim < 2:
        raise ValueError(f"model.rope.fraction={fraction} rotates {dim} of {head_dim} dims; rotate at least 2 "
                         "(a larger fraction), or drop positions from a layer with model.rope.layers")
    return dim


class RotaryEmbedding(nn.Module):
    """Applies RoPE at explicit (global) positions. Angles are computed in float64 on the fly, so
    positions of 100K+ tokens keep their precision; no table of max length is kept.

    ``fraction`` < 1 is partial RoPE: only the first ``rotary_dim(head_dim, fraction)`` dims of each
    head rotate (with frequencies spread over those dims), the rest carry no position. With scaling
    ``rerope`` / ``leaky_rerope`` the rotation is plain and ``rerope`` holds (window, leak) for the
    global attention layers (lctrain/models/rerope.py)."""

    def __init__(self, head_dim: int, base: float = 10000.0, scaling: str = "none", factor: float = 1.0,
                 original_max_position: int = 0, fraction: float = 1.0, rerope_window: int = 0):
        super().__init__()
        self.head_dim, self.base = head_dim, base
        # (window, leak) for ReRoPE (leak 0) / Leaky ReRoPE (leak 1/factor): global attention layers then
        # attend through rerope_attention with unrotated q, k; None = ordinary rotation
        self.rerope: tuple[int, float] | None = None
        if scaling in RELATIVE_SCALINGS:
            if rerope_window < 1:
                raise ValueError(f"model.rope.scaling={scaling} needs model.rope.rerope_window >= 1, got "
                                 f"{rerope_window}")
            self.rerope = (int(rerope_window), 0.0 if scaling == "rerope" else 1.0 / factor)
        self.rotary_dim = rotary_dim(head_dim, fraction)
        theta, mscale = rope_inv_freq(self.rotary_dim, base, scaling, factor, original_max_position)
        self.register_buffer("inv_freq", theta.float(), persistent=False)
        self._theta64 = theta
        self.mscale = mscale

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, rotary_dim] (already times mscale) for integer positions [T]."""
        theta = self._theta64.to(positions.device)
        angles = positions.to(torch.float64)[:, None] * theta[None, :]
        angles = torch.cat([angles, angles], dim=-1)
        return (angles.cos() * self.mscale).to(dtype), (angles.sin() * self.mscale).to(dtype)

    compiled = False  # model.compile: rotate through the compiled function (lctrain.models.fused)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, T, H, D] rotated at positions [T]."""
        cos, sin = self.cos_sin(positions, torch.float32)
        return self.rotate(x, cos, sin)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, H, D] rotated by cos / sin [T, rotary_dim] (float32, from cos_sin / cos_sin_range)."""
        from .fused import compiled, rotate_math, use_triton

        if self.compiled:
            return compiled(rotate_math)(x, cos, sin, self.rotary_dim)
        D = x.shape[-1]
        if use_triton(x) and self.rotary_dim == D and D & (D - 1) == 0 and cos.shape == (x.shape[1], D):
            from lctrain.kernels.rope import rope_rotate

            return rope_rotate(x, cos, sin)  # one Triton kernel each way, the same float32 formula
        return rotate_math(x, cos, sin, self.rotary_dim)

    def cos_sin_range(self, start: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos_sin of positions start .. start+length-1 in float32, computed once and kept (the last
        range only: 0.5 GiB at 512K tokens): every layer of a forward, and its checkpoint
        recomputation, rotates at the same positions, so the float64 angles are not recomputed per
        layer and per call."""
        key = (int(start), int(length), str(device))
        cache = self.__dict__.setdefault("_range_cache", {})
        if key not in cache:
            cache.clear()
            with torch.inference_mode(False), torch.no_grad():  # usable by a later training step too
                cache[key] = self.cos_sin(torch.arange(start, start + length, device=device), torch.float32)
        return cache[key]


# ------------------------------------------------------------------ the base bounds the context length

BOUND_GRID_PER_DECADE = 200  # scan resolution of base_lower_bound: 10^(1/200) ~ 1.2% steps
BOUND_MAX_BASE = 1e15


def decay_criterion_holds(base: float, rotary_dim: int, context: int) -> bool:
    """Whether sum_i cos(m theta_i) >= 0 for every relative distance m = 0 .. context - 1, with
    theta_i = base^(-2i/d). Distances are checked in growing blocks, so a base that fails early is
    rejected cheaply."""
    import numpy as np

    theta = base ** (-np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    start, block = 0, 1024
    while start < context:
        m = np.arange(start, min(context, start + block), dtype=np.float64)
        if np.cos(np.outer(m, theta)).sum(axis=1).min() < 0:
            return False
        start += block
        block = min(block * 2, 1 << 16)
    return True


@functools.lru_cache(maxsize=64)
def base_lower_bound(rotary_dim: int, context: int) -> float:
    """The smallest RoPE base b for which the "base bounds context length" criterion holds at
    context length T = ``context`` with ``rotary_dim`` rotated dims d (even).

    The criterion (long-term decay of the ability to tell a similar key from a random one): for
    a query q and a key k = q + noise, the expected advantage of the similar key over a random one
    at relative distance m is proportional to

        B(m) = sum_{i=0}^{d/2-1} cos(m theta_i),     theta_i = b^(-2i/d),

    and a model can only prefer similar tokens at every distance it trains on if B(m) >= 0 for all
    m = 0 .. T-1. B(m) dips below zero first where m theta_i passes pi/2 for the slow pairs, and a
    larger b slows all pairs but the first, so the criterion fails below some base and holds above it
    (not monotonically just above it: isolated good bases can sit below the first stable one).

    Computation: scan b = 2 * 10^(j/200) upwards and take the first grid point where B(m) >= 0 for
    every m < T (exact cosines, float64); then bisect between it and the grid point below to 0.1%.
    Worked examples (d = 4: theta = (1, b^-1/2), so B(m) = cos m + cos(m / sqrt b)):
      T = 3: m = 2 needs cos(2 / sqrt b) >= -cos 2 = cos(pi - 2), i.e. b >= (2 / (pi - 2))^2 = 3.069;
      T = 4: m = 3 needs 3 / sqrt b <= pi - 3, i.e. b >= (3 / (pi - 3))^2 = 448.9 (m = 2 then holds too).
    For d = 128 it gives 4.31e3 at T = 1024 and 6.3e5 at T = 32768 (the published figures of Men et
    al. 2024 read 4.3e3 and 6.4e5). Raises ValueError when no base up to 1e15 satisfies it (d = 2:
    B(m) = cos m, negative at m = 2, whatever b)."""
    if rotary_dim < 2 or rotary_dim % 2:
        raise ValueError(f"the rotated head dim must be even and >= 2, got {rotary_dim}")
    if context < 1:
        raise ValueError(f"the context length must be >= 1, got {context}")
    step = 10.0 ** (1.0 / BOUND_GRID_PER_DECADE)
    lo, b = None, 2.0
    while b <= BOUND_MAX_BASE:
        if decay_criterion_holds(b, rotary_dim, context):
            break
        lo, b = b, b * step
    else:
        raise ValueError(f"no RoPE base up to {BOUND_MAX_BASE:g} satisfies the criterion at context {context} "
                         f"with {rotary_dim} rotated dims")
    if lo is None:
        return b
    hi = b
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        if decay_criterion_holds(mid, rotary_dim, context):
            hi = mid
        else:
            lo = mid
    return hi
