"""GPU checks of the long-context memory savers (`pytest -m gpu tests/test_long_context_gpu.py`): the same
gradients with the block inputs offloaded to host memory, the chunked loss under bf16 autocast, and the
peak memory each saver lowers, measured."""
from __future__ import annotations

import pytest
import torch
from test_long_context import _assert_grads_close, _batch
from test_models import tiny_cfg

from lctrain.models import build_model
from lctrain.train.step import lm_loss

pytestmark = pytest.mark.gpu
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# the Triton mixers run chunks of 64 and tl.dot needs head dims >= 16 (tiny_cfg's CPU sizes are 8 and 8)
TRITON = dict(chunk_size=64, head_dim=32, attn_head_dim=32)  # 32: the Triton kernels refuse smaller head dims on a GPU


def _grads(model, ids, labels, dtype=torch.float32, **kw):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        loss, _ = lm_loss(model, ids, labels, **kw)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@cuda
def test_checkpoint_offload_matches_full_checkpointing():
    torch.manual_seed(0)
    ref_model = build_model(tiny_cfg("GSMA", "triton", activation_checkpointing="full", **TRITON)).cuda()
    off_model = build_model(tiny_cfg("GSMA", "triton", activation_checkpointing="full", checkpoint_offload=True,
                                       **TRITON)).cuda()
    off_model.load_state_dict(ref_model.state_dict())
    ids, labels, _ = (t.cuda() for t in _batch(T=64))
    ref, got = _grads(ref_model, ids, labels), _grads(off_model, ids, labels)
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0)
    _assert_grads_close(got[1], ref[1], 1e-6)


@cuda
def test_checkpointed_loglinear_blocks_keep_their_level_states_on_gpu(monkeypatch):
    """Log-linear blocks (L, K) under full activation checkpointing on the Triton kernels, 1024 tokens (4 levels
    above the chunk): what the recomputation forms is kept for the backward (KEEP_H): the K block's level
    states, so its level scan runs twice (forward and recomputation) where 3 would mean a scan again in its
    backward, and the L block's transition tree (TREE=1 from position 0), built twice where 3 would mean a
    build again in its backward; loss and gradients as without checkpointing."""
    from lctrain.kernels.loglinear import triton_levels, triton_tree
    from test_loglinear_kernels import Launches

    torch.manual_seed(2)
    plain = build_model(tiny_cfg("LSKA", "triton", **TRITON)).cuda()
    ckpt = build_model(tiny_cfg("LSKA", "triton", activation_checkpointing="full", **TRITON)).cuda()
    ckpt.load_state_dict(plain.state_dict())
    ids, labels, _ = (t.cuda() for t in _batch(T=1024))
    scans = Launches(triton_levels.levels_fwd_kernel)
    monkeypatch.setattr(triton_levels, "levels_fwd_kernel", scans)
    builds = []
    monkeypatch.setattr(triton_tree, "build_tree", lambda *a, f=triton_tree.build_tree: builds.append(1) or f(*a))
    ref = _grads(plain, ids, labels)
    # without checkpointing: each block's forward, and its backward's recompute (scan / tree build)
    assert (scans.count, len(builds)) == (2, 2)
    scans.count = 0
    builds.clear()
    got = _grads(ckpt, ids, labels)
    assert (scans.count, len(builds)) == (2, 2)    # forward, recomputation; none in the backward
    assert triton_levels.CONFIG["KEEP_H"] == 0
    # not bitwise: the level readouts are summed with fp32 atomics in any order, and tl.dot takes fp32 operands
    # as TF32 (the first H200 run: dt_bias of the K block 1.01e-4 apart, every other gradient below 1e-4)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    _assert_grads_close(got[1], ref[1], 1e-3)


@cuda
def test_chunked_loss_under_bf16_autocast_matches_plain():
    torch.manual_seed(1)
    model = build_model(tiny_cfg("GS", "triton", residual_dtype="compute", **TRITON)).cuda()
    ids, labels, weights = (t.cuda() for t in _batch(T=64))
    ref = _grads(model, ids, labels, torch.bfloat16, token_weights=weights)
    got = _grads(model, ids, labels, torch.bfloat16, token_weights=weights, loss_chunk_tokens=24)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-3, atol=0)
    _assert_grads_close(got[1], ref[1], 2e-2)  # bf16 matmuls: per-chunk vs whole products round differently


def _peak_gib(model, ids, labels, **kw) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _grads(model, ids, labels, torch.bfloat16, **kw)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


@cuda
def test_memory_savers_lower_the_peak():
    """d_model 1024, vocab 32K, 32K tokens: each saver must lower the peak of one forward+backward;
    the numbers are printed (pytest -s) for docs/long_context.md."""
    torch.manual_seed(2)
    T, V = 32768, 32768
    base = dict(vocab_size=V, d_model=1024, n_heads=8, head_dim=128, attn_heads=8, attn_head_dim=128, window=512,
                chunk_size=64, residual_dtype="compute", tie_embeddings=False)
    ids = torch.randint(0, V, (1, T), device="cuda")
    labels = torch.randint(0, V, (1, T), device="cuda")
    peaks = {}
    for name, over, loss_chunk in [("plain", {}, 0), ("chunked loss", {}, 8192),
                                   ("+ full checkpointing", {"activation_checkpointing": "full"}, 8192),
                                   ("+ MLP chunks", {"activation_checkpointing": "full", "mlp_chunk_tokens": 8192},
                                    8192),
                                   ("+ offload", {"activation_checkpointing": "full", "mlp_chunk_tokens": 8192,
                                                  "checkpoint_offload": True}, 8192)]:
        model = build_model(tiny_cfg("GSGS", "triton", **base, **over)).cuda()
        peaks[name] = _peak_gib(model, ids, labels, loss_chunk_tokens=loss_chunk)
        del model
        torch.cuda.empty_cache()
    print("peak GiB of one fwd+bwd, 4 blocks GSGS, d_model 1024, 32K tokens, bf16:",
          {k: round(v, 2) for k, v in peaks.items()})
    assert peaks["chunked loss"] < peaks["plain"] and peaks["+ full checkpointing"] < peaks["chunked loss"], peaks
    # MLP chunks lower the peak only where the MLP's recomputed activations are part of it (long T,
    # wide MLP); they must never raise it
    assert peaks["+ MLP chunks"] <= peaks["+ full checkpointing"] * 1.01, peaks
    assert peaks["+ offload"] < peaks["+ MLP chunks"], peaks
