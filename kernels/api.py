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
   ``shard_final_state``, ``shard_state_grad`` with the public signatures minus ``backend`` (``chunk_size`` is passed
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
            "shard_final_state", "shard_state_grad")
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
              initial_state=None, chunk_size=64, v_name="v", check_q=True, cu_seqlens=None) -> list[int] | None:
    """Checks every input; returns the document boundaries as ints when cu_seqlens is given."""
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
    bounds = check_cu_seqlens(cu_seqlens, B, T, k.device)
    if initial_state is not None:
        _check_tensor("initial_state", initial_state, 4)
        rows, what = (B, "B") if bounds is None else (len(bounds) - 1, "N (one per document of cu_seqlens)")
        want = (rows, H, K, v.shape[-1])
        if tuple(initial_state.shape) != want:
            raise ValueError(f"initial_state must be [{what}, H, K, V] = {list(want)}, got "
                             f"{list(initial_state.shape)}")
    devices = {x.device for x in (q if check_q else None, k, v, g, beta, initial_state)
               if x is not None}
    if len(devices) > 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise TypeError(f"scale must be a real number or None, got {scale!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return bounds


def check_cu_seqlens(cu_seqlens, batch: int, seq_len: int, device) -> list[int] | None:
    """Validates packed-sequence boundaries; returns them as a list of ints (None for None).

    ``cu_seqlens``: 1-D int32/int64 tensor ``[N+1]`` on ``device``, starting at 0, strictly
    increasing, ending at ``seq_len``; only with ``batch == 1`` (the documents are packed into one
    stream). Reads the values on the host: one small device-to-host copy per tensor, remembered while
    the tensor lives unmodified (a model passes one cu_seqlens to all its layers)."""
    if cu_seqlens is None:
        return None
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a 1-D int32/int64 torch.Tensor of document boundaries, got "
                        f"{type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D [N+1] with N >= 1 documents, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if torch.device(device) != cu_seqlens.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but the inputs are on {device}; move it "
                         "to the inputs' device")
    if batch != 1:
        raise ValueError(f"cu_seqlens needs the documents packed into one stream of batch size 1, got batch "
                         f"{batch}; reshape [B, T, ...] to [1, B*T, ...] and add the row ends to cu_seqlens")
    seen = getattr(cu_seqlens, "_lctrain_bounds", None)
    if seen is not None and seen[0] == cu_seqlens._version:
        bounds = seen[1]  # checked when remembered: every layer of a model passes the same tensor
    else:
        bounds = [int(b) for b in cu_seqlens.tolist()]
        if bounds[0] != 0:
            raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]}")
        bad = next((i for i in range(1, len(bounds)) if bounds[i] <= bounds[i - 1]), None)
        if bad is not None:
            raise ValueError(f"cu_seqlens must be strictly increasing (no empty documents); entries {bad - 1} "
                             f"and {bad} are {bounds[bad - 1]}, {bounds[bad]}")
        cu_seqlens._lctrain_bounds = (cu_seqlens._version, bounds)
    if bounds[-1] != seq_len:
        raise ValueError(f"cu_seqlens must end at the sequence length T={seq_len}, got {bounds[-1]}")
    return bounds


# ----------------------------------------------------------------------------------------- the ops

def _dispatch(op_name, backend, chunk_size, q, k, v, g, beta, bounds=None, cu_seqlens=None, **kw):
    """Run a validated op on the chosen backend. g / beta are None where the mixer has none; the
    Triton entry points take the ones it has positionally, in the order (g, beta).

    With document boundaries (``bounds`` from ``cu_seqlens``): a backend function that takes a
    ``cu_seqlens`` keyword gets it; the others run once per document (``per_document``)."""
    which = resolve_backend(backend, op_name, q.device)
    if which == "naive":
        fn = lambda q, k, v, g, beta, **kw: naive.naive_recurrence(q, k, v, g=g, beta=beta, **kw)  # noqa: E731
    elif which == "torch":
        fn = lambda q, k, v, g, beta, **kw: _chunk_module().chunk_recurrence(  # noqa: E731
            q, k, v, g=g, beta=beta, chunk_size=chunk_size, **kw)
    else:
        backend_fn = _REGISTRY.get((which, op_name)) or _triton_fn(op_name)[0]
        if bounds is not None and _takes_cu_seqlens(backend_fn):
            gates = tuple(x for x in (g, beta) if x is not None)
            return backend_fn(q, k, v, *gates, chunk_size=chunk_size, cu_seqlens=cu_seqlens, **kw)

        def fn(q, k, v, g, beta, **kw):
            gates = tuple(x for x in (g, beta) if x is not None)
            return backend_fn(q, k, v, *gates, chunk_size=chunk_size, **kw)
    if bounds is None:
        return fn(q, k, v, g, beta, **kw)
    # naive / torch, and a registered backend without a cu_seqlens keyword: exact per-document
    # runs. The Triton ops take cu_seqlens (native varlen kernels) and are called directly above.
    return per_document(fn, bounds, q, k, v, g, beta, **kw)


