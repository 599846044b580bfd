"""Long-context evals: NIAH sample construction and scoring, greedy decoding on the cache, per-position
loss, context parallelism (cp=2 on gloo == one process), and the two CLIs writing JSON/CSV/PNG.

Tiny float32 models on CPU, random weights (the accuracy of a trained model is reported, not tested).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_world  # tests/ is on sys.path through conftest.py (see there)

from lctrain.config import load_config
from lctrain.data.tokenizer import ByteTokenizer
from lctrain.eval.generate import cp_prefill_length, generate
from lctrain.eval.position_loss import PositionLoss, log_bins, score_checkpoint, smooth
from lctrain.eval.ruler import (
    TASKS,
    build_sample,
    get_template,
    parse_depths,
    parse_lengths,
    string_match_all,
)

TINY = ["model.d_model=32", "model.layer_pattern=GSGA", "model.n_heads=2", "model.head_dim=8", "model.attn_heads=2",
        "model.attn_head_dim=8", "model.window=8", "model.chunk_size=16", "model.conv_size=4", "model.mlp_ratio=2.0",
        "model.kernel_backend=torch", "data.seq_len=64"]


class WordTokenizer:
    """A non-byte tokenizer for length tests: words, runs of spaces and single punctuation marks."""

    eos_id, bos_id, pad_id = 0, 1, 2

    def __init__(self):
        self.vocab, self.inv = {}, {}

    @property
    def vocab_size(self):
        return 3 + len(self.vocab)

    def encode(self, text):
        ids = []
        for piece in re.findall(r"\s+|\w+|[^\w\s]", text):
            if piece not in self.vocab:
                self.vocab[piece] = 3 + len(self.vocab)
                self.inv[self.vocab[piece]] = piece
            ids.append(self.vocab[piece])
        return ids

    def decode(self, ids):
        return "".join(self.inv.get(int(i), "") for i in ids)


def make_checkpoint(out_dir: Path, seed: int = 0) -> Path:
    from lctrain.models import build_model
    from lctrain.train.checkpoint import save_checkpoint

    cfg = load_config(None, TINY + [f"train.out_dir={out_dir}"])
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    with _quiet():
        return save_checkpoint(out_dir, 1, model=model, optimizer=None, cfg=cfg)


class _quiet:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        return self._w.__exit__(*exc)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("run") / "tiny")


# ------------------------------------------------------------------------------------ parsing


def test_parse_lengths_and_depths():
    assert parse_lengths("1k,2k,131k") == [1024, 2048, 131 * 1024]
    assert parse_lengths([512, "4k"]) == [512, 4096]
    assert parse_depths("0:1:11") == [round(i / 10, 6) for i in range(11)]
    assert parse_depths("0,0.5,1") == [0.0, 0.5, 1.0]
    for bad in ("", "1x", "-5", "1.5"):
        with pytest.raises(ValueError):
            parse_lengths(bad)
    for bad in ("0:1", "0:2:3", "a:b:c"):
        with pytest.raises(ValueError):
            parse_depths(bad)


# ------------------------------------------------------------------------------- construction


@pytest.mark.parametrize("tokenizer", [ByteTokenizer(), WordTokenizer()], ids=["byte", "word"])
@pytest.mark.parametrize("task", list(TASKS))
def test_sample_length_and_depth(task, tokenizer):
    spec = TASKS[task]
    for length in (2048, 8192):
        for depth in (0.0, 0.3, 0.5, 1.0):
            s = build_sample(task, length, depth, tokenizer, index=1, seed=3, max_new_tokens=40)
            total = len(s.prompt_ids) + 40
            assert 0.99 * length <= total <= length, (task, length, depth, total)
            assert s.prompt_ids == tokenizer.encode(s.prompt)
            # the queried needle sits at its token offset and holds the first answer
            needle = tokenizer.decode(s.prompt_ids[s.needle_start:s.needle_start + s.needle_tokens])
            assert needle.startswith("One of the special magic") and s.answers[0] in needle, needle
            assert s.keys[0] in needle
            # depth: the nearest sentence boundary, within 10% of the context (5% once sentences are short)
            slack = 0.05 if length == 8192 else 0.1
            assert abs(s.measured_depth - depth) <= slack, (task, length, depth, s.measured_depth)
            for answer in s.answers:
                assert s.prompt.count(answer) == 1
            n_needles = spec.num_keys * spec.num_values
            assert s.prompt.count("One of the special magic") == n_needles
    # deterministic per (seed, coordinates), different across indices
    a = build_sample(task, 2048, 0.5, tokenizer, index=0, seed=3, max_new_tokens=40)
    b = build_sample(task, 2048, 0.5, tokenizer, index=0, seed=3, max_new_tokens=40)
    c = build_sample(task, 2048, 0.5, tokenizer, index=1, seed=3, max_new_tokens=40)
    assert a.prompt == b.prompt and a.answers != c.answers


def test_depth_moves_the_needle_monotonically():
    tok = ByteTokenizer()
    starts = [build_sample("s_niah_2", 4096, d, tok, seed=1).needle_start for d in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert starts == sorted(starts) and starts[0] < starts[-1]


def test_templates_follow_ruler_and_the_training_format():
    tok = ByteTokenizer()
    single = build_sample("s_niah_2", 2048, 0.5, tok, template="ruler").prompt
    assert single.startswith("A special magic number is hidden within the following text.")
    assert single.endswith("What is the special magic number for "
                           f"{build_sample('s_niah_2', 2048, 0.5, tok).extra['query']} "
                           "mentioned in the provided text? The special magic number for "
                           f"{build_sample('s_niah_2', 2048, 0.5, tok).extra['query']} mentioned in the provided text "
                           "is")
    multi = build_sample("mv_niah", 2048, 0.5, tok, template="ruler")
    assert multi.prompt.startswith("Some special magic numbers are hidden")
    assert multi.prompt.endswith("mentioned in the provided text are") and len(multi.answers) == 4
    mq = build_sample("mq_niah", 2048, 0.5, tok)
    assert ", and " in mq.extra["query"] and len(mq.answers) == 4
    uuid_sample = build_sample("s_niah_3", 2048, 0.5, tok)
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", uuid_sample.answers[0])

    from lctrain.data.needle import NEEDLE_DIGITS, question_text

    t = build_sample("s_niah_1", 512, 0.5, tok, template="train", max_new_tokens=16)
    assert t.prompt.endswith("\n\n" + question_text("s_niah_1", t.extra["query"]))
    assert len(t.answers[0]) == NEEDLE_DIGITS and t.prompt.startswith("The grass is green.")  # as training writes
    assert t.template == "train"
    short = build_sample("s_niah_1", 256, 0.5, tok, template="train", max_new_tokens=16)
    assert short.template == "train_compact"  # as training_needle_sample writes a 256-token sample
    assert short.prompt.endswith("\n\nThe pass key is:") and f"The pass key is {short.answers[0]}." in short.prompt
    with pytest.raises(ValueError, match="one needle"):
        build_sample("mk_niah_1", 4096, 0.5, tok, template="train")
    with pytest.raises(ValueError, match="use lengths >="):
        build_sample("mq_niah", 256, 0.5, tok)
    with pytest.raises(ValueError, match="unknown NIAH template"):
        get_template("nope")


def test_string_match_all_scores_known_answers():
    assert string_match_all(" 1234567. The grass", ["1234567"]) == 1.0
    assert string_match_all(" 123456", ["1234567"]) == 0.0
    assert string_match_all("ABCDEF-12", ["abcdef-12"]) == 1.0  # case-insensitive
    assert string_match_all("are 11, 22 and 99", ["11", "22", "33", "44"]) == 0.5
    with pytest.raises(ValueError):
        string_match_all("x", [])


# ------------------------------------------------------------------------------------ decoding


def _tiny_model(pattern="GSGA", seed=0):
    from lctrain.models import build_model

    cfg = load_config(None, TINY + [f"model.layer_pattern={pattern}"])
    torch.manual_seed(seed)
    return build_model(cfg.model).eval(), cfg


@pytest.mark.parametrize("pattern", ["GSGA", "DM"])
def test_greedy_generation_equals_rerunning_the_prompt(pattern):
    model, cfg = _tiny_model(pattern)
    prompt = torch.randint(0, 259, (37,), generator=torch.Generator().manual_seed(0)).tolist()
    gen = generate(model, prompt, 8)
    seq, expected = list(prompt), []
    with torch.no_grad():
        for _ in range(8):
            logits = model(torch.tensor([seq]))[0, -1]
            expected.append(int(logits.argmax()))
            seq.append(expected[-1])
        first = model(torch.tensor([prompt]))[0, -1]
    assert gen.tokens == expected
    torch.testing.assert_close(gen.first_logits, first, rtol=1e-5, atol=1e-5)
    # EOS ends the continuation
    eos = expected[2]
    assert generate(model, prompt, 8, eos_id=eos).tokens == expected[:expected.index(eos) + 1]


def test_cp_prefill_length_rules():
    _, cfg = _tiny_model()
    m = cfg.model  # chunk 16, window 8, conv 4
    assert cp_prefill_length(100, 2, m) == 96
    assert cp_prefill_length(31, 2, m) == 0
    assert cp_prefill_length(100, 1, m) == 96
    m.window = 60  # shards of 32 cannot carry a 59-token halo
    assert cp_prefill_length(64, 2, m) == 0 and cp_prefill_length(128, 2, m) == 128


# ------------------------------------------------------------------------------- position loss


def test_position_loss_equals_direct_computation():
    model, _ = _tiny_model()
    T = 48
    g = torch.Generator().manual_seed(1)
    windows = [torch.randint(0, 259, (T + 1,), generator=g).tolist() for _ in range(3)] + [list(range(10, 30))]
    acc = score_checkpoint(model, iter(windows), T, num_windows=10, batch_size=2, pad_id=258)
    sums, counts = torch.zeros(T, dtype=torch.float64), torch.zeros(T, dtype=torch.float64)
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor([w])
            losses = F.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:], reduction="none")
            n = len(w) - 1
            sums[:n] += losses.double()
            counts[:n] += 1
    assert torch.equal(acc.counts, counts)
    torch.testing.assert_close(acc.sums, sums, rtol=1e-5, atol=1e-5)
    mean = acc.mean()
    assert torch.isfinite(mean).all()
    torch.testing.assert_close(mean, sums / counts, rtol=1e-5, atol=1e-5)

    sm = smooth(acc.sums, acc.counts, per_decade=10)
    assert sum(sm["tokens"]) == int(counts.sum())
    for first, last, loss in zip(sm["first"], sm["last"], sm["loss"]):
        assert loss == pytest.approx(float(sums[first - 1:last].sum() / counts[first - 1:last].sum()))


def test_windows_from_mds_text_and_embedded(tmp_path):
    import numpy as np

    from lctrain.data.mds import write_mds
    from lctrain.eval.position_loss import iter_windows

    samples = [np.arange(9) + 10 * i for i in range(3)]
    mds = write_mds(tmp_path / "mds", samples, sample_len=9, dtype=np.uint16)
    windows = list(iter_windows(str(mds), ByteTokenizer(), 11))
    stream = np.concatenate(samples).tolist()
    assert windows == [stream[:12], stream[12:24]]  # the samples read as one stream, cut into seq_len + 1

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("hello world")
    (tmp_path / "docs" / "b.jsonl").write_text(json.dumps({"text": "abc"}) + "\n" + json.dumps({"text": "x"}) + "\n")
    tok = ByteTokenizer()
    docs = list(iter_windows(str(tmp_path / "docs"), tok, 8))
    assert docs == [tok.encode("hello wor"), tok.encode("abc")]  # one document per window, 1-token docs dropped
    packed = list(iter_windows(str(tmp_path / "docs"), tok, 5, pack=True))
    assert packed[0] == tok.encode("hello ") and packed[1] == tok.encode("world") + [tok.eos_id]
    emb = next(iter_windows("embedded", tok, 100))
    assert len(emb) == 101


def test_log_bins_cover_every_position_once():
    for n, k in ((1, 20), (7, 20), (1000, 20), (131072, 5)):
        bins = log_bins(n, k)
        assert bins[0][0] == 1 and bins[-1][1] == n
        assert all(b[0] == a[1] + 1 for a, b in zip(bins, bins[1:]))
        assert all(last >= first for first, last in bins)
    assert log_bins(1000, 20)[:5] == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5)]


def test_position_loss_rejects_wrong_window_length():
    model, _ = _tiny_model()
    with pytest.raises(ValueError, match="seq_len"):
        PositionLoss(16).add(model, torch.zeros(1, 10, dtype=torch.long), torch.ones(1, 10, dtype=torch.bool))


# --------------------------------------------------------------------------- context parallel


def _cp_eval_worker(rank, world, ckpt_path, prompts, windows, seq_len):
    from lctrain.eval import runtime
    from lctrain.eval.niah import run_niah

    cfg = runtime.eval_config(ckpt_path, None, [f"parallel.cp={world}"])
    ctx = runtime.start(cfg)
    model, cp_model, ckpt_cfg, _ = runtime.load_models(ckpt_path, ctx, cfg)
    gens = [generate(model, p, 6, cp_model=cp_model, cp_group=ctx.cp_group) for p in prompts]
    records = run_niah(model, ByteTokenizer(), tasks=["s_niah_1"], lengths=[256], depths=[0.0, 1.0], samples=2,
                       template="train", ctx=ctx, cp_model=cp_model, log=None)
    acc = score_checkpoint(cp_model, iter(windows), seq_len, num_windows=8, batch_size=2, pad_id=258, ctx=ctx)
    runtime.stop()
    # the same world as 2 data-parallel replicas (cp=1): samples and windows are dealt out, results gathered
    cfg = runtime.eval_config(ckpt_path, None, ["parallel.cp=1"])
    ctx = runtime.start(cfg)
    assert (ctx.dp_size, ctx.cp_size) == (world, 1)
    model, cp_model, _, _ = runtime.load_models(ckpt_path, ctx, cfg)
    dp_records = run_niah(model, ByteTokenizer(), tasks=["s_niah_1"], lengths=[256], depths=[0.0, 1.0], samples=2,
                          template="train", ctx=ctx, cp_model=cp_model, log=None)
    dp_acc = score_checkpoint(model, iter(windows), seq_len, num_windows=8, batch_size=2, pad_id=258, ctx=ctx)
    return ([(g.tokens, g.first_logits, g.cp_prefill_tokens) for g in gens], records, acc.sums, acc.counts,
            dp_records, dp_acc.sums, dp_acc.counts)


def test_cp2_and_dp2_evals_equal_one_process(ckpt):
    from lctrain.eval.niah import run_niah
    from lctrain.train.checkpoint import load_model_for_eval

    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 259, (n,), generator=g).tolist() for n in (70, 64, 20)]
    seq_len = 64
    windows = [torch.randint(0, 259, (seq_len + 1,), generator=g).tolist() for _ in range(3)] + [list(range(40))]
    results = run_world(_cp_eval_worker, 2, str(ckpt), prompts, windows, seq_len, timeout=240)

    with _quiet():
        model, _ = load_model_for_eval(ckpt)
    ref_gens = [generate(model, p, 6) for p in prompts]
    ref_records = run_niah(model, ByteTokenizer(), tasks=["s_niah_1"], lengths=[256], depths=[0.0, 1.0], samples=2,
                           template="train", log=None)
    ref_acc = score_checkpoint(model, iter(windows), seq_len, num_windows=8, batch_size=2, pad_id=258)
    for gens, records, sums, counts, dp_records, dp_sums, dp_counts in results:  # every rank has the full answer
        assert [t for t, _, _ in gens] == [r.tokens for r in ref_gens]
        assert [n for _, _, n in gens] == [64, 64, 0]  # sharded prefill of the first 64, then the rest
        for (_, logits, _), ref in zip(gens, ref_gens):
            torch.testing.assert_close(logits, ref.first_logits, rtol=1e-4, atol=1e-4)
        assert [r["prediction"] for r in records] == [r["prediction"] for r in ref_records]
        assert [r["cp_prefill_tokens"] for r in records] == [224] * 4
        torch.testing.assert_close(sums, ref_acc.sums, rtol=1e-4, atol=1e-4)
        assert torch.equal(counts, ref_acc.counts)
        assert [r["prediction"] for r in dp_records] == [r["prediction"] for r in ref_records]
        assert [r["index"] for r in dp_records] == [r["index"] for r in ref_records]
        torch.testing.assert_close(dp_sums, ref_acc.sums, rtol=1e-4, atol=1e-4)
        assert torch.equal(dp_counts, ref_acc.counts)


# ---------------------------------------------------------------------------------------- CLIs


def test_niah_cli_writes_json_and_heatmaps(ckpt, tmp_path):
    from lctrain.eval import niah

    out = tmp_path / "niah"
    rc = niah.main(["--ckpt", str(ckpt), "--lengths", "256,300", "--depths", "0:1:2", "--samples", "1",
                    "--tasks", "s_niah_1", "--template", "train", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "niah_train.json").read_text())
    assert report["template"] == "train" and len(report["records"]) == 2 * 2 * 1
    assert [(r["length"], r["depth"]) for r in report["records"]] == [(256, 0.0), (256, 1.0), (300, 0.0), (300, 1.0)]
    grid = report["summary"]["s_niah_1"]["grid"]
    assert len(grid) == 2 and all(len(row) == 2 for row in grid)
    assert all(0.0 <= v <= 100.0 for row in grid for v in row)
    png = out / "niah_s_niah_1_train.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000


def test_position_loss_cli_plots_several_checkpoints(ckpt, tmp_path):
    from lctrain.eval import position_loss

    other = make_checkpoint(tmp_path / "other", seed=1)
    text = tmp_path / "docs.txt"
    text.write_text("The grass is green and the sky is blue. " * 30)
    out = tmp_path / "pl"
    rc = position_loss.main(["--ckpt", str(ckpt), "--ckpt", str(other), "--data", str(text), "--seq-len", "96",
                             "--num-windows", "2", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "position_loss.json").read_text())
    assert [len(r["per_position"]["mean"]) for r in report["checkpoints"]] == [96, 96]
    assert report["checkpoints"][0]["mean_loss"] != report["checkpoints"][1]["mean_loss"]
    rows = (out / "position_loss.csv").read_text().splitlines()
    assert rows[0] == "label,position,mean_loss,count" and len(rows) == 1 + 2 * 96
    png = out / "position_loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_cli_errors_name_the_fix(ckpt, capsys):
    from lctrain.eval import niah, position_loss

    assert niah.main(["--ckpt", str(ckpt), "--lengths", "40", "--template", "train"]) == 2
    assert "use lengths >=" in capsys.readouterr().err
    assert niah.main(["--ckpt", str(ckpt), "model.d_model=64"]) == 2
    assert "cannot change for an eval" in capsys.readouterr().err
    assert niah.main(["--ckpt", str(ckpt), "--tasks", "s_niah_9"]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert position_loss.main(["--ckpt", str(ckpt), "--seq-len", "40", "parallel.cp=2"]) == 2
    assert "multiple of 32" in capsys.readouterr().err
    assert niah.main(["--ckpt", "/nonexistent/run"]) == 2
    assert "not a checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_niah_cli_cp2_self_launch_equals_cp1(ckpt, tmp_path):
    from lctrain.eval.niah import run_niah
    from lctrain.train.checkpoint import load_model_for_eval

    out = tmp_path / "cp2"
    proc = subprocess.run([sys.executable, "-m", "lctrain.cli", "eval", "niah", "--ckpt", str(ckpt), "--lengths", "256",
                           "--depths", "0.5", "--samples", "2", "--template", "train", "--out", str(out),
                           "parallel.cp=2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "launching 2 local processes" in proc.stdout
    report = json.loads((out / "niah_train.json").read_text())
    assert report["parallel"] == {"cp": 2, "dp": 1}
    assert all(r["cp_prefill_tokens"] > 0 for r in report["records"])
    with _quiet():
        model, _ = load_model_for_eval(ckpt)
    ref = run_niah(model, ByteTokenizer(), tasks=["s_niah_1"], lengths=[256], depths=[0.5], samples=2, template="train",
                   seed=0, log=None)
    assert [r["prediction"] for r in report["records"]] == [r["prediction"] for r in ref]


def _cp_generate_heads_worker(rank, world):
    """Greedy generation with the prompt prefilled over 2 CP ranks vs one process, for layers whose
    decoding cache is not plain rotated k/v: MLA (latent + rope key), (Leaky) ReRoPE (unrotated keys),
    MQA (one kv head)."""
    import torch.distributed as dist
    from test_models import tiny_cfg

    from lctrain.models import build_model

    out = []
    for over in (dict(attn_heads=4, attn_kv_heads=1), dict(attn_heads=4, mla_kv_rank=6, mla_rope_dim=4),
                 dict(rope_scaling="rerope", rope_rerope_window=3),
                 dict(rope_scaling="leaky_rerope", rope_rerope_window=3, rope_factor=4.0)):
        torch.manual_seed(21)
        cfg = tiny_cfg("SA", **over)
        model = build_model(cfg).eval()
        cp_model = build_model(cfg, cp_group=dist.group.WORLD).eval()
        cp_model.load_state_dict(model.state_dict())
        prompt = torch.randint(0, 64, (21,), generator=torch.Generator().manual_seed(5)).tolist()
        cp, one = generate(model, prompt, 5, cp_model=cp_model, cp_group=dist.group.WORLD), generate(model, prompt, 5)
        out.append((cp.cp_prefill_tokens, cp.tokens == one.tokens,
                    float((cp.first_logits - one.first_logits).abs().max())))
    return out


def test_cp_prefill_of_mla_rerope_and_mqa_equals_one_process():
    """The CP prefill records MLA's latent and ReRoPE's unrotated keys (16 of 21 prompt tokens over
    2 ranks), then decoding gives the one-process tokens and logits."""
    for per_rank in run_world(_cp_generate_heads_worker, 2, timeout=240):
        for prefilled, same_tokens, logit_err in per_rank:
            assert prefilled == 16 and same_tokens and logit_err < 1e-4
