"""Tests for lctrain.data: tokenizers, packing, MDS writing, needle prompts, CP slicing, the loader."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lctrain.data import (
    ByteTokenizer,
    DataError,
    TokenizerError,
    build_train_loader,
    check_vocab_size,
    cp_slice,
    get_tokenizer,
    needle,
)
from lctrain.data.mds import DatasetExistsError, read_meta, write_mds
from lctrain.data.packing import pack_documents, packed_epochs


def _data_cfg(**kw):
    base = dict(source="embedded", cache_dir="/nonexistent", tokenizer="byte", seq_len=16, micro_batch_size=2,
                needle_fraction=0.0, num_workers=0, seed=0)
    base.update(kw)
    return SimpleNamespace(**base)


def _random_text(rng: random.Random, n: int) -> str:
    alphabet = "abcdefghij KLMNOP.,\n\t0123456789éü漢字🙂"
    return "".join(rng.choice(alphabet) for _ in range(n))


# ---------------------------------------------------------------- tokenizers

def test_byte_tokenizer_round_trip_and_specials():
    tok = get_tokenizer(_data_cfg())
    rng = random.Random(0)
    for _ in range(20):
        text = _random_text(rng, rng.randrange(0, 200))
        ids = tok.encode(text)
        assert all(0 <= i < 256 for i in ids)
        assert tok.decode(ids) == text
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (256, 257, 258, 259)
    assert tok.decode([104, tok.eos_id, 105, tok.pad_id]) == "hi"  # specials are dropped


def test_model_vocab_must_cover_tokenizer():
    tok = ByteTokenizer()
    check_vocab_size(264, tok)
    check_vocab_size(259, tok)
    with pytest.raises(TokenizerError, match="model.vocab_size=258.*>= 259"):
        check_vocab_size(258, tok)


def test_bad_tokenizer_path_gives_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="not a file.*'byte'"):
        get_tokenizer(_data_cfg(tokenizer=str(tmp_path / "missing.json")))
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid HF tokenizer.json"):
        get_tokenizer(str(bad))


def _tiny_hf_tokenizer(path: Path, specials=("<s>", "</s>", "<pad>")) -> Path:
    import tokenizers  # the test extra declares it
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(["the", "grass", "is", "green", "sky", "blue", "magic", "number"]) for _ in range(50))
              for _ in range(50)]
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(path))
    return path


def test_hf_tokenizer_wrapper(tmp_path):
    path = _tiny_hf_tokenizer(tmp_path / "tokenizer.json")
    tok = get_tokenizer(_data_cfg(tokenizer=str(path)))
    assert tok.eos_id == 1 and tok.bos_id == 0 and tok.pad_id == 2
    assert tok.vocab_size <= 400
    rng = random.Random(1)
    for _ in range(10):
        text = _random_text(rng, 80)
        assert tok.decode(tok.encode(text)) == text
    assert get_tokenizer(str(path)).name == tok.name != "byte"  # the cache key follows the file's contents
    with pytest.raises(TokenizerError, match="no end-of-text token"):
        get_tokenizer(str(_tiny_hf_tokenizer(tmp_path / "noeos.json", specials=("<unk>",))))


# ---------------------------------------------------------------- packing

def test_packing_keeps_document_boundaries():
    rng = random.Random(0)
    eos = 257
    docs = [[rng.randrange(256) for _ in range(rng.randrange(1, 40))] for _ in range(30)]
    samples = list(pack_documents(docs, 17, eos))
    stream = [t for d in docs for t in d + [eos]]
    assert len(samples) == len(stream) // 17
    assert all(s.shape == (17,) for s in samples)
    flat = np.concatenate(samples).tolist()
    assert flat == stream[: len(flat)]
    # EOS exactly at the document ends
    ends = np.cumsum([len(d) + 1 for d in docs]) - 1
    eos_pos = [i for i, t in enumerate(flat) if t == eos]
    assert eos_pos == [int(e) for e in ends if e < len(flat)]


def test_packed_epochs_repeat_with_new_order():
    rng = random.Random(1)
    docs = [[rng.randrange(256) for _ in range(rng.randrange(5, 30))] for _ in range(20)]
    one_pass = len(list(pack_documents(docs, 9, 257)))
    samples = packed_epochs(docs, 9, 257, 3 * one_pass + 1, seed=0)
    assert len(samples) == 3 * one_pass + 1
    assert not np.array_equal(np.stack(samples[:one_pass]), np.stack(samples[one_pass:2 * one_pass]))
    with pytest.raises(ValueError, match="fewer than one sample"):
        packed_epochs([[1, 2]], 9, 257, 1, seed=0)


# ---------------------------------------------------------------- prepare / MDS

def _write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def _read_mds(path: Path) -> list[dict]:
    """Every sample of an MDS dataset, raw. Built under the construction lock, as every
    StreamingDataset in lctrain is (pytest-xdist workers build them side by side)."""
    from streaming import StreamingDataset

    from lctrain.data.streaming_lock import streaming_construction_lock

    with streaming_construction_lock():
        ds = StreamingDataset(local=str(path), remote=None, shuffle=False, batch_size=1)
    return [ds[i] for i in range(len(ds))]


def test_prepare_writes_mds_that_reads_back_identically(tmp_path):
    from lctrain.data.prepare import main

    rng = random.Random(2)
    docs = [_random_text(rng, rng.randrange(5, 60)) for _ in range(40)]
    src = _write_jsonl(tmp_path / "docs.jsonl", docs)
    out = tmp_path / "mds"
    assert main(["--out", str(out), "--input", str(src), "--seq-len", "24"]) == 0
    tok = ByteTokenizer()
    expected = list(pack_documents([tok.encode(d) for d in docs], 25, tok.eos_id))
    got = [sample["tokens"] for sample in _read_mds(out)]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.dtype == np.uint16
        np.testing.assert_array_equal(g.astype(np.int64), e)
    meta = read_meta(out)
    assert meta["sample_len"] == 25 and meta["num_samples"] == len(expected)


def test_prepare_refuses_to_overwrite(tmp_path, capsys):
    from lctrain.data.prepare import main

    src = tmp_path / "a.txt"
    src.write_text("some plain text " * 20)
    out = tmp_path / "mds"
    assert main(["--out", str(out), "--input", str(src), "--seq-len", "16"]) == 0
    before = sorted(p.name for p in out.iterdir())
    assert main(["--out", str(out), "--input", str(src), "--seq-len", "16"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == before
    assert main(["--out", str(out), "--input", str(src), "--seq-len", "8", "--overwrite"]) == 0
    assert read_meta(out)["sample_len"] == 9
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    with pytest.raises(DatasetExistsError):
        write_mds(out, [np.zeros(9, dtype=np.int64)], sample_len=9, dtype=np.uint16)


def test_prepare_errors_name_the_fix(tmp_path, capsys):
    from lctrain.data.prepare import main

    src = _write_jsonl(tmp_path / "d.jsonl", ["hello there, this is text"] * 5)
    assert main(["--out", str(tmp_path / "o"), "--input", str(src), "--text-field", "body"]) == 2
    assert "--text-field" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "o"), "--tokenizer", str(tmp_path / "nope.json")]) == 2
    assert "tokenizer.json" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "o"), "--input", str(src), "--seq-len", "4096"]) == 2
    assert "--seq-len" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_prepare_needle_fraction_mixes_retrieval_samples(tmp_path):
    from lctrain.data.prepare import main

    src = tmp_path / "a.txt"
    src.write_text("Plain words of a document. " * 200)
    out = tmp_path / "mds"
    assert main(["--out", str(out), "--input", str(src), "--seq-len", "127", "--needle-fraction", "0.5", "--seed",
                 "3"]) == 0
    tok = ByteTokenizer()
    samples = _read_mds(out)
    texts = [tok.decode(sample["tokens"].tolist()) for sample in samples]
    with_needle = [t for t in texts if "The pass key is:" in t]
    assert len(texts) % 2 == 0 and len(with_needle) == len(texts) // 2  # one needle sample per text sample
    assert all("pass key" not in t and "words of a" in t for t in texts if t not in with_needle)
    for t in with_needle:  # the answer closes the sample and is the number hidden earlier
        value = t.rsplit("The pass key is:", 1)[1].strip()
        assert value.isdigit() and len(value) == needle.NEEDLE_DIGITS
        assert f"The pass key is {value}." in t
    # the answer_mask column marks exactly the answers: " " + digits after each question
    for sample in samples:
        tokens, mask = sample["tokens"].tolist(), sample["answer_mask"].astype(bool)
        text = tok.decode(tokens)
        marked = tok.decode([t for t, m in zip(tokens, mask) if m])
        answers = re.findall(r"The pass key is:( \d+)", text)
        assert marked == "".join(answers) and (bool(answers) == (text in with_needle))


# ---------------------------------------------------------------- needles

@pytest.mark.parametrize("task", needle.TASKS)
def test_needle_depth_length_and_answer(task):
    tok = ByteTokenizer()
    rng = random.Random(5)
    for target in (600, 1000):
        for depth in (0.0, 0.1, 0.37, 0.5, 0.9, 1.0):
            s = needle.build_needle_sample(task, tok, target, depth, rng)
            assert len(s.prompt_ids) == target
            assert tok.encode(s.prompt) == s.prompt_ids
            # the needle sits where it says, at the requested depth (within a word / sentence step)
            span = tok.decode(s.prompt_ids[s.needle_start:s.needle_start + s.needle_tokens])
            assert span == f" One of the special magic {needle.value_type(task)} for {s.keys[0]} is: {s.answers[0]}."
            assert abs(s.measured_depth - depth) <= 0.03, (depth, s.measured_depth)
            assert s.prompt.count(s.answers[0]) == 1
            assert s.prompt.endswith(needle.question_text(task, s.keys[0]))
            if task == "s_niah_3":
                assert len(s.answers[0]) == 36 and s.answers[0].count("-") == 4
            else:
                assert s.answers[0].isdigit() and len(s.answers[0]) == needle.NEEDLE_DIGITS


def test_needle_position_prefers_a_near_sentence_end():
    bounds, ends = [0, 10, 20, 30, 40], [True, False, True, False, True]
    assert needle.needle_position(bounds, ends, 12, slack=10) == 2  # sentence end 20 within 10 of 12
    assert needle.needle_position(bounds, ends, 12, slack=5) == 1  # too far: the nearest word boundary
    assert needle.needle_position(bounds, ends, 15, slack=0) == 1  # a tie goes to the earlier boundary
    assert needle.needle_position(bounds, [False] * 5, 38, slack=3) == 4  # the end counts as a sentence end


def test_packed_needle_sample_holds_several_complete_units():
    tok = ByteTokenizer()
    rng = random.Random(1)
    n_units = 0
    for _ in range(20):
        ids, mask = needle.packed_needle_sample(tok, 513, rng, with_answer_mask=True)
        assert len(ids) == len(mask) == 513 and ids[-1] != tok.eos_id
        units = _split(list(zip(ids, mask)), (tok.eos_id, 0))
        n_units += len(units)
        for unit in units:
            text = tok.decode([t for t, _ in unit])
            head, value = text.rsplit(":", 1)
            value = value.strip()  # every passkey unit ends with its own answer, hidden earlier in that unit
            assert value.isdigit() and len(value) == needle.NEEDLE_DIGITS
            assert f"is {value}." in head or f"is: {value}." in head
            assert tok.decode([t for t, m in unit if m]) == " " + value  # the mask marks exactly the answer
    assert n_units >= 40  # several units per sample
    with pytest.raises(ValueError, match="too short"):
        needle.packed_needle_sample(tok, 20, rng)


def _split(ids, sep):
    out, cur = [], []
    for t in ids:
        if t == sep:
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    return out + [cur]


def test_embedded_needle_mix_takes_digits_and_packed_share_as_arguments():
    """Probes vary the mix through arguments; the module's defaults (the embedded dataset's) stay."""
    from lctrain.data import embedded

    tok = ByteTokenizer()
    samples, masks = embedded.build_embedded_samples(tok, 383, 6, 1.0, 0, digits=5, packed_share=0.0)
    for ids, mask in zip(samples, masks):
        assert tok.eos_id not in ids.tolist()  # packed_share 0: one needle over the whole sample
        answer = tok.decode(ids[mask.astype(bool)].tolist())
        assert answer.startswith(" ") and answer[1:].isdigit() and len(answer) == 1 + 5
    assert embedded.PACKED_NEEDLE_SHARE == 0.8 and embedded.NEEDLE_DIGITS == 7  # untouched


def test_training_needle_sample_ends_with_answer():
    tok = ByteTokenizer()
    rng = random.Random(0)
    for length in (needle.min_training_length(tok), 100, 513):
        ids = needle.training_needle_sample(tok, length, rng)
        assert len(ids) == length
        text = tok.decode(ids)
        head, value = text.rsplit(":", 1)
        value = value.strip()
        assert value.isdigit() and len(value) == needle.NEEDLE_DIGITS and text.endswith(value)
        assert value in head
    with pytest.raises(ValueError, match="too short"):
        needle.build_needle_sample("s_niah_1", tok, 50, 0.5, rng)
    with pytest.raises(ValueError, match="depth"):
        needle.build_needle_sample("s_niah_1", tok, 500, 1.5, rng)
    with pytest.raises(ValueError, match="unknown needle task"):
        needle.build_needle_sample("s_niah_9", tok, 500, 0.5, rng)


# ---------------------------------------------------------------- CP slicing and the loader

@pytest.mark.parametrize("cp_size", [1, 2, 4])
def test_cp_slices_concatenate_to_the_sample_with_global_shift(cp_size):
    tokens = np.random.default_rng(cp_size).integers(0, 259, size=(3, 33)).astype(np.uint16)
    parts = [cp_slice(tokens, r, cp_size) for r in range(cp_size)]
    inputs = torch.cat([p[0] for p in parts], dim=-1)
    labels = torch.cat([p[1] for p in parts], dim=-1)
    full = torch.from_numpy(tokens.astype(np.int64))
    assert inputs.dtype == torch.long and inputs.shape == (3, 32)
    assert torch.equal(inputs, full[:, :-1]) and torch.equal(labels, full[:, 1:])
    for r, (_, y) in enumerate(parts):  # each rank's last label is the next rank's first input
        if r + 1 < cp_size:
            assert torch.equal(y[:, -1], parts[r + 1][0][:, 0])
    with pytest.raises(DataError, match="multiple of cp"):
        cp_slice(tokens[:, :32], 0, 3)


def _small_dataset(tmp_path: Path, n: int = 10, sample_len: int = 17) -> tuple[Path, np.ndarray]:
    data = np.random.default_rng(0).integers(0, 259, size=(n, sample_len))
    path = write_mds(tmp_path / f"ds{n}", list(data), sample_len=sample_len, dtype=np.uint16)
    return path, data


def _rows_of(batch, data):
    """Index of every batch row in the dataset (row = cat(input_ids, last label))."""
    full = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1).numpy()
    return [int(np.where((data == r).all(axis=1))[0][0]) for r in full]


def test_loader_cp_ranks_read_the_same_samples(tmp_path):
    path, data = _small_dataset(tmp_path)
    cfg = _data_cfg(source=str(path), seq_len=16, micro_batch_size=2)
    loaders = [iter(build_train_loader(cfg, dp_rank=0, dp_size=1, cp_rank=r, cp_size=2)) for r in range(2)]
    for _ in range(7):  # past the end of an epoch (5 batches)
        b0, b1 = next(loaders[0]), next(loaders[1])
        assert b0["input_ids"].shape == (2, 8) and b0["labels"].dtype == torch.long
        inputs = torch.cat([b0["input_ids"], b1["input_ids"]], dim=1)
        labels = torch.cat([b0["labels"], b1["labels"]], dim=1)
        rows = torch.from_numpy(data[_rows_of({"input_ids": inputs, "labels": labels}, data)])
        assert torch.equal(inputs, rows[:, :-1]) and torch.equal(labels, rows[:, 1:])


def test_loader_slices_the_answer_mask_like_the_labels(tmp_path):
    data = np.random.default_rng(1).integers(0, 259, size=(6, 17))
    masks = (data % 3 == 0).astype(np.uint8)
    path = write_mds(tmp_path / "masked", list(data), answer_masks=list(masks), sample_len=17, dtype=np.uint16)
    cfg = _data_cfg(source=str(path), seq_len=16, micro_batch_size=2)
    loaders = [iter(build_train_loader(cfg, dp_rank=0, dp_size=1, cp_rank=r, cp_size=2)) for r in range(2)]
    for _ in range(3):
        b0, b1 = next(loaders[0]), next(loaders[1])
        labels = torch.cat([b0["labels"], b1["labels"]], dim=1)
        mask = torch.cat([b0["answer_mask"], b1["answer_mask"]], dim=1)
        assert b0["answer_mask"].shape == b0["labels"].shape
        assert torch.equal(mask.bool(), labels % 3 == 0)  # the mask of each label token, global shift included
    unmasked, _ = _small_dataset(tmp_path)
    batch = next(iter(build_train_loader(_data_cfg(source=str(unmasked), seq_len=16, micro_batch_size=2),
                                         dp_rank=0, dp_size=1, cp_rank=0, cp_size=1)))
    assert "answer_mask" not in batch
    with pytest.raises(ValueError, match="answer mask 0 has shape"):
        write_mds(tmp_path / "bad", list(data), answer_masks=[np.zeros(5)], sample_len=17, dtype=np.uint16)


def test_loader_hands_the_global_document_bounds_to_the_model(tmp_path):
    """With document_end_id the loader gives each CP rank the WHOLE sample's boundaries (no scan and
    no all-gather in the model); the model given them computes what it computes finding them itself."""
    from lctrain.config import default_config
    from lctrain.models import build_model

    data = np.random.default_rng(2).integers(0, 60, size=(4, 17))
    data[:, [2, 7, 8]] = 63  # ends: a one-token document at 8, one crossing the CP shard edge at 8
    data[0, 15] = 63         # the last input token: no boundary inside beyond T
    path = write_mds(tmp_path / "docs", list(data), sample_len=17, dtype=np.uint16)
    cfg = _data_cfg(source=str(path), seq_len=16, micro_batch_size=2)
    loaders = [iter(build_train_loader(cfg, dp_rank=0, dp_size=1, cp_rank=r, cp_size=2, document_end_id=63))
               for r in range(2)]
    b0, b1 = next(loaders[0]), next(loaders[1])
    assert b0["doc_bounds"] == b1["doc_bounds"] == [[0, 3, 8, 9, 16]] * 2
    m = default_config().model
    m.vocab_size, m.d_model, m.n_heads, m.head_dim, m.attn_heads, m.attn_head_dim = 64, 16, 2, 8, 2, 8
    m.layer_pattern, m.kernel_backend, m.chunk_size, m.document_end_id, m.window = "GSA", "torch", 8, 63, 4
    model = build_model(m).eval()
    ids = torch.cat([b0["input_ids"], b1["input_ids"]], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, doc_bounds=b0["doc_bounds"]), model(ids))
    with pytest.raises(ValueError, match="doc_bounds row 0 must run strictly increasing"):
        model(ids, doc_bounds=[[0, 5], [0, 16]])


def test_loader_state_dict_resume_gives_the_same_next_batch(tmp_path):
    path, data = _small_dataset(tmp_path, n=10)
    cfg = _data_cfg(source=str(path), seq_len=16, micro_batch_size=3)
    for consumed in (2, 4):  # within the first epoch (3 batches) and into the second
        loader = build_train_loader(cfg, dp_rank=0, dp_size=1, cp_rank=0, cp_size=1)
        it = iter(loader)
        for _ in range(consumed):
            next(it)
        state = loader.state_dict()
        expected = next(it)
        resumed = build_train_loader(cfg, dp_rank=0, dp_size=1, cp_rank=0, cp_size=1)
        resumed.load_state_dict(state)
        got = next(iter(resumed))
        assert torch.equal(got["input_ids"], expected["input_ids"]) and torch.equal(got["labels"], expected["labels"])


def test_loader_errors_name_the_fix(tmp_path):
    path, _ = _small_dataset(tmp_path)
    with pytest.raises(DataError, match="set data.seq_len=16"):
        build_train_loader(_data_cfg(source=str(path), seq_len=32), dp_rank=0, dp_size=1, cp_rank=0, cp_size=1)
    with pytest.raises(DataError, match="lctrain data prepare"):
        build_train_loader(_data_cfg(source=str(tmp_path / "none")), dp_rank=0, dp_size=1, cp_rank=0, cp_size=1)
    with pytest.raises(DataError, match="data.tokenizer"):
        prepared = write_mds(tmp_path / "hf", [np.zeros(17, dtype=np.int64)] * 4, sample_len=17, dtype=np.uint16,
                             meta={"tokenizer": "hf-0123456789abcdef"})
        build_train_loader(_data_cfg(source=str(prepared)), dp_rank=0, dp_size=1, cp_rank=0, cp_size=1)
    with pytest.raises(DataError, match="fewer than one global batch"):
        build_train_loader(_data_cfg(source=str(path), micro_batch_size=11), dp_rank=0, dp_size=1, cp_rank=0, cp_size=1)


def test_embedded_dataset_is_built_once_and_reused(tmp_path):
    from lctrain.data.embedded import embedded_dataset_path, ensure_embedded_dataset

    cfg = _data_cfg(cache_dir=str(tmp_path), seq_len=300, needle_fraction=0.5, seed=1)
    waiter = _data_cfg(cache_dir=str(tmp_path), seq_len=300, needle_fraction=0.5, seed=2)
    with pytest.raises(TimeoutError, match="LOCAL_RANK 0"):
        ensure_embedded_dataset(waiter, num_samples=40, builder=False, timeout_s=0.5)
    failed = embedded_dataset_path(waiter, 40).with_name(embedded_dataset_path(waiter, 40).name + ".failed")
    failed.write_text("ValueError: boom")
    with pytest.raises(RuntimeError, match="failed on the builder rank: ValueError: boom"):
        ensure_embedded_dataset(waiter, num_samples=40, builder=False, timeout_s=5)
    path = ensure_embedded_dataset(cfg, num_samples=40, builder=True)
    assert path == embedded_dataset_path(cfg, 40) and path.parent == tmp_path
    stamp = (path / "index.json").stat().st_mtime_ns
    assert ensure_embedded_dataset(cfg, num_samples=40, builder=False, timeout_s=0.5) == path
    assert (path / "index.json").stat().st_mtime_ns == stamp
    assert ensure_embedded_dataset(_data_cfg(cache_dir=str(tmp_path), seq_len=300, needle_fraction=0.25, seed=1),
                                   num_samples=40) != path
    meta = read_meta(path)
    assert meta["num_samples"] == 40 and meta["sample_len"] == 301 and meta["tokenizer"] == "byte"
    texts = [ByteTokenizer().decode(sample["tokens"].tolist()) for sample in _read_mds(path)]
    n_needle = sum("pass key is:" in t or "mentioned in the provided text is:" in t for t in texts)
    assert n_needle == 20


def _world_worker(rank, world_size, path, seq_len, other_paths):
    cfg = _data_cfg(source=path, seq_len=seq_len, micro_batch_size=2)
    out = {}
    # dp=1, cp=2: both ranks read the same samples; dp=2, cp=1: different ones
    for name, dp_size, cp_size in (("cp", 1, 2), ("dp", 2, 1)):
        dp_rank = rank // (world_size // dp_size)
        loader = build_train_loader(cfg, dp_rank=dp_rank, dp_size=dp_size, cp_rank=rank % cp_size, cp_size=cp_size,
                                    global_rank=rank, world_size=world_size)
        it = iter(loader)
        out[name] = [next(it) for _ in range(2)]
        del it, loader
    # ranks that would read different datasets are stopped with a clear error
    try:
        build_train_loader(_data_cfg(source=other_paths[rank], seq_len=seq_len, micro_batch_size=2), dp_rank=rank,
                           dp_size=2,
                           cp_rank=0, cp_size=1, global_rank=rank, world_size=world_size)
        out["mismatch"] = "no error"
    except DataError as err:
        out["mismatch"] = str(err)
    return out


def test_loader_replication_over_two_processes(tmp_path):
    from dist_utils import run_world

    path, data = _small_dataset(tmp_path, n=16)
    others = [str(_small_dataset(tmp_path, n=n)[0]) for n in (8, 12)]
    res = run_world(_world_worker, 2, str(path), 16, others, timeout=120)
    assert all("ranks read different datasets" in r["mismatch"] for r in res), [r["mismatch"] for r in res]
    for b0, b1 in zip(res[0]["cp"], res[1]["cp"]):
        full = {"input_ids": torch.cat([b0["input_ids"], b1["input_ids"]], 1),
                "labels": torch.cat([b0["labels"], b1["labels"]], 1)}
        rows = torch.from_numpy(data[_rows_of(full, data)])
        assert torch.equal(full["input_ids"], rows[:, :-1]) and torch.equal(full["labels"], rows[:, 1:])
    seen = [set(_rows_of(b, data)) for b in res[0]["dp"]] + [set(_rows_of(b, data)) for b in res[1]["dp"]]
    rows0 = set().union(*seen[:2])
    rows1 = set().union(*seen[2:])
    assert not rows0 & rows1 and len(rows0) == len(rows1) == 4