def _takes_cu_seqlens(fn: Callable) -> bool:
    import inspect

    try:
        return "cu_seqlens" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def per_document(fn: Callable, bounds: list[int], q, k, v, g, beta, *, initial_state=None,
                 output_final_state=False, **kw):
    """Runs ``fn(q, k, v, g, beta, initial_state=, output_final_state=, **kw)`` on every document
    ``[bounds[i], bounds[i+1])`` of a B=1 packed stream alone (document i starts from
    ``initial_state[i]``, or zeros); returns (o [1, T, H, V], final states [N, H, K, V] or None)."""
    cut = lambda x, s, e: None if x is None else x[:, s:e]  # noqa: E731
    outs, finals = [], []
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        init = None if initial_state is None else initial_state[i:i + 1]
        o, S = fn(cut(q, s, e), cut(k, s, e), cut(v, s, e), cut(g, s, e), cut(beta, s, e),
                  initial_state=init, output_final_state=output_final_state, **kw)
        outs.append(o)
        finals.append(S)
    o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return o, (torch.cat(finals, dim=0) if output_final_state else None)


def delta_rule(q, k, v, beta, *, scale=None, initial_state=None, output_final_state=False,
               backend="auto", chunk_size=64, cu_seqlens=None):
    """DeltaNet: S_t = (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T, o_t = scale S_t^T q_t.

    Returns (o [B, T, H, V] in q.dtype, final state [B, H, K, V] float32 or None).

    ``cu_seqlens`` (every op): int32/int64 ``[N+1]`` boundaries of N documents packed into one B=1
    stream; the state restarts at each boundary, ``initial_state`` and the final state are then
    ``[N, H, K, V]`` (one per document)."""
    bounds = _validate(q, k, v, beta=beta, need_beta=True, scale=scale, initial_state=initial_state,
                       chunk_size=chunk_size, cu_seqlens=cu_seqlens)
    return _dispatch("delta_rule", backend, chunk_size, q, k, v, None, beta, bounds, cu_seqlens,
                     scale=scale, initial_state=initial_state, output_final_state=output_final_state)


def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                     backend="auto", chunk_size=64, cu_seqlens=None):
    """Gated DeltaNet: S_t = exp(g_t) (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T."""
    bounds = _validate(q, k, v, g=g, beta=beta, need_g=True, need_beta=True, scale=scale,
                       initial_state=initial_state, chunk_size=chunk_size, cu_seqlens=cu_seqlens)
    return _dispatch("gated_delta_rule", backend, chunk_size, q, k, v, g, beta, bounds, cu_seqlens,
                     scale=scale, initial_state=initial_state, output_final_state=output_final_state)


def gated_linear_attn(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False,
                      backend="auto", chunk_size=64, cu_seqlens=None):
    """Mamba-2 style scalar-gated linear attention: S_t = exp(g_t) S_{t-1} + k_t v_t^T."""
    bounds = _validate(q, k, v, g=g, need_g=True, scale=scale, initial_state=initial_state,
                       chunk_size=chunk_size, cu_seqlens=cu_seqlens)
    return _dispatch("gated_linear_attn", backend, chunk_size, q, k, v, g, None, bounds, cu_seqlens,
                     scale=scale, initial_state=initial_state, output_final_state=output_final_state)


# ------------------------------------------------------------------------ context-parallel primitives

def _check_kind(kind, g, beta) -> tuple[bool, bool]:
    if kind not in TRANSITION_KINDS:
        raise ValueError(f"kind must be one of {TRANSITION_KINDS}, got {kind!r}")
    need_g = kind in ("gated_delta", "gla")
    need_beta = kind in ("delta", "gated_delta")
    return need_g, need_beta


