"""Grouped-query attention (model.attn_kv_heads): equals multi-head attention with each kv head
repeated for its query group, decodes with a smaller cache equal to the full forward, and under
Ulysses CP (kv heads replicated when cp > kv heads) equals one process."""
from __future__ import annotations

import pytest
import torch
from test_models import tiny_cfg

from lctrain.config import ConfigError, load_config
from lctrain.models import build_model
from lctrain.models.attention import Attention


def test_gqa_equals_mha_with_repeated_kv_heads():
    torch.manual_seed(1)
    gqa = Attention(16, 4, 8, window=None, rope=None, kv_heads=2)
    mha = Attention(16, 4, 8, window=None, rope=None)
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for name in ("k_proj", "v_proj"):  # kv head g serves query heads 2g, 2g+1
            w = getattr(gqa, name).weight.view(2, 8, 16)
            getattr(mha, name).weight.copy_(w.repeat_interleave(2, dim=0).reshape(32, 16))
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(gqa(x), mha(x))
    assert gqa.k_proj.weight.shape == (16, 16)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_gqa_decoding_matches_forward_with_a_smaller_cache(kv_heads):
    torch.manual_seed(2)
    model = build_model(tiny_cfg("SGA", attn_heads=4, attn_kv_heads=kv_heads, rope_layers="all",
                                 attn_conv_size=3, attn_conv_layers="all")).eval()
    ids = torch.randint(0, 64, (2, 15))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2)
        parts = [model(ids[:, :6], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(6, 15)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=0)
    assert cache.layers[2]["k"].shape[2] == kv_heads and cache.layers[0]["v"].shape[2] == kv_heads


def test_kv_heads_config_rules():
    with pytest.raises(ConfigError, match="model.attn_kv_heads"):
        load_config(overrides=["model.attn_heads=4", "model.attn_kv_heads=3"])
    with pytest.raises(ConfigError, match="model.attn_kv_heads"):
        load_config(overrides=["model.attn_heads=12", "model.attn_kv_heads=4", "parallel.cp=6", "data.seq_len=1536"])
    load_config(overrides=["model.attn_heads=4", "model.attn_kv_heads=1", "parallel.cp=2"])  # replicated under Ulysses


def _cp_gqa_worker(rank, world):
    from test_models import _cp_errors
    # kv heads 1 < cp = 2: replicated for Ulysses; kv heads 2 = cp: one per rank; with a sliding layer (halo)
    return [_cp_errors(rank, world, "SGA", attn_heads=4, attn_kv_heads=1),
            _cp_errors(rank, world, "SA", attn_heads=4, attn_kv_heads=2),
            # MLA global layer (tests/test_mla.py) through Ulysses, with packed documents
            _cp_errors(rank, world, "SA", separators=(3, 9), document_end_id=63, mla_kv_rank=12, mla_rope_dim=4)]


def test_gqa_and_mla_under_ulysses_cp_match_one_process():
    from dist_utils import run_world

    for per_rank in run_world(_cp_gqa_worker, 2, timeout=240):
        for out_err, grad_err in per_rank:
            assert out_err < 1e-4 and grad_err < 1e-3
