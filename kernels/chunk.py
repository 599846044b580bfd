"""Chunkwise PyTorch implementation (backend="torch") of the three mixers and the CP primitives
(the derivation: docs/design.md §2).

Math (K x V state layout). Inside a chunk of C tokens with incoming state S0, let
gam_i = sum_{j<=i} g_j (cumulative log-decay inside the chunk) and Gam_i = exp(gam_i). The delta
recurrence S_i = a_i (I - b_i k_i k_i^T) S_{i-1} + b_i k_i v_i^T is rewritten with pseudo-values
u_i = b_i (v_i - a_i S_{i-1}^T k_i), so that S_i = a_i S_{i-1} + k_i u_i^T and

    S_i = Gam_i S0 + sum_{j<=i} (Gam_i / Gam_j) k_j u_j^T.

Substituting this into u gives a unit lower-triangular system (the WY/UT transform)

    (I + L) U = diag(b) V - diag(b) diag(Gam) K S0,   L_ij = b_i (Gam_i/Gam_j) k_i.k_j  (j < i)

so with T = (I + L)^-1 diag(b):  U = Ut - W S0,  Ut = T V,  W = T diag(Gam) K. Then

    O     = scale [diag(Gam) Q S0 + (causal mask * Gam_i/Gam_j * Q K^T) U]
    S_C   = A_c S0 + K^T diag(Gam_C/Gam) Ut,   A_c = Gam_C I - K^T diag(Gam_C/Gam) W.

Scalar-gated linear attention (no erase, unit write) is the special case U = V, W = 0, so A_c is
the scalar Gam_C. Everything is computed for all chunks at once except the short sequential scan of
states across chunks. States and the triangular solve run in float32 (float64 for float64 inputs).
Autograd differentiates the forward (the torch backend is the CPU reference and the fallback).
Any T works: the ragged last chunk is padded with q=k=v=0, beta=0, g=0 (identity steps), outputs
are sliced back.
"""
from __future__ import annotations

import torch

from .naive import compute_dtype


def _to_chunks(x: torch.Tensor, C: int, dt: torch.dtype) -> torch.Tensor:
    """[B, T, H, *D] -> [B, H, N, C, *D] in dtype dt, zero-padding T up to N*C."""
    B, T, H = x.shape[:3]
    pad = (-T) % C
    x = x.to(dt)
    if pad:
        x = torch.cat([x, x.new_zeros(B, pad, *x.shape[2:])], dim=1)
    N = x.shape[1] // C
    x = x.reshape(B, N, C, *x.shape[2:])
    return x.movedim(3, 1)  # [B, H, N, C, *D]


class _ChunkTerms:
    """Per-chunk quantities that do not depend on the incoming state (all chunks at once).
    ``keep_transform``: also keep T = (I + L)^-1 diag(b) itself as ``Tm`` [B, H, N, C, C] (with beta)."""

    def __init__(self, k, v, g, beta, C, dt, q=None, keep_transform=False):
        self.K = _to_chunks(k, C, dt)                          # [B, H, N, C, K]
        self.V = None if v is None else _to_chunks(v, C, dt)  # [B, H, N, C, V]
        self.Q = None if q is None else _to_chunks(q, C, dt)
        B, H, N = self.K.shape[:3]
        if g is None:
            gam = self.K.new_zeros(B, H, N, C)
        else:
            gam = _to_chunks(g, C, dt).cumsum(dim=-1)          # [B, H, N, C]
        self.gam = gam
        self.Gam = torch.exp(gam)
        self.gam_last = gam[..., -1]                            # [B, H, N]
        idx = torch.arange(C, device=k.device)
        incl = idx[:, None] >= idx[None, :]
        diff = gam[..., :, None] - gam[..., None, :]
        # Gam_i / Gam_j on and below the diagonal, 0 above (masked before exp: no overflow)
        self.decay = torch.exp(torch.where(incl, diff, torch.full_like(diff, float("-inf"))))
        self.K_end = self.K * torch.exp(self.gam_last[..., None] - gam)[..., None]  # K diag(Gam_C/Gam)
        self.W = self.Ut = self.Tm = None
        if beta is not None:
            b = _to_chunks(beta, C, dt)                         # [B, H, N, C]
            strict = idx[:, None] > idx[None, :]
            L = (b[..., :, None] * self.decay * (self.K @ self.K.transpose(-1, -2))) * strict
            eye = torch.eye(C, dtype=dt, device=k.device)
            parts = [self.Gam[..., None] * self.K] + ([] if self.V is None else [self.V])
            if keep_transform:
                parts.append(eye.expand(*b.shape, C))
            rhs = b[..., None] * torch.cat(parts, dim=-1)
            X = torch.linalg.solve_triangular(eye + L, rhs, upper=False, unitriangular=True)
            Kdim = self.K.shape[-1]
            self.W = X[..., :Kdim]
            self.Ut = None if self.V is None else X[..., Kdim:Kdim + self.V.shape[-1]]
            if keep_transform:
                self.Tm = X[..., -C:]

    def chunk_transitions(self) -> torch.Tensor:
        """A_c per chunk: [B, H, N, K, K], or [B, H, N] (scalar decay) without erase."""
        if self.W is None:
            return torch.exp(self.gam_last)
        Kdim = self.K.shape[-1]
        eye = torch.eye(Kdim, dtype=self.K.dtype, device=self.K.device)
        return torch.exp(self.gam_last)[..., None, None] * eye - self.K_end.transpose(-1, -2) @ self.W