def shard_transition(kind, k, v, *, g=None, beta=None, backend="auto", chunk_size=64, cu_seqlens=None):
    """The shard as an affine map of its incoming state: S_out = A @ S_in + Bst.

    A: [B, H, K, K] float32 (= M_T ... M_1), or [B, H] (the scalar decay exp(sum g)) for "gla";
    Bst: [B, H, K, V] float32, the shard's final state from a zero start. Runs without autograd.

    With ``cu_seqlens`` (B=1, boundaries local to this shard): (A, Bst) of the shard's LAST document
    piece, after its last boundary: S_out = A @ S_piece_start + Bst. Context parallelism cuts the
    chain over ranks itself where a piece starts a document."""
    need_g, need_beta = _check_kind(kind, g, beta)
    bounds = _validate(None, k, v, g=g, beta=beta, need_g=need_g, need_beta=need_beta,
                       chunk_size=chunk_size, check_q=False, cu_seqlens=cu_seqlens)
    which = resolve_backend(backend, "shard_transition", k.device)
    fn = _REGISTRY.get((which, "shard_transition")) or (_triton_fn("shard_transition")[0]
                                                        if which == "triton" else None)
    if bounds is not None:
        if fn is not None and _takes_cu_seqlens(fn):
            with torch.no_grad():
                return fn(kind, k, v, g=g, beta=beta, chunk_size=chunk_size, cu_seqlens=cu_seqlens)
        s = bounds[-2]  # the last piece alone (no boundary inside it)
        k, v = k[:, s:], v[:, s:]
        g, beta = (None if x is None else x[:, s:] for x in (g, beta))
    with torch.no_grad():
        if which == "naive":
            return naive.naive_shard_transition(k, v, g=g, beta=beta)
        if which == "torch":
            return _chunk_module().chunk_shard_transition(k, v, g=g, beta=beta, chunk_size=chunk_size)
        return fn(kind, k, v, g=g, beta=beta, chunk_size=chunk_size)


def shard_final_state(kind, k, v, *, g=None, beta=None, initial_state=None, backend="auto", chunk_size=64):
    """The shard's final state [B, H, K, V] float32 from ``initial_state`` (zero when None), without
    the transition A: ``A @ initial_state + Bst`` of ``shard_transition`` at about half its cost on
    the Triton backend (only the state's column blocks run, not A's). Context parallelism uses it
    where the incoming state is known (rank 0, or a shard whose last document piece starts a
    document), so that A would only ever multiply a known state. Runs without autograd."""
    need_g, need_beta = _check_kind(kind, g, beta)
    _validate(None, k, v, g=g, beta=beta, need_g=need_g, need_beta=need_beta, initial_state=initial_state,
              chunk_size=chunk_size, check_q=False)
    which = resolve_backend(backend, "shard_final_state", k.device)
    with torch.no_grad():
        if which == "naive":
            return naive.naive_recurrence(k, k, v, g=g, beta=beta, initial_state=initial_state,
                                          output_final_state=True)[1]
        if which == "torch":
            return _chunk_module().chunk_shard_final_state(k, v, g=g, beta=beta, initial_state=initial_state,
                                                           chunk_size=chunk_size)
        fn = _REGISTRY.get((which, "shard_final_state")) or _triton_fn("shard_final_state")[0]
        return fn(kind, k, v, g=g, beta=beta, initial_state=initial_state, chunk_size=chunk_size)


def shard_state_grad(kind, q, k, do, *, g=None, beta=None, scale=None, backend="auto",
                     chunk_size=64, cu_seqlens=None):
    """G [B, H, K, V] float32 = d sum(o * do) / d initial_state for this shard's own outputs
    (= sum_t scale (M_t ... M_1)^T q_t do_t^T). Runs without autograd.

    With ``cu_seqlens`` (B=1, boundaries local to this shard): the incoming state feeds only the
    first document piece, so G comes from that piece's outputs alone."""
    need_g, need_beta = _check_kind(kind, g, beta)
    bounds = _validate(q, k, do, g=g, beta=beta, need_g=need_g, need_beta=need_beta, scale=scale,
                       chunk_size=chunk_size, v_name="do", check_q=True, cu_seqlens=cu_seqlens)
    which = resolve_backend(backend, "shard_state_grad", q.device)
    fn = _REGISTRY.get((which, "shard_state_grad")) or (_triton_fn("shard_state_grad")[0]
                                                        if which == "triton" else None)
    if bounds is not None:
        if fn is not None and _takes_cu_seqlens(fn):
            with torch.no_grad():
                return fn(kind, q, k, do, g=g, beta=beta, scale=scale, chunk_size=chunk_size,
                          cu_seqlens=cu_seqlens)
        e = bounds[1]  # the first piece alone
        q, k, do = q[:, :e], k[:, :e], do[:, :e]
        g, beta = (None if x is None else x[:, :e] for x in (g, beta))
    with torch.no_grad():
        if which == "naive":
            return naive.naive_shard_state_grad(q, k, do, g=g, beta=beta, scale=scale)
        if which == "torch":
            return _chunk_module().chunk_shard_state_grad(q, k, do, g=g, beta=beta, scale=scale,
                                                          chunk_size=chunk_size)
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
