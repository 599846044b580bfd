"""The Deltaformer layer ("F") in the hybrid LM: forward/backward, decoding == full forward, packed
documents kept apart, configuration. (Its CP test lives in test_deltaformer_cp.py.)"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_models import tiny_cfg

from lctrain.config import ConfigError, load_config
from lctrain.models import build_model


def test_hybrid_with_deltaformer_trains():
    torch.manual_seed(3)
    model = build_model(tiny_cfg("GFSF", "torch"))
    ids = torch.randint(0, 64, (2, 13))
    loss = F.cross_entropy(model(ids).reshape(-1, 64), torch.randint(0, 64, (2 * 13,)))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(5):
        opt.zero_grad()
        loss = F.cross_entropy(model(ids[:, :-1]).reshape(-1, 64), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first


@pytest.mark.parametrize("rope_layers", ["all", "sliding"])
def test_deltaformer_decoding_matches_full_forward(rope_layers):
    torch.manual_seed(4)
    model = build_model(tiny_cfg("FSGF", rope_layers=rope_layers)).eval()
    ids = torch.randint(0, 64, (2, 19))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, ids.device)
        parts = [model(ids[:, :7], cache=cache), model(ids[:, 7:12], cache=cache)]  # two prefills
        parts += [model(ids[:, t:t + 1], cache=cache) for t in range(12, 19)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=0)
    assert cache.layers[0]["k"].shape[1] == cache.layers[0]["u"].shape[1] == 19


def test_deltaformer_keeps_packed_documents_apart():
    torch.manual_seed(5)
    model = build_model(tiny_cfg("F", document_end_id=63)).eval()
    first, second = torch.randint(0, 63, (2, 6)), torch.randint(0, 63, (2, 9))
    sep = torch.full((2, 1), 63)
    with torch.no_grad():
        packed = model(torch.cat([first, sep, second], 1))
        torch.testing.assert_close(packed[:, :7], model(torch.cat([first, sep], 1)), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed[:, 7:], model(second), atol=1e-5, rtol=1e-5)


def test_config_accepts_the_letter():
    cfg = load_config(overrides=["model.layer_pattern=SFGF"])
    assert cfg.model.layer_pattern == "SFGF"
    with pytest.raises(ConfigError, match="layer_pattern"):
        load_config(overrides=["model.layer_pattern=SXF"])
