"""``deltaformer(q, k, v, beta)``: validation and backend dispatch.

Definition (scale = K^-1/2 unless given; the same scale in both passes):

    u_t = v_t - beta_t * sum_{j<t} softmax_j(scale k_t . k_j) u_j      (normalised over j < t; u_0 = v_0)
    o_t = sum_{j<=t} softmax_j(scale q_t . k_j) u_j

Backends of the u-pass (the read-out is always causal softmax attention through SDPA):
- ``"naive"``:  token by token (``naive.py``), autograd; the reference.
- ``"torch"``:  chunkwise triangular solves (``chunk.py``) with the exact chunked backward.
- ``"triton"``: the same, with every pass over all earlier / later tokens in Triton: the forward
  statistics (``triton_fwd.py``), the backward push onto the earlier right-hand sides and the key
  gradients (``triton_bwd.py``); the c x c triangular solves stay torch. Needs CUDA tensors or
  TRITON_INTERPRET=1.
- ``"auto"``:   ``"triton"`` on CUDA when Triton imports, else ``"torch"``.
The u-pass always computes in float32 (float64 if an input is float64): its tensors in memory and
every accumulation. ``kernel_dots`` sets the operands of the Triton kernels' dots:
- ``"auto"``: half-precision operands (``"half"``) for bf16 / fp16 inputs on the Triton backend, full
  float32 for float32 inputs (and nothing to choose on the torch / naive backends). On one H200
  the half dots were as accurate as TF32 against the float32 reference and 1.7-2.2x faster
  (docs/deltaformer.md, "What limits it").
- ``"half"`` (Triton backend, bf16 / fp16 inputs): the operands rounded to the input dtype, as
  flash attention does for P @ V (half-precision tensor cores, about twice TF32's rate), float32
  accumulation.
- ``"tf32"`` (Triton backend): float32 operands on TF32 tensor cores, whatever the input dtype (the
  default for bf16 / fp16 inputs before ``"auto"`` meant ``"half"``).
Any other value, and ``"half"`` / ``"tf32"`` where they cannot apply, is refused naming ``kernel_dots``.

Against fla-core's ``fla.ops.deltaformer.deltaformer_attn(q, k, v, beta, cu_seqlens=...)``
(read, not run here): the same definition (its u-pass also uses key-key scores, scale d^-1/2 in both
passes, softmax over j < t), so outputs should agree to rounding. The differences: fla needs the
flash-attn package for the read-out (we use SDPA); fla stores u in the input dtype between chunks
(bf16 in training) while we keep u in float32 until the read-out; fla's chunk is 512 by default;
fla's beta is taken as given (its layer feeds an unsquashed projection), as is ours (our layer applies
a sigmoid first, like DeltaNet's).
"""
from __future__ import annotations

import os

import torch

from ..api import check_cu_seqlens
from ..naive import compute_dtype
from . import chunk
from .naive import naive_readout, naive_u_pass
from .readout import causal_readout

BACKENDS = ("auto", "naive", "torch", "triton")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_stages():
    """(the Triton chunk.Stages, "") or (None, why not)."""
    try:
        from .triton_fwd import triton_stages
        return triton_stages(), ""
    except ImportError as e:
        return None, f"{type(e).__name__}: {e}"


