"""RMSNorm / gated RMSNorm / L2 norm over the last dim: forward and backward kernels.

Forward, per row x (float32 inside): r = rsqrt(sum(x^2) / D + eps) (RMS; L2: sum without / D),
y = round(x r w) (no w for L2), gated: y = round(float(y) silu(g)). The forward keeps nothing but
r (one float32 per row). Backward, with n = x r: gated: dg = dy (n w) sig (1 + g (1 - sig)),
dy <- dy g sig; dw = sum over rows of dy n (per program, added up in torch: deterministic);
dn = dy w; dx = r (dn - n sum(dn n) / D) (L2: without / D). The backward runs a fixed number of
programs, each looping over row blocks, so the dw partials stay [programs, D] at any length."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def row_norm_fwd_kernel(x_ptr, w_ptr, g_ptr, y_ptr, r_ptr, N, D, eps, HAS_W: tl.constexpr, HAS_G: tl.constexpr,
                        MEAN: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BD)
    mr, mc = rows < N, cols < D
    m = mr[:, None] & mc[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    ss = tl.sum(x * x, axis=1)
    if MEAN:
        ss = ss / D
    r = 1.0 / tl.sqrt(ss + eps)
    y = x * r[:, None]
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=mc, other=0.0).to(tl.float32)[None, :]
    y = y.to(y_ptr.dtype.element_ty)
    if HAS_G:
        g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
        y = (y.to(tl.float32) * g * tl.sigmoid(g)).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + offs, y, mask=m)
    tl.store(r_ptr + rows, r, mask=mr)


@triton.jit
def row_norm_bwd_kernel(x_ptr, w_ptr, g_ptr, r_ptr, dy_ptr, dx_ptr, dg_ptr, dwp_ptr, N, D, HAS_W: tl.constexpr,
                        HAS_G: tl.constexpr, MEAN: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    pid, programs = tl.program_id(0), tl.num_programs(0)
    cols = tl.arange(0, BD)
    mc = cols < D
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=mc, other=0.0).to(tl.float32)
    else:
        w = tl.zeros([BD], dtype=tl.float32)
    dw = tl.zeros([BD], dtype=tl.float32)
    for block in range(pid, tl.cdiv(N, BR), programs):
        rows = block * BR + tl.arange(0, BR)
        mr = rows < N
        m = mr[:, None] & mc[None, :]
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + rows, mask=mr, other=0.0)
        n = x * r[:, None]
        if HAS_G:
            g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
            sig = tl.sigmoid(g)
            if HAS_W:
                a = n * w[None, :]
            else:
                a = n
            tl.store(dg_ptr + offs, (dy * a * sig * (1.0 + g * (1.0 - sig))).to(dg_ptr.dtype.element_ty), mask=m)
            dy = dy * g * sig
        if HAS_W:
            dw += tl.sum(dy * n, axis=0)
            dn = dy * w[None, :]
        else:
            dn = dy
        c = tl.sum(dn * n, axis=1)
        if MEAN:
            c = c / D
        tl.store(dx_ptr + offs, (r[:, None] * (dn - n * c[:, None])).to(dx_ptr.dtype.element_ty), mask=m)
    if HAS_W:
        tl.store(dwp_ptr + pid.to(tl.int64) * D + cols, dw, mask=mc)


def _tiles(D: int) -> tuple[int, int, int]:
    """(rows per program, padded D, warps): ~4096 elements per program at 8 warps. (At 4 warps the
    backward at D = 128 held 255 registers and spilled on sm_90; at 8 it holds ~165.)"""
    BD = triton.next_power_of_2(D)
    BR = max(1, min(64, 4096 // BD))
    return BR, BD, 8


def row_norm_fwd(x: torch.Tensor, weight: torch.Tensor | None, gate: torch.Tensor | None, eps: float,
                 mean: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, D] contiguous -> (y [N, D] in x's dtype, r [N] float32)."""
    N, D = x.shape
    BR, BD, warps = _tiles(D)
    y = torch.empty_like(x)
    r = torch.empty(N, device=x.device, dtype=torch.float32)
    row_norm_fwd_kernel[(triton.cdiv(N, BR),)](x, x if weight is None else weight, x if gate is None else gate, y, r,
                                                N, D, float(eps), HAS_W=weight is not None, HAS_G=gate is not None,
                                                MEAN=mean, BR=BR, BD=BD, num_warps=warps)
    return y, r


def _programs(device, blocks: int) -> int:
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    return max(1, min(blocks, 4 * sms))


def row_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, gate: torch.Tensor | None,
                 r: torch.Tensor, mean: bool = True):
    """-> (dx [N, D], dw [D] float32 or None, dgate [N, D] or None); dy, x, gate [N, D] contiguous."""
    N, D = x.shape
    BR, BD, warps = _tiles(D)
    P = _programs(x.device, triton.cdiv(N, BR))
    dx = torch.empty_like(x)
    dg = torch.empty_like(gate) if gate is not None else None
    dwp = torch.empty(P, D, device=x.device, dtype=torch.float32) if weight is not None else None
    row_norm_bwd_kernel[(P,)](x, x if weight is None else weight, x if gate is None else gate, r, dy, dx,
                              x if dg is None else dg, x if dwp is None else dwp, N, D, HAS_W=weight is not None,
                              HAS_G=gate is not None, MEAN=mean, BR=BR, BD=BD, num_warps=warps)
    return dx, (None if dwp is None else dwp.sum(0)), dg
