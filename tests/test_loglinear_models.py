"""Log-linear layers (letters L: log-linear gated DeltaNet, K: log-linear Mamba-2) in HybridLM:
forward/backward, decoding on the level states equals the full forward, a hybrid trains on CPU, and a
CP=2 training step equals the one-process step."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_world
from test_models import tiny_cfg

from lctrain.config import ConfigError, default_config, validate
from lctrain.models import build_model


def test_hybrid_with_loglinear_layers_forward_backward():
    torch.manual_seed(1)
    model = build_model(tiny_cfg("LSKA", loglinear_levels=6))
    assert [type(b.mixer).__name__ for b in model.blocks[::2]] == ["LogLinearDeltaNetMixer", "LogLinearMamba2Mixer"]
    ids = torch.randint(0, 64, (2, 19))
    loss = F.cross_entropy(model(ids).reshape(-1, 64), torch.randint(0, 64, (2 * 19,)))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} gets no gradient"
    lam = model.blocks[0].mixer.level_weights(torch.zeros(1, 1, 32))
    assert lam.shape == (1, 1, 2, 6) and torch.allclose(lam, torch.ones_like(lam))  # starts at lambda = 1


@pytest.mark.parametrize("pattern", ["LSKA", "KL"])
def test_decoding_on_level_states_matches_full_forward(pattern):
    torch.manual_seed(2)
    model = build_model(tiny_cfg(pattern, loglinear_levels=7)).eval()
    ids = torch.randint(0, 64, (2, 37))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, ids.device)
        parts = [model(ids[:, :13], cache=cache), model(ids[:, 13:20], cache=cache)]  # two prefills
        parts += [model(ids[:, t:t + 1], cache=cache) for t in range(20, 37)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=0)
    state = cache.layers[0]["state"]
    assert state.shape == (2, 2, 7, 8, 8)  # [B, H, L, K, V] level states


def test_hybrid_with_loglinear_layers_trains_on_cpu():
    torch.manual_seed(3)
    model = build_model(tiny_cfg("LKSA", loglinear_levels=6))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (2, 17), generator=gen)
    losses = []
    for _ in range(10):
        loss = F.cross_entropy(model(ids[:, :-1]).reshape(-1, 64), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_config_rules_for_loglinear_layers():
    cfg = default_config()
    cfg.model.layer_pattern = "LSKA"
    cfg.data.seq_len = 4096
    cfg.model.document_end_id = None
    cfg.model.loglinear_levels = 12
    with pytest.raises(ConfigError, match="model.loglinear_levels"):
        validate(cfg)
    cfg.model.loglinear_levels = 13
    validate(cfg)
    cfg.parallel.cp = 2
    cfg.data.seq_len = 3 * 128 * 2
    with pytest.raises(ConfigError, match="power of two"):
        validate(cfg)
    cfg.data.seq_len = 4096
    cfg.model.document_end_id = 257
    with pytest.raises(ConfigError, match="model.document_end_id"):
        validate(cfg)


# ------------------------------------------------------- CP training step (with activation checkpointing)

def _cfg(pattern):
    import test_cp_model
    m = test_cp_model.tiny_model_cfg("full")  # activation checkpointing: the CP op runs again in the backward
    m.layer_pattern, m.loglinear_levels = pattern, 6
    m.document_end_id = None  # packed documents are refused by the log-linear CP op
    return m


def _build(pattern, cp_group=None):
    torch.manual_seed(0)
    return build_model(_cfg(pattern), cp_group=cp_group).to(torch.float64)


def _cp_worker(rank, world, pattern):
    from lctrain.parallel import LogLinearContextParallelOp, mesh
    from test_cp_model import SEQ_LEN, one_step, sample

    mesh.init_mesh({"cp": world, "tp": 1, "pp": 1}, "cpu")
    model = _build(pattern, cp_group=mesh.cp_group())
    loss, grads, params = one_step(model, [sample(100)], cp_group=mesh.cp_group(), cp_rank=mesh.cp_rank(),
                                   cp_size=world, grad_group=mesh.dp_cp_group(), dp_size=1)
    ops = [b.mixer._cp_op for b in model.blocks if getattr(b.mixer, "_cp_op", None) is not None]
    assert SEQ_LEN // world == 8
    return dict(loss=loss, grads=grads, n_loglinear=sum(isinstance(o, LogLinearContextParallelOp) for o in ops))


def test_cp2_training_step_with_loglinear_layers_equals_one_process():
    from test_cp_model import RTOL, _rel, one_step, sample

    pattern = "LSKA"
    results = run_world(_cp_worker, 2, pattern, timeout=300, init_process_group=False)
    ref_loss, ref_grads, _ = one_step(_build(pattern), [sample(100)])
    names = [n for n, _ in _build(pattern).named_parameters()]
    for rank, res in enumerate(results):
        assert res["n_loglinear"] == 2
        assert abs(res["loss"] - ref_loss) <= RTOL * abs(ref_loss)
        for name, got, ref in zip(names, res["grads"], ref_grads):
            assert _rel(got, ref) <= RTOL, f"rank {rank}: gradient of {name} differs by {_rel(got, ref):.2e}"
