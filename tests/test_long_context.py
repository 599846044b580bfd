"""Memory savers for long context give the same numbers as the plain model: chunked cross-entropy
(train.loss_chunk_tokens), chunked MLP (model.mlp_chunk_tokens), activation checkpointing modes
(model.activation_checkpointing) and the compute-dtype residual stream (model.residual_dtype)."""
from __future__ import annotations

import pytest
import torch
from test_models import tiny_cfg

from lctrain.config import ConfigError, load_config
from lctrain.models import build_model
from lctrain.train.step import lm_loss


def _step(model, ids, labels, weights=None, **kw):
    model.zero_grad(set_to_none=True)
    loss, mean = lm_loss(model, ids, labels, token_weights=weights, **kw)
    loss.backward()
    return loss.detach(), mean, {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_grads_close(got: dict, ref: dict, rtol: float) -> None:
    """Each gradient within rtol of its reference, relative to the reference's largest entry
    (float32 summation order differs between the paths; elementwise relative error is noise there)."""
    assert got.keys() == ref.keys()
    for name, g in got.items():
        err = ((g - ref[name]).abs().max() / ref[name].abs().max().clamp(min=1e-12)).item()
        assert err <= rtol, f"gradient of {name} differs by {err:.2e}"


def _batch(seed=3, T=19, V=64):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (2, T), generator=gen)
    labels = torch.randint(0, V, (2, T), generator=gen)
    labels[0, :4] = labels[1, -3:] = -100
    weights = 1.0 + 4.0 * (torch.rand(2, T, generator=gen) > 0.7).float()
    return ids, labels, weights


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_cross_entropy_equals_plain_loss_and_gradients(tied, chunk):
    torch.manual_seed(0)
    model = build_model(tiny_cfg("GS", tie_embeddings=tied))
    ids, labels, weights = _batch()
    for w in (None, weights):
        ref_loss, ref_mean, ref_grads = _step(model, ids, labels, w)
        loss, mean, grads = _step(model, ids, labels, w, loss_chunk_tokens=chunk)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
        torch.testing.assert_close(mean, ref_mean, rtol=1e-6, atol=0)
        _assert_grads_close(grads, ref_grads, 1e-5)


def test_chunked_cross_entropy_never_builds_whole_logits():
    """The largest float tensor the head creates under the chunked loss is one chunk's logits."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg("G", vocab_size=96))
    ids, labels, _ = _batch(T=40)
    sizes = []
    orig_linear = torch.nn.functional.linear

    def spy(x, w, b=None):
        out = orig_linear(x, w, b)
        if w.shape[0] == 96:  # the head (vocab rows; no other layer has 96 outputs)
            sizes.append(out.numel() // 96)
        return out

    torch.nn.functional.linear = spy
    try:
        _step(model, ids, labels, loss_chunk_tokens=16)
    finally:
        torch.nn.functional.linear = orig_linear
    assert sizes == [16] * 5, sizes  # 2 x 40 tokens: five chunks, each once (no recompute in the backward)


@pytest.mark.parametrize("mode", ["full", "selective:G", "selective:MS"])
def test_activation_checkpointing_modes_match_none(mode):
    torch.manual_seed(1)
    plain = build_model(tiny_cfg("GSMA"))
    ckpt = build_model(tiny_cfg("GSMA", activation_checkpointing=mode))
    ckpt.load_state_dict(plain.state_dict())
    want = "AGMS" if mode == "full" else "".join(sorted(mode.split(":")[1]))
    assert ckpt.checkpointed == want
    ids, labels, _ = _batch()
    ref = _step(plain, ids, labels)
    got = _step(ckpt, ids, labels)
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0)
    _assert_grads_close(got[2], ref[2], 1e-6)


def test_chunked_mlp_matches_plain():
    torch.manual_seed(2)
    plain = build_model(tiny_cfg("GS"))
    chunked = build_model(tiny_cfg("GS", mlp_chunk_tokens=10, activation_checkpointing="selective:S"))
    chunked.load_state_dict(plain.state_dict())
    ids, labels, _ = _batch(T=23)
    ref, got = _step(plain, ids, labels), _step(chunked, ids, labels)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=0)
    _assert_grads_close(got[2], ref[2], 1e-5)


def test_residual_in_compute_dtype_under_autocast():
    """residual_dtype=compute keeps the stream in bf16 under bf16 autocast; float32 keeps float32;
    without autocast both are float32 (the compute dtype)."""
    torch.manual_seed(4)
    ids = torch.randint(0, 64, (1, 12))
    for residual, autocast, want in (("compute", True, torch.bfloat16), ("float32", True, torch.float32),
                                     ("compute", False, torch.float32)):
        model = build_model(tiny_cfg("GS", residual_dtype=residual))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            assert model.hidden_states(ids).dtype == want, (residual, autocast)


@pytest.mark.parametrize("override,key", [
    ("model.activation_checkpointing=some", "model.activation_checkpointing"),
    ("model.activation_checkpointing=selective:X", "model.activation_checkpointing"),
    ("model.activation_checkpointing=selective:M", "model.activation_checkpointing"),  # no M block in SAGA
    ("model.residual_dtype=bfloat16", "model.residual_dtype"),
    ("model.checkpoint_offload=true", "model.checkpoint_offload"),  # with activation_checkpointing=none
    ("model.mlp_chunk_tokens=-1", "model.mlp_chunk_tokens"),
    ("train.loss_chunk_tokens=-1", "train.loss_chunk_tokens"),
])
def test_memory_options_refuse_bad_values(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def test_bf16_on_cpu_runs_on_the_torch_kernels_and_refuses_the_triton_interpreter():
    from lctrain.train.trainer import Trainer, TrainingError

    small = ["model.d_model=32", "model.layer_pattern=GS", "data.seq_len=32", "data.micro_batch_size=1",
             "train.dtype=bfloat16"]
    trainer = Trainer(load_config(None, small), torch.device("cpu"), data=False)
    ids = torch.randint(0, 64, (1, 33))
    metrics = trainer.step([{"input_ids": ids[:, :-1], "labels": ids[:, 1:]}])
    assert trainer.dtype == torch.bfloat16 and metrics.loss > 0
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # float32 master weights
    with pytest.raises(TrainingError, match="model.kernel_backend=triton"):
        Trainer(load_config(None, [*small, "model.kernel_backend=triton"]), torch.device("cpu"), data=False)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rms_norm_backward_equals_autograd_of_the_formula(gated, dtype):
    """The memory-lean RMSNorm (it keeps x, gate and rstd only) against autograd through the formula."""
    import torch.nn.functional as F

    from lctrain.models.layers import rms_norm

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7, 16, generator=gen, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(16, generator=gen, dtype=dtype)).requires_grad_()
    gate = torch.randn(3, 7, 16, generator=gen, dtype=dtype, requires_grad=True) if gated else None
    dy = torch.randn(3, 7, 16, generator=gen, dtype=dtype)

    def formula(x, w, gate):
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * w.float()).to(x.dtype)
        return y if gate is None else (y.float() * F.silu(gate.float())).to(x.dtype)

    inputs = [t for t in (x, w, gate) if t is not None]
    ref_out = formula(x, w, gate)
    ref = torch.autograd.grad(ref_out, inputs, dy)
    out = rms_norm(x, w, 1e-6, gate)
    got = torch.autograd.grad(out, inputs, dy)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
