"""Public entry points of lctrain.kernels: input validation and backend dispatch.

Backends
--------
- ``"naive"``:  token-by-token recurrence (``naive.py``), the ground truth; slow.
- ``"torch"``:  chunkwise PyTorch (``chunk.py``); the CPU implementation and the GPU fallback.
- ``"triton"``: Triton kernels living in ``lctrain.kernels.triton``.
- ``"auto"``:   ``"triton"`` when the inputs are on CUDA and a Triton version of the op exists,
  else ``"torch"``.

How the Triton kernels plug in
------------------------------
Two ways, checked in this order:

1. ``register_backend("triton", op_name, fn)`` (any module may call it at import time);
2. a lazily imported module ``lctrain.kernels.triton.ops`` that defines functions named exactly
   ``delta_rule``, ``gated_delta_rule``, ``gated_linear_attn``, ``shard_transition``,
   ``shard_state_grad`` with the public signatures minus ``backend`` (``chunk_size`` is passed
   through). An op the module lacks is simply "not provided": ``auto`` then uses ``torch``.

Inputs are validated here once, so implementations may assume well-formed tensors. Asking for
``backend="triton"`` when no Triton version of the op can be had raises a ``RuntimeError`` naming why.
"""
from __future__ import annotations

import importlib
import numbers
from typing import Callable

import torch

from . import naive

OP_NAMES = ("delta_rule", "gated_delta_rule", "gated_linear_attn", "shard_transition",
            "shard_state_grad")
BUILTIN_BACKENDS = ("auto", "naive", "torch", "triton")
TRANSITION_KINDS = ("delta", "gated_delta", "gla")

_REGISTRY: dict[tuple[str, str], Callable] = {}
_TRITON_MODULE = "lctrain.kernels.triton.ops"
_triton_import: tuple[object | None, str | None] | None = None  # (module, error) cached


def register_backend(name: str, op_name: str, fn: Callable) -> None:
    """Register ``fn`` as backend ``name`` of op ``op_name`` (same signature as the public op minus
    ``backend``). ``name`` may be ``"triton"`` or a new backend name; ``"auto"``, ``"naive"`` and
    ``"torch"`` are reserved."""
    if op_name not in OP_NAMES:
        raise ValueError(f"register_backend: unknown op_name {op_name!r}; expected one of {OP_NAMES}")
    if name in ("auto", "naive", "torch"):
        raise ValueError(f"register_backend: backend name {name!r} is reserved; pick another name")
    if not callable(fn):
        raise TypeError(f"register_backend: fn for {name}/{op_name} must be callable")
    _REGISTRY[(name, op_name)] = fn


def _load_triton_module():
    global _triton_import
    if _triton_import is None:
        try:
            _triton_import = (importlib.import_module(_TRITON_MODULE), None)
        except ImportError as e:  # module not written yet, or triton missing
            _triton_import = (None, f"{type(e).__name__}: {e}")
    return _triton_import


def _triton_fn(op_name: str) -> tuple[Callable | None, str]:
    fn = _REGISTRY.get(("triton", op_name))
    if fn is not None:
        return fn, ""
    module, err = _load_triton_module()
    if module is None:
        return None, f"could not import {_TRITON_MODULE} ({err})"
    fn = getattr(module, op_name, None)
    if fn is None:
        return None, f"{_TRITON_MODULE} defines no function {op_name!r}"
    return fn, ""


def _chunk_module():
    from . import chunk
    return chunk