def _state_scan(terms: _ChunkTerms, S: torch.Tensor):
    """Sequential scan across chunks. Returns (pseudo-values U [B,H,N,C,V], incoming states
    [B,H,N,K,V], final state)."""
    N = terms.K.shape[2]
    Us, S_ins = [], []
    for n in range(N):
        S_ins.append(S)
        if terms.W is None:
            U = terms.V[:, :, n]
        else:
            U = terms.Ut[:, :, n] - terms.W[:, :, n] @ S
        Us.append(U)
        S = torch.exp(terms.gam_last[:, :, n])[..., None, None] * S \
            + terms.K_end[:, :, n].transpose(-1, -2) @ U
    return torch.stack(Us, dim=2), torch.stack(S_ins, dim=2), S


def chunk_recurrence(q, k, v, *, g=None, beta=None, scale=None, initial_state=None,
                     output_final_state=False, chunk_size=64):
    """Chunkwise forward of the generic recurrence (see naive.naive_recurrence for the meaning of
    g=None / beta=None). Returns (o in q.dtype, final state or None)."""
    B, T, H, K = q.shape
    Vd = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    dt = compute_dtype(q, k, v, g, beta, initial_state)
    C = chunk_size
    terms = _ChunkTerms(k, v, g, beta, C, dt, q=q)
    if initial_state is None:
        S0 = q.new_zeros(B, H, K, Vd, dtype=dt)
    else:
        S0 = initial_state.to(dt)
    U, S_in, S_final = _state_scan(terms, S0)
    attn = terms.decay * (terms.Q @ terms.K.transpose(-1, -2))          # [B, H, N, C, C]
    O = scale * (terms.Gam[..., None] * (terms.Q @ S_in) + attn @ U)   # [B, H, N, C, V]
    o = O.movedim(1, 3).reshape(B, -1, H, Vd)[:, :T]
    return o.to(q.dtype), (S_final if output_final_state else None)


def chunk_shard_transition(k, v, *, g=None, beta=None, chunk_size=64):
    """(A, Bst) of a shard: A = product of the chunk transitions A_c (float32 chain), Bst = final
    state from a zero start. A is [B, H] (scalar) when beta is None."""
    B, T, H, K = k.shape
    dt = compute_dtype(k, v, g, beta)
    terms = _ChunkTerms(k, v, g, beta, chunk_size, dt)
    A_c = terms.chunk_transitions()
    if beta is None:
        A = torch.exp(terms.gam_last.sum(dim=-1))  # exp of the summed log-decays
    else:
        A = torch.eye(K, dtype=dt, device=k.device).expand(B, H, K, K)
        for n in range(A_c.shape[2]):
            A = A_c[:, :, n] @ A
    S0 = k.new_zeros(B, H, K, v.shape[-1], dtype=dt)
    _, _, Bst = _state_scan(terms, S0)
    return A, Bst


def chunk_shard_final_state(k, v, *, g=None, beta=None, initial_state=None, chunk_size=64):
    """The shard's final state from ``initial_state`` (zero when None), without its transition."""
    B, T, H, K = k.shape
    dt = compute_dtype(k, v, g, beta, initial_state)
    terms = _ChunkTerms(k, v, g, beta, chunk_size, dt)
    S0 = k.new_zeros(B, H, K, v.shape[-1], dtype=dt) if initial_state is None else initial_state.to(dt)
    return _state_scan(terms, S0)[2]


def chunk_shard_state_grad(q, k, do, *, g=None, beta=None, scale=None, chunk_size=64):
    """G = d sum(o * do) / d S0 by a reverse scan over chunks: inside chunk n the output depends on
    its incoming state as O_n = scale Qeff_n S_in(n) + const with Qeff = diag(Gam) Q - attn W, so
    its local gradient is scale Qeff^T dO_n, and dS_in(n) = A_n^T dS_in(n+1) + local_n."""
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    dt = compute_dtype(q, k, do, g, beta)
    terms = _ChunkTerms(k, None, g, beta, chunk_size, dt, q=q)
    dO = _to_chunks(do, chunk_size, dt)                                  # [B, H, N, C, V]
    Qeff = terms.Gam[..., None] * terms.Q
    if terms.W is not None:
        attn = terms.decay * (terms.Q @ terms.K.transpose(-1, -2))
        Qeff = Qeff - attn @ terms.W
    local = scale * (Qeff.transpose(-1, -2) @ dO)                       # [B, H, N, K, V]
    A_c = terms.chunk_transitions()
    G = torch.zeros_like(local[:, :, 0])
    for n in reversed(range(local.shape[2])):
        if terms.W is None:
            G = A_c[:, :, n][..., None, None] * G + local[:, :, n]
        else:
            G = A_c[:, :, n].transpose(-1, -2) @ G + local[:, :, n]
    return G
