"""ReRoPE / Leaky ReRoPE (eval-time, global attention) against a brute-force reference built from the
definition: score(i, j) = q_i . R(-r'(i - j)) k_j with r'(r) = r below the window, w + (r - w) / k above."""
from __future__ import annotations

import pytest
import torch
from test_models import tiny_cfg

from lctrain.config import ConfigError, load_config
from lctrain.models import RotaryEmbedding, build_model
from lctrain.models.attention import masked_attention
from lctrain.models.rerope import rerope_attention


def brute_force(q, k, v, rope, window, leak):
    B, T, H, D = q.shape
    out = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    for i in range(T):
        scores = []
        for j in range(i + 1):
            r = i - j
            rel = r if r < window else window + (r - window) * leak
            kj = rope(k[:, j:j + 1].double(), torch.tensor([-rel], dtype=torch.float64)).double()[:, 0]
            scores.append((q[:, i].double() * kj).sum(-1) * D ** -0.5)       # [B, H]
        p = torch.softmax(torch.stack(scores, -1), -1)                       # [B, H, i+1]
        out[:, i] = torch.einsum("bhj,bjhd->bhd", p, v[:, : i + 1].double())
    return out


@pytest.mark.parametrize("leak", [0.0, 0.25])
def test_rerope_equals_brute_force(leak):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 13, 2, 8, generator=g) for _ in range(3))
    rope = RotaryEmbedding(8, base=100.0)
    pos = torch.arange(13)
    got = rerope_attention(q, k, v, rope, 4, leak, pos, pos)
    torch.testing.assert_close(got.double(), brute_force(q, k, v, rope, 4, leak), atol=1e-5, rtol=1e-5)


def test_rerope_with_a_window_past_the_sequence_is_plain_rope():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 9, 2, 8, generator=g) for _ in range(3))
    rope, pos = RotaryEmbedding(8), torch.arange(9)
    plain = masked_attention(rope(q, pos), rope(k, pos), v, pos, pos)
    torch.testing.assert_close(rerope_attention(q, k, v, rope, 9, 0.0, pos, pos), plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scaling,factor", [("rerope", 1.0), ("leaky_rerope", 4.0)])
def test_model_rerope_decoding_matches_forward(scaling, factor):
    torch.manual_seed(6)
    model = build_model(tiny_cfg("SGA", rope_layers="all")).eval()
    ids = torch.randint(0, 64, (2, 17))
    with torch.no_grad():
        plain = model(ids)
        model.set_rope_scaling(scaling, factor, rerope_window=17)  # window covers everything: plain RoPE
        torch.testing.assert_close(model(ids), plain, atol=1e-5, rtol=1e-5)
        model.set_rope_scaling(scaling, factor, rerope_window=5)
        assert model.blocks[0].mixer.rope.rerope is None and model.blocks[2].mixer.rope.rerope[0] == 5
        full = model(ids)
        assert not torch.allclose(full, plain, atol=1e-4)
        cache = model.new_cache(2)
        parts = [model(ids[:, :8], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(8, 17)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=0)


def test_rerope_is_eval_only_and_needs_a_window():
    with pytest.raises(ConfigError, match="eval-time"):
        load_config(overrides=["model.rope.scaling=rerope", "model.rope.rerope_window=64"])
    with pytest.raises(ConfigError, match="rerope_window"):
        load_config(overrides=["model.rope.scaling=leaky_rerope", "model.rope.factor=4"])
    with pytest.raises(ValueError, match="Deltaformer"):
        build_model(tiny_cfg("FA", rope_layers="all")).set_rope_scaling("rerope", 1.0, rerope_window=4)
