"""The grouped state passes (groups of chunks in parallel, folded by a tree) against the sequential
``shard_transition`` and ``shard_state_grad``, for every mixer, on the torch backend and the Triton one (interpreter on
CPU)."""
import pytest
import torch
import torch.nn.functional as F
from lctrain.kernels import grouped_shard_state_grad, grouped_shard_transition, shard_state_grad, shard_transition
from lctrain.kernels.grouped import auto_groups


def _inputs(kind, B, T, H, K, V, seed):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    k, v = F.normalize(r(B, T, H, K), dim=-1), r(B, T, H, V)
    g = -F.softplus(r(B, T, H)) * 0.3 if kind != "delta" else None
    beta = torch.sigmoid(r(B, T, H)) if kind != "gla" else None
    return k, v, g, beta


CASES = [(kind, "torch", 2, 4, 6, 3) for kind in ("delta", "gated_delta", "gla")]
CASES += [("gla", "torch", 1, 8, 8, 8), ("gated_delta", "triton", 1, 64, 4, 2)]  # the interpreter is slow: one case


@pytest.mark.parametrize("kind,backend,B,chunk,n_chunks,groups", CASES)
def test_grouped_equals_sequential(kind, backend, B, chunk, n_chunks, groups):
    k, v, g, beta = _inputs(kind, B, chunk * n_chunks, 2 if B > 1 else 1, 16, 8, seed=n_chunks * 10 + groups)
    A0, B0 = shard_transition(kind, k, v, g=g, beta=beta, backend=backend, chunk_size=chunk)
    A1, B1 = grouped_shard_transition(kind, k, v, g=g, beta=beta, backend=backend, chunk_size=chunk, groups=groups)
    assert A1.shape == A0.shape and B1.shape == B0.shape and A1.dtype == torch.float32
    torch.testing.assert_close(A1, A0.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(B1, B0.float(), rtol=1e-5, atol=1e-5)
    q, do = torch.randn_like(k), torch.randn_like(v)
    G0 = shard_state_grad(kind, q, k, do, g=g, beta=beta, backend=backend, chunk_size=chunk)
    G1 = grouped_shard_state_grad(kind, q, k, v, do, g=g, beta=beta, backend=backend, chunk_size=chunk, groups=groups)
    torch.testing.assert_close(G1, G0.float(), rtol=1e-5, atol=1e-5)


def test_grouped_rejects_bad_groups_and_picks_powers_of_two():
    k, v, g, beta = _inputs("gated_delta", 1, 24, 1, 4, 4, seed=1)
    with pytest.raises(ValueError, match="divisor"):
        grouped_shard_transition("gated_delta", k, v, g=g, beta=beta, backend="torch", chunk_size=4, groups=4)
    assert auto_groups(1024, 16 * 16) == 8 and auto_groups(1024, 64 * 16) == 2 and auto_groups(24, 16) == 1
