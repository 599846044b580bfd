"""`lctrain rope bound` and the validate warning: the smallest base the 'base bounds context length'
criterion allows, against values checked by hand."""
from __future__ import annotations

import math
import warnings

import pytest

from lctrain.cli import main as cli_main
from lctrain.config import ConfigWarning, load_config
from lctrain.models.rope import base_lower_bound, decay_criterion_holds

# (rotated dims, context, bound): d = 4 gives B(m) = cos m + cos(m / sqrt b); contexts 1 and 2 only
# check m = 0 and m = 1 (cos 1 + cos(1/sqrt b) > 0 for every b >= 1), so the scan's first base, 2, passes;
# context 3 needs cos(2 / sqrt b) >= cos(pi - 2), context 4 (and 5: m = 4 then holds) 3 / sqrt b <= pi - 3.
HAND_CHECKED = [
    (4, 1, 2.0),
    (4, 2, 2.0),
    (4, 3, (2 / (math.pi - 2)) ** 2),
    (4, 4, (3 / (math.pi - 3)) ** 2),
    (4, 5, (3 / (math.pi - 3)) ** 2),
]


@pytest.mark.parametrize("d,T,bound", HAND_CHECKED)
def test_bound_matches_hand_computation(d, T, bound):
    got = base_lower_bound(d, T)
    assert bound <= got <= bound * 1.002
    assert decay_criterion_holds(got, d, T)


def test_bound_at_head_dim_128_and_1k_context():
    """The published figure for d = 128 at 1K is 4.3e3."""
    assert base_lower_bound(128, 1024) == pytest.approx(4.3e3, rel=0.02)
    assert not decay_criterion_holds(4.0e3, 128, 1024)


def test_bound_refuses_what_no_base_satisfies():
    with pytest.raises(ValueError, match="even"):
        base_lower_bound(3, 10)
    with pytest.raises(ValueError, match="no RoPE base"):
        base_lower_bound(2, 3)  # B(m) = cos m < 0 at m = 2 whatever the base


def test_cli_prints_the_bound(capsys):
    assert cli_main(["rope", "bound", "--head-dim", "4", "--context", "4", "--base", "400"]) == 0
    out = capsys.readouterr().out
    assert "449" in out and "base 400: fails" in out


def test_validate_warns_below_the_bound_only():
    low = ["model.rope.layers=all", "model.layer_pattern=GA", "data.seq_len=4096", "model.attn_head_dim=128",
           "model.rope.base=10000"]
    with pytest.warns(ConfigWarning, match="model.rope.base=10000.*4096 tokens"):
        load_config(overrides=low)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        load_config(overrides=low[:-1] + ["model.rope.base=50000"])
        load_config()  # the default: RoPE only in the 128-token windows


@pytest.mark.parametrize("recipe", ["default.yaml", "gdn_swa_16k.yaml", "hybrid_131k_cp8.yaml"])
def test_recipes_respect_the_base_bound(recipe):
    """Every shipped recipe's base passes the criterion for the distances its RoPE layers see."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        load_config(f"recipes/{recipe}")