def resolve(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"deltaformer: unknown backend {backend!r}; choose one of {list(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_stages()[0] is not None else "torch"
    if backend == "triton":
        fn, why = _triton_stages()
        if fn is None:
            raise RuntimeError(f"deltaformer: backend='triton' is unavailable ({why}); use backend='torch'")
        if device.type != "cuda" and not _interpreting():
            raise RuntimeError(f"deltaformer: backend='triton' needs CUDA tensors (got {device}); set "
                               "TRITON_INTERPRET=1 to run it on CPU, or use backend='torch'")
    return backend


KERNEL_DOTS = ("auto", "half", "tf32")
HALF_TYPES = (torch.bfloat16, torch.float16)


def _validate(q, k, v, beta, scale, chunk_size, kernel_dots="auto") -> None:
    for name, x, nd in (("q", q, 4), ("k", k, 4), ("v", v, 4), ("beta", beta, 3)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"deltaformer: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != nd or not x.is_floating_point():
            raise ValueError(f"deltaformer: {name} must be a floating {nd}-D tensor, got {x.dtype} {tuple(x.shape)}")
    B, T, H, K = k.shape
    if q.shape != k.shape:
        raise ValueError(f"deltaformer: q and k must both be [B, T, H, K]; got {tuple(q.shape)}, {tuple(k.shape)}")
    if tuple(v.shape[:3]) != (B, T, H) or tuple(beta.shape) != (B, T, H):
        raise ValueError(f"deltaformer: v must be [B, T, H, V] and beta [B, T, H] with (B, T, H) = {(B, T, H)}; "
                         f"got v {tuple(v.shape)}, beta {tuple(beta.shape)}")
    if T < 1:
        raise ValueError("deltaformer: empty sequence (T = 0)")
    if len({x.device for x in (q, k, v, beta)}) > 1:
        raise ValueError("deltaformer: q, k, v, beta must be on one device")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"deltaformer: scale must be a real number or None, got {scale!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"deltaformer: chunk_size must be a positive int, got {chunk_size!r}")
    if kernel_dots not in KERNEL_DOTS:
        raise ValueError(f"deltaformer: kernel_dots must be one of {list(KERNEL_DOTS)}, got {kernel_dots!r}")


def _segments(cu_seqlens, B, T, device) -> list[tuple[int, int]]:
    if cu_seqlens is None:
        return [(0, T)]
    b = check_cu_seqlens(cu_seqlens, B, T, device)
    return list(zip(b, b[1:]))


def chunk_stages(which: str) -> chunk.Stages:
    """The stages of a resolved chunkwise backend ("torch" or "triton")."""
    if which == "torch":
        return chunk.TORCH_STAGES
    if which == "triton":
        return _triton_stages()[0]
    raise ValueError(f"deltaformer: backend {which!r} is not chunkwise; use 'torch' or 'triton'")


def _dots(kernel_dots: str, which: str, k: torch.Tensor) -> tuple[torch.dtype | None, bool]:
    """(the half dtype of the kernels' dot operands or None, whether float32 dots are forced onto TF32)
    for ``kernel_dots`` on the resolved backend ``which``."""
    if kernel_dots == "auto":
        return (k.dtype if which == "triton" and k.dtype in HALF_TYPES else None), False
    if which != "triton":
        raise ValueError(f"deltaformer: kernel_dots={kernel_dots!r} applies to the Triton kernels; the resolved "
                         f"backend is {which!r} (pass backend='triton', or kernel_dots='auto')")
    if kernel_dots == "tf32":
        return None, True
    if k.dtype not in HALF_TYPES:
        raise ValueError(f"deltaformer: kernel_dots='half' rounds the dots to the inputs' half dtype; got {k.dtype} "
                         "inputs (use bf16 / fp16 inputs, or kernel_dots='auto' / 'tf32')")
    return k.dtype, False


def _u_pass_one(k, v, beta, scale, which, chunk_size, dots=(None, False)):
    dtype = compute_dtype(k, v, beta)
    if which == "naive":
        return naive_u_pass(k, v, beta, scale)
    if which == "triton" and dtype != torch.float32:
        raise TypeError("deltaformer: the Triton u-pass computes in float32; float64 inputs need backend='torch'")
    return chunk.UPass.apply(k, v, beta, scale, chunk_size, chunk_stages(which), dtype, *dots)


def deltaformer_u(k, v, beta, *, scale=None, cu_seqlens=None, backend="auto", chunk_size=64, kernel_dots="auto"):
    """The u-pass alone: u [B, T, H, V] in the compute dtype (float32, or float64)."""
    _validate(k, k, v, beta, scale, chunk_size, kernel_dots)
    B, T, _, K = k.shape
    scale = K ** -0.5 if scale is None else float(scale)
    which = resolve(backend, k.device)
    dots = _dots(kernel_dots, which, k)
    parts = [_u_pass_one(k[:, a:b], v[:, a:b], beta[:, a:b], scale, which, chunk_size, dots)
             for a, b in _segments(cu_seqlens, B, T, k.device)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def deltaformer(q, k, v, beta, *, scale=None, cu_seqlens=None, backend="auto", chunk_size=64,
                return_u=False, kernel_dots="auto"):
    """Deltaformer attention (module doc). q, k [B, T, H, K], v [B, T, H, V], beta [B, T, H].

    Returns o [B, T, H, V] in q.dtype, or (o, u) with ``return_u=True`` (u in v.dtype: the values the
    read-out attended to, what a decoding cache keeps). Differentiable in q, k, v and beta.
    ``cu_seqlens`` (B == 1): packed documents, each its own sequence in both passes.
    ``kernel_dots``: "auto", "half" or "tf32" (module doc)."""
    _validate(q, k, v, beta, scale, chunk_size, kernel_dots)
    B, T, _, K = k.shape
    scale = K ** -0.5 if scale is None else float(scale)
    which = resolve(backend, q.device)
    dots = _dots(kernel_dots, which, k)
    outs, us = [], []
    for a, b in _segments(cu_seqlens, B, T, q.device):
        qs, ks = q[:, a:b], k[:, a:b]
        u = _u_pass_one(ks, v[:, a:b], beta[:, a:b], scale, which, chunk_size, dots)
        if which == "naive":
            outs.append(naive_readout(qs, ks, u, scale).to(q.dtype))
        else:
            outs.append(causal_readout(qs, ks, u, scale))
        us.append(u)
    o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    if not return_u:
        return o
    u = us[0] if len(us) == 1 else torch.cat(us, dim=1)
    return o, u.to(v.dtype)


def doc_boundaries(doc_ids: torch.Tensor) -> torch.Tensor:
    """cu_seqlens [N+1] (int64, on doc_ids' device) of one row of document ids [T] (non-decreasing:
    a new document starts where the id changes)."""
    change = torch.nonzero(doc_ids[1:] != doc_ids[:-1]).flatten() + 1
    T = doc_ids.shape[0]
    return torch.cat([change.new_zeros(1), change, change.new_full((1,), T)])


def _by_rows(fn, tensors, doc_ids, **kw):
    """fn on each batch row with that row's documents as cu_seqlens; plain fn when doc_ids is None."""
    if doc_ids is None:
        return fn(*tensors, **kw)
    rows = [fn(*(t[b:b + 1] for t in tensors), cu_seqlens=doc_boundaries(doc_ids[b]), **kw)
            for b in range(doc_ids.shape[0])]
    return torch.cat(rows, dim=0)


def deltaformer_u_by_documents(k, v, beta, doc_ids: torch.Tensor | None, **kw):
    """``deltaformer_u`` where doc_ids [B, T] (document index per token, or None) splits every batch
    row into its documents."""
    return _by_rows(deltaformer_u, (k, v, beta), doc_ids, **kw)


def deltaformer_by_documents(q, k, v, beta, doc_ids: torch.Tensor | None, **kw):
    """``deltaformer`` (output only) with the documents of doc_ids [B, T] (or None) kept apart."""
    return _by_rows(deltaformer, (q, k, v, beta), doc_ids, **kw)
