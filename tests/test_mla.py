"""Multi-head latent attention (model.mla_kv_rank): the absorbed decoding form on the latent cache
equals the full forward; the cache holds only the latent and the shared rope key. (Its CP test is in
test_gqa.py, in the same 2-rank world as GQA's.)"""
from __future__ import annotations

import pytest
import torch
from test_models import tiny_cfg

from lctrain.config import ConfigError, load_config
from lctrain.models import build_model
from lctrain.models.mla import MLAttention


@pytest.mark.parametrize("rope_layers", ["all", "sliding"])
def test_mla_absorbed_decoding_equals_full_forward(rope_layers):
    torch.manual_seed(3)
    model = build_model(tiny_cfg("SGA", mla_kv_rank=12, mla_rope_dim=4, rope_layers=rope_layers)).eval()
    assert isinstance(model.blocks[2].mixer, MLAttention)
    assert (model.blocks[2].mixer.rope is None) == (rope_layers == "sliding")
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2)
        parts = [model(ids[:, :5], cache=cache), model(ids[:, 5:9], cache=cache)]
        parts += [model(ids[:, t:t + 1], cache=cache) for t in range(9, 16)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=0)
    layer = cache.layers[2]
    assert set(layer) == {"c", "k_rope", "pos"}
    assert layer["c"].shape == (2, 16, 12) and layer["k_rope"].shape == (2, 16, 4)


def test_mla_trains_and_is_causal():
    torch.manual_seed(4)
    model = build_model(tiny_cfg("A", mla_kv_rank=8, mla_rope_dim=4))
    ids = torch.randint(0, 64, (1, 10))
    out = model(ids)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    ids2 = ids.clone()
    ids2[0, 6] = (ids2[0, 6] + 1) % 64
    with torch.no_grad():
        torch.testing.assert_close(model(ids2)[:, :6], out[:, :6].detach())


def test_mla_config_rules():
    with pytest.raises(ConfigError, match="model.mla_rope_dim"):
        load_config(overrides=["model.mla_kv_rank=64", "model.mla_rope_dim=3", "model.attn_conv_size=0"])
    with pytest.raises(ConfigError, match="model.attn_conv_size"):
        load_config(overrides=["model.mla_kv_rank=64"])  # the default has q/k/v convs on the global layer
    load_config(overrides=["model.mla_kv_rank=64", "model.attn_conv_size=0"])
