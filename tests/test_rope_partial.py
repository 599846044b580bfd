"""Partial RoPE (model.rope.fraction): only the leading rotary dims rotate, relative positions survive."""
from __future__ import annotations

import pytest
import torch
from test_models import tiny_cfg

from lctrain.config import ConfigError, load_config
from lctrain.models import RotaryEmbedding, build_model


def test_partial_rope_rotates_only_the_leading_dims():
    rope = RotaryEmbedding(8, fraction=0.5)
    full4 = RotaryEmbedding(4)
    assert rope.rotary_dim == 4
    x = torch.randn(1, 5, 2, 8)
    pos = torch.arange(3, 8)
    y = rope(x, pos)
    torch.testing.assert_close(y[..., 4:], x[..., 4:])           # the rest carry no position
    torch.testing.assert_close(y[..., :4], full4(x[..., :4], pos))  # the rotated part is plain RoPE of dim 4
    # scores depend on relative positions only
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    s = lambda a, b: (rope(q, torch.tensor([a])) * rope(k, torch.tensor([b]))).sum()  # noqa: E731
    torch.testing.assert_close(s(9, 4), s(25, 20))
    assert not torch.allclose(s(9, 4), s(9, 5))


def test_partial_rope_from_config():
    model = build_model(tiny_cfg("SA", rope_fraction=0.5))
    assert model.blocks[0].mixer.rope.rotary_dim == 4
    model(torch.randint(0, 64, (1, 6))).sum().backward()
    with pytest.raises(ConfigError, match="model.rope.fraction"):
        load_config(overrides=["model.rope.fraction=0.01"])
    with pytest.raises(ConfigError, match="model.rope.fraction"):
        load_config(overrides=["model.rope.fraction=1.5"])