def resolve_backend(backend: str, op_name: str, device: torch.device) -> str:
    """The concrete backend that ``backend`` means for ``op_name`` on ``device``."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        if device.type == "cuda" and _triton_fn(op_name)[0] is not None:
            return "triton"
        return "torch"
    if backend in ("naive", "torch"):
        return backend
    if backend == "triton":
        fn, why = _triton_fn(op_name)
        if fn is None:
            raise RuntimeError(f"backend='triton' requested for {op_name} but it is unavailable: {why}. "
                               "Use backend='torch' or 'auto'.")
        if device.type != "cuda" and not _interpreting():
            raise RuntimeError(f"backend='triton' for {op_name} needs CUDA tensors (got {device}); "
                               "set TRITON_INTERPRET=1 to run it on CPU, or use backend='torch'.")
        return backend
    if any(name == backend for name, _ in _REGISTRY):
        if (backend, op_name) not in _REGISTRY:
            raise RuntimeError(f"backend {backend!r} does not provide {op_name}")
        return backend
    registered = sorted({name for name, _ in _REGISTRY} - set(BUILTIN_BACKENDS))
    raise ValueError(f"unknown backend {backend!r}; choose one of {list(BUILTIN_BACKENDS) + registered}")


def _interpreting() -> bool:
    import os
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------- validation

def _check_tensor(name: str, x, ndim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _validate(q, k, v, *, g=None, beta=None, need_g=False, need_beta=False, scale=None,
              initial_state=None, chunk_size=64, v_name="v", check_q=True) -> None:
    if check_q:
        _check_tensor("q", q, 4)
    _check_tensor("k", k, 4)
    _check_tensor(v_name, v, 4)
    B, T, H, K = k.shape
    if check_q and q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape [B, T, H, K]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"{v_name} must be [B, T, H, V] with B, T, H = {(B, T, H)} as in k; got "
                         f"{tuple(v.shape)}")
    if T < 1 or K < 1 or v.shape[-1] < 1:
        raise ValueError(f"sequence length and head dims must be >= 1; got k {tuple(k.shape)}, "
                         f"{v_name} {tuple(v.shape)}")
    if check_q and not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, {v_name} must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, x, needed in (("g", g, need_g), ("beta", beta, need_beta)):
        if x is None:
            if needed:
                raise ValueError(f"{name} is required for this op")
            continue
        if not needed:
            raise ValueError(f"{name} is not used by this op; pass None")
        _check_tensor(name, x, 3)
        if tuple(x.shape) != (B, T, H):
            raise ValueError(f"{name} must be [B, T, H] = {[B, T, H]}, got {list(x.shape)}")
    if initial_state is not None:
        _check_tensor("initial_state", initial_state, 4)
        want = (B, H, K, v.shape[-1])
        if tuple(initial_state.shape) != want:
            raise ValueError(f"initial_state must be [B, H, K, V] = {list(want)}, got "
                             f"{list(initial_state.shape)}")
    devices = {x.device for x in (q if check_q else None, k, v, g, beta, initial_state)
               if x is not None}
    if len(devices) > 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise TypeError(f"scale must be a real number or None, got {scale!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


# ----------------------------------------------------------------------------------------- the ops

def _dispatch(op_name, backend, chunk_size, q, k, v, g, beta, **kw):
    """Run a validated op on the chosen backend. g / beta are None where the mixer has none; the
    Triton entry points take the ones it has positionally, in the order (g, beta)."""
    which = resolve_backend(backend, op_name, q.device)
    if which == "naive":
        return naive.naive_recurrence(q, k, v, g=g, beta=beta, **kw)
    if which == "torch":
        return _chunk_module().chunk_recurrence(q, k, v, g=g, beta=beta, chunk_size=chunk_size, **kw)
    fn = _REGISTRY.get((which, op_name)) or _triton_fn(op_name)[0]
    gates = tuple(x for x in (g, beta) if x is not None)
    return fn(q, k, v, *gates, chunk_size=chunk_size, **kw)


def delta_rule(q, k, v, beta, *, scale=None, initial_state=None, output_final_state=False,
               backend="auto", chunk_size=64):
    """DeltaNet: S_t = (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T, o_t = scale S_t^T q_t.

    Returns (o [B, T, H, V] in q.dtype, final state [B, H, K, V] float32 or None)."""
    _validate(q, k, v, beta=beta, need_beta=True, scale=scale, initial_state=initial_state,
              chunk_size=chunk_size)
    return _dispatch("delta_rule", backend, chunk_size, q, k, v, None, beta,
                     scale=scale, initial_state=initial_state, output_final_state=output_final_state)


def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                     backend="auto", chunk_size=64):
    """Gated DeltaNet: S_t = exp(g_t) (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T."""
    _validate(q, k, v, g=g, beta=beta, need_g=True, need_beta=True, scale=scale,
              initial_state=initial_state, chunk_size=chunk_size)
    return _dispatch("gated_delta_rule", backend, chunk_size, q, k, v, g, beta,
                     scale=scale, initial_state=initial_state, output_final_state=output_final_state)


def gated_linear_attn(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False,
                      backend="auto", chunk_size=64):
    """Mamba-2 style scalar-gated linear attention: S_t = exp(g_t) S_{t-1} + k_t v_t^T."""
    _validate(q, k, v, g=g, need_g=True, scale=scale, initial_state=initial_state,
              chunk_size=chunk_size)
    return _dispatch("gated_linear_attn", backend, chunk_size, q, k, v, g, None,
                     scale=scale, initial_state=initial_state, output_final_state=output_final_state)


# ------------------------------------------------------------------------ context-parallel primitives

def _check_kind(kind, g, beta) -> tuple[bool, bool]:
    if kind not in TRANSITION_KINDS:
        raise ValueError(f"kind must be one of {TRANSITION_KINDS}, got {kind!r}")
    need_g = kind in ("gated_delta", "gla")
    need_beta = kind in ("delta", "gated_delta")
    return need_g, need_beta


def shard_transition(kind, k, v, *, g=None, beta=None, backend="auto", chunk_size=64):
    """The shard as an affine map of its incoming state: S_out = A @ S_in + Bst.

    A: [B, H, K, K] float32 (= M_T ... M_1), or [B, H] (the scalar decay exp(sum g)) for "gla";
    Bst: [B, H, K, V] float32, the shard's final state from a zero start. Runs without autograd."""
    need_g, need_beta = _check_kind(kind, g, beta)
    _validate(None, k, v, g=g, beta=beta, need_g=need_g, need_beta=need_beta,
              chunk_size=chunk_size, check_q=False)
    which = resolve_backend(backend, "shard_transition", k.device)
    with torch.no_grad():
        if which == "naive":
            return naive.naive_shard_transition(k, v, g=g, beta=beta)
        if which == "torch":
            return _chunk_module().chunk_shard_transition(k, v, g=g, beta=beta, chunk_size=chunk_size)
        fn = _REGISTRY.get((which, "shard_transition")) or _triton_fn("shard_transition")[0]
        return fn(kind, k, v, g=g, beta=beta, chunk_size=chunk_size)


def shard_state_grad(kind, q, k, do, *, g=None, beta=None, scale=None, backend="auto",
                     chunk_size=64):
    """G [B, H, K, V] float32 = d sum(o * do) / d initial_state for this shard's own outputs
    (= sum_t scale (M_t ... M_1)^T q_t do_t^T). Runs without autograd."""
    need_g, need_beta = _check_kind(kind, g, beta)
    _validate(q, k, do, g=g, beta=beta, need_g=need_g, need_beta=need_beta, scale=scale,
              chunk_size=chunk_size, v_name="do", check_q=True)
    which = resolve_backend(backend, "shard_state_grad", q.device)
    with torch.no_grad():
        if which == "naive":
            return naive.naive_shard_state_grad(q, k, do, g=g, beta=beta, scale=scale)
        if which == "torch":
            return _chunk_module().chunk_shard_state_grad(q, k, do, g=g, beta=beta, scale=scale,
                                                          chunk_size=chunk_size)
        fn = _REGISTRY.get((which, "shard_state_grad")) or _triton_fn("shard_state_grad")[0]
        return fn(kind, q, k, do, g=g, beta=beta, scale=scale, chunk_size=chunk_size)


def apply_transition(A: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """A @ S for a matrix transition [B, H, K, K]; A[..., None, None] * S for a scalar one [B, H]."""
    if A.dim() == S.dim() - 2:
        return A[..., None, None] * S
    if A.dim() == S.dim():
        return A @ S
    raise ValueError(f"apply_transition: A {tuple(A.shape)} does not fit state {tuple(S.shape)}; "
                     "A must be [B, H, K, K] or [B, H]")


def apply_transition_transposed(A: torch.Tensor, dS: torch.Tensor) -> torch.Tensor:
    """A^T @ dS (matrix A) or A[..., None, None] * dS (scalar A): the backward fold's step."""
    if A.dim() == dS.dim() - 2:
        return A[..., None, None] * dS
    if A.dim() == dS.dim():
        return A.transpose(-1, -2) @ dS
    raise ValueError(f"apply_transition_transposed: A {tuple(A.shape)} does not fit gradient "
                     f"{tuple(dS.shape)}; A must be [B, H, K, K] or [B, H]")
