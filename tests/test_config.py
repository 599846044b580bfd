"""Configuration: recipes, overrides and the validation errors that must name the key and the fix."""
from pathlib import Path

import pytest

from lctrain.cli import main as cli_main
from lctrain.config import ConfigError, layer_pattern, load_config, split_recipe_and_overrides

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_defaults_validate_and_overrides_apply():
    cfg = load_config(overrides=["train.steps=7", "parallel.cp=2", "model.layer_pattern=GDMSA"])
    assert cfg.train.steps == 7 and cfg.parallel.cp == 2
    assert layer_pattern(cfg.model) == "GDMSA"


def test_layer_pattern_as_list():
    cfg = load_config(overrides=["model.layer_pattern=[G,S,A]"])
    assert layer_pattern(cfg.model) == "GSA"


def _leaves(node, prefix=""):
    """(dotted key, value) of every leaf of a nested dict."""
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_validates_and_every_key_takes_effect(recipe):
    """The recipe loads, and each value it sets is what the resolved config holds (none dropped)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(load_config(recipe), resolve=True)
    written = list(_leaves(OmegaConf.to_container(OmegaConf.load(recipe), resolve=True)))
    assert written, f"{recipe.name} sets nothing"
    for key, value in written:
        got = cfg
        for part in key.split("."):
            got = got[part]
        assert got == value, f"{recipe.name}: {key} is {got!r} in the resolved config, the recipe says {value!r}"


@pytest.mark.parametrize(
    "overrides, key, fix",
    [
        (["model.layer_pattern=GXA"], "model.layer_pattern", "use only"),
        (["data.seq_len=500", "parallel.cp=2"], "data.seq_len", "multiple of cp * chunk_size = 128"),
        (["data.seq_len=513", "parallel.cp=2"], "data.seq_len", "multiple of cp"),
        (["parallel.tp=3"], "model.n_heads", "multiple of tp"),
        (["parallel.cp=8", "data.seq_len=1024", "model.attn_heads=4"], "model.attn_heads", "multiple of cp"),
        (["model.rope.scaling=magic"], "model.rope.scaling", "use one of"),
        (["model.rope.layers=global"], "model.rope.layers", "use one of"),
        (["model.rope.scaling=yarn", "model.rope.factor=1.0"], "model.rope.factor", "factor > 1"),
        (["model.kernel_backend=cuda"], "model.kernel_backend", "use one of"),
        (["train.steps=0"], "train.steps", "number of optimizer steps"),
        (["data.tokenizer=/no/such/tokenizer.json"], "data.tokenizer", "tokenizer.json"),
        (["parallel.pp=3"], "parallel.pp", "pipeline stages"),
        (["model.nheads=4"], "model.nheads", "unknown key"),
        (["train.steps=many"], "train.steps", "could not be converted"),
        (["train.steps"], "train.steps", "key=value"),
        (["model.init_std=0"], "model.init_std", "null for sqrt(2 / (5 d_model))"),
        (["model.attn_conv_size=-1"], "model.attn_conv_size", "use 0 (no conv)"),
        (["model.attn_conv_layers=sliding"], "model.attn_conv_layers", "use all or global"),
        (["model.document_end_id=-1"], "model.document_end_id", "tokenizer's EOS id"),
        (["parallel.cp=8", "data.seq_len=16", "model.attn_heads=8", "model.window=2", "model.chunk_size=2",
          "model.conv_size=2"],
         "model.attn_conv_size", "smaller attn_conv_size"),
        (["train.answer_loss_weight=-1"], "train.answer_loss_weight", "plain LM loss"),
    ],
)
def test_validation_names_key_and_fix(overrides, key, fix):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    assert key in str(info.value) and fix in str(info.value)


def test_missing_recipe_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_recipe_then_overrides_order(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  steps: 11\nmodel:\n  d_model: 64\n")
    cfg = load_config(recipe, ["train.steps=12"])
    assert cfg.train.steps == 12 and cfg.model.d_model == 64
    assert split_recipe_and_overrides([str(recipe), "a.b=1"]) == (str(recipe), ["a.b=1"])
    with pytest.raises(ConfigError, match="neither the recipe"):
        split_recipe_and_overrides(["a.b=1", "stray"])


def test_cli_config_show_and_errors(capsys):
    assert cli_main(["config", "show", "model.d_model=96"]) == 0
    assert "d_model: 96" in capsys.readouterr().out
    assert cli_main(["config", "show", "model.layer_pattern=Q"]) == 2
    assert "model.layer_pattern" in capsys.readouterr().err
    assert cli_main(["no-such-command"]) == 2
    assert cli_main(["bench"]) == 2


@pytest.mark.parametrize("override, expected", [
    ("model.vocab_size=200", ("model.vocab_size", ">= 259")),  # smaller than the tokenizer
    ("model.document_end_id=5", ("model.document_end_id=257", "EOS")),  # not the tokenizer's EOS
])
def test_train_refuses_ids_that_do_not_fit_the_tokenizer(override, expected, capsys, tmp_path):
    code = cli_main(["train", override, f"train.out_dir={tmp_path}/run"])
    assert code == 2
    err = capsys.readouterr().err
    assert all(text in err for text in expected)
    assert not (tmp_path / "run").exists()


def test_init_std_null_scales_with_width():
    from lctrain.config import init_std
    cfg = load_config()
    assert cfg.model.init_std is None
    # sqrt(2 / (5 d_model)): 0.05 at d_model 160, half that at four times the width
    assert init_std(load_config(overrides=["model.d_model=160"]).model) == pytest.approx(0.05)
    assert init_std(load_config(overrides=["model.d_model=640"]).model) == pytest.approx(0.025)
    assert init_std(load_config(overrides=["model.init_std=0.02"]).model) == 0.02
