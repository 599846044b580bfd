"""model.compile: the compiled elementwise functions give the eager model's loss and gradients.
On CPU the graphs are traced with the aot_eager backend (dynamo + the autograd partition, no code
generation: seconds instead of a C++ build); the GPU test runs inductor for real under bf16."""
from __future__ import annotations

import pytest
import torch

from lctrain.config import load_config
from lctrain.models import build_model, fused

TINY = ["model.d_model=64", "model.layer_pattern=GSM", "model.window=8", "model.n_heads=2", "model.head_dim=16",
        "model.attn_heads=2", "model.attn_head_dim=16", "model.vocab_size=97", "model.kernel_backend=torch",
        "model.document_end_id=null"]


def _loss_and_grads(overrides, T=24, device="cpu", dtype=None, data_seed=1):
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    ids = torch.randint(0, cfg.model.vocab_size, (2, T + 1),
                        generator=torch.Generator().manual_seed(data_seed)).to(device)
    with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return model, loss.detach(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("extra", [[], ["model.activation_checkpointing=full", "model.mlp_chunk_tokens=20"]])
def test_compiled_elementwise_equals_eager(monkeypatch, extra):
    """Also under checkpointing (the compiled functions run again in the recomputation) with MLP chunks
    (a shorter last chunk: another shape)."""
    monkeypatch.setattr(fused, "BACKEND", "aot_eager")
    _, loss, grads = _loss_and_grads([*TINY, *extra])
    model, loss_c, grads_c = _loss_and_grads([*TINY, *extra, "model.compile=true"])
    switched = {type(m).__name__ for m in model.modules() if getattr(m, "compiled", False)}
    assert {"RMSNorm", "GatedRMSNorm", "SwiGLU", "DeltaNetMixer", "Mamba2Mixer", "RotaryEmbedding"} <= switched
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


BIG = ["model.d_model=256", "model.layer_pattern=GSGS", "model.window=128", "model.n_heads=2", "model.head_dim=128",
       "model.attn_heads=2", "model.attn_head_dim=128", "model.vocab_size=512", "model.document_end_id=null"]


def compiled_and_eager_bf16_errors(device, backend, T=1024, batches=6):
    """Per parameter: the gradient error of the bf16 model, eager and compiled, against the float32 model (torch
    kernels), pooled over `batches` random batches: sqrt(sum ||grad - ref||^2 / sum ||ref||^2).

    Pooled because a single batch is not a fair judge for the few parameters whose gradient is a sum over all
    tokens with heavy cancellation: A_log and dt_bias (one number per head: sum_t dg_t * dg_t/dparam). Their
    bf16 error is a draw that swings by 10x from batch to batch for eager and compiled alike (CPU, inductor,
    T=256, five batches: eager 0.2%-5.9%, compiled 0.7%-7.6%, compiled/eager from 0.3x to 4.2x), so one batch
    fails or passes by luck (the H200 run: 4.0% vs 1.5%). Note that model.compile does not touch the gate
    chain at all (g, beta are computed eagerly in float32 in both modes): compiled differs only through the
    rounding of the norms, SwiGLU and RoPE. Pooled over batches the ratio is that of the error scales."""
    err_sq: dict = {}
    for seed in range(1, batches + 1):
        _, loss_r, ref = _loss_and_grads([*BIG, "model.kernel_backend=torch"], T=T, device=device, data_seed=seed)
        runs = {mode: _loss_and_grads([*BIG, f"model.kernel_backend={backend}", *extra], T=T, device=device,
                                      dtype=torch.bfloat16, data_seed=seed)
                for mode, extra in (("eager", []), ("compiled", ["model.compile=true"]))}
        torch.testing.assert_close(runs["compiled"][1], loss_r, rtol=1e-2, atol=1e-2)
        for name in ref:
            e = err_sq.setdefault(name, {"eager": 0.0, "compiled": 0.0, "ref": 0.0})
            e["ref"] += float(ref[name].norm() ** 2)
            for mode, (_, _, grads) in runs.items():
                e[mode] += float((grads[name] - ref[name]).norm() ** 2)
    return {name: {mode: (e[mode] / max(e["ref"], 1e-24)) ** 0.5 for mode in ("eager", "compiled")}
            for name, e in err_sq.items()}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_elementwise_equals_eager_bf16_on_gpu():
    """Compiled and eager bf16 differ by rounding (Inductor keeps fused elementwise chains in float32, eager rounds
    to bf16 after every op), so each is compared with a float32 reference: compiled must be about as close to it
    as eager is (<= 1.5x eager's error per parameter, pooled over batches), not bit-close to eager."""
    errors = compiled_and_eager_bf16_errors("cuda", "auto")
    for name, e in errors.items():
        assert e["compiled"] <= max(1.5 * e["eager"], 2e-2), (name, e)


def test_lean_l2_norm_equals_the_float32_formula():
    from lctrain.models.layers import l2_norm

    x = torch.randn(2, 5, 3, 16, requires_grad=True)
    dy = torch.randn(2, 5, 3, 16)
    y = l2_norm(x, 1e-6)
    (dx,) = torch.autograd.grad(y, x, dy)
    y_ref = fused.l2norm_math(x, 1e-6)
    (dx_ref,) = torch.autograd.grad(y_ref, x, dy)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-6)


def test_block_kernels_in_the_model_equal_eager(monkeypatch):
    """The hand-written kernels the blocks use on CUDA (norms, L2 norms, SwiGLU, RoPE; here through the
    Triton interpreter) give the eager model's loss and gradients: the model wires them right."""
    _, loss, grads = _loss_and_grads(TINY)
    monkeypatch.setattr(fused, "TRITON_ON_CPU", True)
    _, loss_k, grads_k = _loss_and_grads(TINY)
    torch.testing.assert_close(loss_k, loss, rtol=1e-5, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads_k[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
