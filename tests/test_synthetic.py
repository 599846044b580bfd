"""Synthetic tasks (lctrain/data/synthetic.py), their config keys and the task eval (`lctrain repro`:
tests/test_repro.py).

The generators' answers are checked against checkers that re-derive them from the token sequence by
simulating the task (a lookup table, replayed swaps, a graph search), not from the generator's state.
"""

import numpy as np
import pytest
import torch

from lctrain.config import ConfigError, load_config
from lctrain.data.synthetic import (
    NO,
    PAD,
    SWAP,
    YES,
    TaskError,
    check_dag,
    check_mqar,
    check_swap,
    dag_sample,
    mqar_sample,
    swap_sample,
    task_samples,
)


def _assert_consistent(sample, positions, answers, length):
    assert sample.ids.shape == (length,) and sample.answer_mask.shape == (length,)
    assert np.flatnonzero(sample.answer_mask).tolist() == positions
    assert sample.ids[positions].tolist() == answers == sample.answers


@pytest.mark.parametrize("length,pairs,queries,vocab",
                         [(64, 8, None, 256), (37, 8, 3, 64), (512, 124, 124, 256), (20, 5, 5, 32)])
def test_mqar_answers_match_checker(length, pairs, queries, vocab):
    rng = np.random.default_rng(length)
    for _ in range(20):
        s = mqar_sample(rng, length=length, num_pairs=pairs, num_queries=queries, vocab_size=vocab)
        positions, answers = check_mqar(s.ids, pairs, vocab)
        _assert_consistent(s, positions, answers, length)
        assert len(answers) == (queries or pairs)
        assert s.ids.max() < vocab


@pytest.mark.parametrize("length,n,queries", [(40, 5, 2), (41, 5, 1), (300, 16, 4), (11, 2, 1)])
def test_swap_answers_match_checker(length, n, queries):
    rng = np.random.default_rng(n)
    for _ in range(20):
        s = swap_sample(rng, length=length, num_elements=n, num_queries=queries, vocab_size=64)
        positions, answers = check_swap(s.ids, n)
        _assert_consistent(s, positions, answers, length)


def _num_swaps(ids):
    return int((np.asarray(ids) == SWAP).sum())


def test_swap_min_swaps_mixes_difficulties():
    """min_swaps (training only): swaps drawn uniformly from min_swaps..as many as fit, PAD in front,
    the queries where they always are; every answer still re-derived by the checker."""
    length, n, q = 40, 5, 2  # 40 - 5 - 3 * 2 = 29: 9 swaps fit, 2 PAD
    full = swap_sample(np.random.default_rng(0), length=length, num_elements=n, num_queries=q, vocab_size=64)
    assert _num_swaps(full.ids) == 9
    rng = np.random.default_rng(1)
    counts = set()
    for _ in range(200):
        s = swap_sample(rng, length=length, num_elements=n, num_queries=q, vocab_size=64, min_swaps=3)
        positions, answers = check_swap(s.ids, n)
        _assert_consistent(s, positions, answers, length)
        assert np.array_equal(s.answer_mask, full.answer_mask)  # the queries stay at the end
        k = _num_swaps(s.ids)
        counts.add(k)
        assert (s.ids[:length - n - 3 * q - 3 * k] == PAD).all()  # the unused room is PAD in front
    assert counts == set(range(3, 10))  # every count from min_swaps to the most that fit


def test_swap_min_swaps_zero_is_the_task_as_defined():
    """min_swaps=0 draws nothing extra: the same stream as without the knob (what the eval scores),
    and min_swaps = as many as fit gives those same samples too."""
    kw = dict(length=33, num_elements=5, num_queries=5, vocab_size=32)
    for m in (0, 4):
        a = [swap_sample(np.random.default_rng(7), **kw, min_swaps=m) for _ in range(3)]
        b = [swap_sample(np.random.default_rng(7), **kw) for _ in range(3)]
        if m == 0:
            assert all(np.array_equal(x.ids, y.ids) for x, y in zip(a, b))
        assert all(_num_swaps(x.ids) == 4 for x in a)


def test_swap_min_swaps_reproducible_per_seed():
    kw = dict(count=6, length=40, vocab_size=32, num_elements=5, num_queries=5, min_swaps=1)
    a, b = task_samples("swap", seed=3, **kw), task_samples("swap", seed=3, **kw)
    c = task_samples("swap", seed=4, **kw)
    assert all(np.array_equal(x.ids, y.ids) and np.array_equal(x.answer_mask, y.answer_mask) for x, y in zip(a, b))
    assert not all(np.array_equal(x.ids, y.ids) for x, y in zip(a, c))


def test_swap_max_swaps_caps_the_draw():
    rng = np.random.default_rng(2)
    kw = dict(length=40, num_elements=5, num_queries=2, vocab_size=64)
    counts = {_num_swaps(swap_sample(rng, **kw, min_swaps=2, max_swaps=4).ids) for _ in range(100)}
    assert counts == {2, 3, 4}
    assert {_num_swaps(swap_sample(rng, **kw, max_swaps=2).ids) for _ in range(50)} == {1, 2}  # min_swaps 0 = 1


def test_swap_curriculum_raises_the_cap_in_sample_order():
    """curriculum_samples N: sample i holds at most swap_curriculum_cap(i, N, most) swaps, from 1 for the
    first N/most samples up to all that fit from sample N on; every answer re-derived; reproducible."""
    from lctrain.data.synthetic import swap_curriculum_cap

    assert [swap_curriculum_cap(i, 8, 4) for i in range(10)] == [1, 1, 2, 2, 3, 3, 4, 4, 4, 4]
    kw = dict(count=400, length=33, seed=5, vocab_size=32, num_elements=5, num_queries=5, curriculum_samples=200)
    samples = task_samples("swap", **kw)
    counts = [_num_swaps(s.ids) for s in samples]
    for i, (s, k) in enumerate(zip(samples, counts)):
        positions, answers = check_swap(s.ids, 5)
        _assert_consistent(s, positions, answers, 33)
        assert 1 <= k <= swap_curriculum_cap(i, 200, 4)
    assert set(counts[:50]) == {1} and set(counts[200:]) == {1, 2, 3, 4}
    assert all(np.array_equal(a.ids, b.ids) for a, b in zip(samples, task_samples("swap", **kw)))
    capped = task_samples("swap", **dict(kw, max_swaps=2, min_swaps=2))
    assert {_num_swaps(s.ids) for s in capped[100:]} == {2} and {_num_swaps(s.ids) for s in capped[:100]} == {1}
    with pytest.raises(TaskError, match="curriculum_samples is a knob of the swap task"):
        task_samples("mqar", count=2, length=64, seed=0, vocab_size=256, num_pairs=8, curriculum_samples=2)
    with pytest.raises(TaskError, match="max_swaps"):
        task_samples("swap", **dict(kw, max_swaps=5))


def test_swap_checker_sees_a_wrong_answer():
    s = swap_sample(np.random.default_rng(0), length=60, num_elements=6, num_queries=3)
    pos = int(np.flatnonzero(s.answer_mask)[0])
    bad = s.ids.copy()
    bad[pos] = 8 + 6 + (bad[pos] - 8 - 6 + 1) % 6  # another position token
    _, answers = check_swap(bad, 6)
    assert bad[np.flatnonzero(s.answer_mask)].tolist() != answers


@pytest.mark.parametrize("length,nodes,queries", [(60, 6, 3), (200, 10, 8), (9, 2, 1)])
def test_dag_answers_match_checker(length, nodes, queries):
    rng = np.random.default_rng(nodes)
    seen = set()
    for _ in range(30):
        s = dag_sample(rng, length=length, num_nodes=nodes, num_queries=queries)
        positions, answers = check_dag(s.ids)
        _assert_consistent(s, positions, answers, length)
        seen.update(answers)
    if nodes > 2:
        assert seen == {YES, NO}  # both answers occur


def test_samples_reproducible_per_seed():
    a = task_samples("mqar", count=4, length=64, seed=3, vocab_size=256, num_pairs=8)
    b = task_samples("mqar", count=4, length=64, seed=3, vocab_size=256, num_pairs=8)
    c = task_samples("mqar", count=4, length=64, seed=4, vocab_size=256, num_pairs=8)
    assert all(np.array_equal(x.ids, y.ids) and np.array_equal(x.answer_mask, y.answer_mask) for x, y in zip(a, b))
    assert not all(np.array_equal(x.ids, y.ids) for x, y in zip(a, c))


@pytest.mark.parametrize("make,kwargs,words", [
    (mqar_sample, dict(length=512, num_pairs=200, vocab_size=256), "vocab_size"),
    (mqar_sample, dict(length=30, num_pairs=8, vocab_size=256), "length 30"),
    (mqar_sample, dict(length=64, num_pairs=8, num_queries=9, vocab_size=256), "num_queries"),
    (swap_sample, dict(length=10, num_elements=5, vocab_size=256), "length 10"),
    (swap_sample, dict(length=100, num_elements=200, vocab_size=256), "vocab_size"),
    (swap_sample, dict(length=33, num_elements=5, num_queries=5, vocab_size=32, min_swaps=5), "min_swaps"),
    (swap_sample, dict(length=33, num_elements=5, vocab_size=32, min_swaps=-1), "min_swaps"),
    (dag_sample, dict(length=6, num_nodes=4, vocab_size=256), "length 6"),
    (dag_sample, dict(length=100, num_nodes=300, vocab_size=256), "vocab_size"),
])
def test_impossible_knobs_are_refused(make, kwargs, words):
    with pytest.raises(TaskError, match=words):
        make(np.random.default_rng(0), **kwargs)
    with pytest.raises(TaskError, match="unknown task"):
        task_samples("sort", count=1, length=8, seed=0, vocab_size=64)


SYN = ["data.source=synthetic:mqar", "model.document_end_id=null"]
SWAP_CFG = ["data.source=synthetic:swap", "model.document_end_id=null", "data.task.num_elements=5",
            "data.task.num_queries=5", "data.seq_len=32"]


@pytest.mark.parametrize("overrides,key", [
    (SYN, "data.task.num_pairs"),  # required knob missing
    (["data.task.num_pairs=4"], "data.task.num_pairs"),  # knob without a synthetic source
    (SYN + ["data.task.num_pairs=4", "data.task.num_nodes=3"], "data.task.num_nodes"),  # another task's knob
    (SYN + ["data.task.num_pairs=300"], "data.task"),  # cannot be built
    (SYN + ["data.task.num_pairs=4", "data.task.vocab_size=512"], "data.task.vocab_size"),  # > model.vocab_size
    (["data.source=synthetic:mqar", "data.task.num_pairs=4", "model.document_end_id=7"], "model.document_end_id"),
    (["data.source=synthetic:sort"], "data.source"),
    (SYN + ["data.task.num_pairs=4", "data.task.min_swaps=1"], "data.task.min_swaps"),  # swap's knob on mqar
    (["data.task.min_swaps=1"], "data.task.min_swaps"),  # without a synthetic source
    (SWAP_CFG + ["data.task.min_swaps=-1"], "data.task.min_swaps"),
    (SWAP_CFG + ["data.task.min_swaps=5"], "data.task"),  # 32 tokens hold 4 swaps after 5 queries
    (SWAP_CFG + ["data.task.min_swaps=3", "data.task.max_swaps=2"], "data.task"),
    (SWAP_CFG + ["data.task.max_swaps=5"], "data.task"),
    (SYN + ["data.task.num_pairs=4", "data.task.curriculum_samples=8"], "data.task.curriculum_samples"),
    (SWAP_CFG + ["data.task.curriculum_samples=-1"], "data.task.curriculum_samples"),
    (SWAP_CFG + ["data.task.curriculum_samples=30000"], "data.task.curriculum_samples"),  # > 20000 held
    (SWAP_CFG + ["data.task.curriculum_samples=100", "data.task.num_samples=200", "train.steps=100"],
     "data.task.num_samples"),  # 100 steps x 8 samples read: the curriculum would start over
])
def test_task_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_task_dataset_holds_the_samples(tmp_path):
    from streaming import LocalDataset

    from lctrain.data.mds import read_meta
    from lctrain.data.task_dataset import ensure_task_dataset

    cfg = load_config(None, SYN + ["data.task.num_pairs=4", "data.task.num_samples=6", "data.seq_len=31",
                                   f"data.cache_dir={tmp_path}"])
    path = ensure_task_dataset(cfg.data)
    assert ensure_task_dataset(cfg.data) == path  # cached
    assert read_meta(path)["source"] == "synthetic:mqar"
    ds = LocalDataset(str(path))
    assert len(ds) == 6
    for i in range(6):
        ids, mask = ds[i]["tokens"].astype(np.int64), ds[i]["answer_mask"]
        positions, answers = check_mqar(ids, 4, 256)
        assert len(ids) == 32 and np.flatnonzero(mask).tolist() == positions and ids[positions].tolist() == answers


def test_min_swaps_trains_on_the_mixture_and_the_eval_scores_the_task(tmp_path):
    """data.task.min_swaps reaches the training dataset (mixed swap counts, every answer re-derived),
    while `lctrain eval task` builds its samples without it: the task as defined, every sample full."""
    import argparse

    from streaming import LocalDataset

    from lctrain.data.task_dataset import ensure_task_dataset, eval_samples, task_settings
    from lctrain.eval.task import task_from

    base = SWAP_CFG + ["data.task.num_samples=40", "data.task.vocab_size=32", f"data.cache_dir={tmp_path}"]
    cfg = load_config(None, base + ["data.task.min_swaps=1"])
    plain = load_config(None, base)
    assert task_settings(cfg.data)["knobs"]["min_swaps"] == 1 and "min_swaps" not in task_settings(plain.data)["knobs"]
    ds = LocalDataset(str(ensure_task_dataset(cfg.data)))
    counts = set()
    for i in range(len(ds)):
        ids, mask = ds[i]["tokens"].astype(np.int64), ds[i]["answer_mask"]
        positions, answers = check_swap(ids, 5)
        assert len(ids) == 33 and np.flatnonzero(mask).tolist() == positions and ids[positions].tolist() == answers
        counts.add(_num_swaps(ids))
    assert counts == {1, 2, 3, 4}
    ns = argparse.Namespace(task=None, length=None, **{k: None for k in ("num_pairs", "num_queries", "num_elements",
                                                                         "num_nodes")})
    name, knobs, length = task_from(cfg, ns)
    assert (name, length) == ("swap", 32) and "min_swaps" not in knobs
    assert all(_num_swaps(s.ids) == 4 for s in eval_samples(name, knobs, length=33, count=20, seed=0))


def test_curriculum_dataset_is_read_in_its_stored_order(tmp_path):
    """A curriculum dataset is marked ordered and the train loader hands its samples over in the stored
    order (no shuffle), so the cap on the swaps rises with the step."""
    import itertools

    from lctrain.data.loader import build_train_loader
    from lctrain.data.mds import read_meta
    from lctrain.data.task_dataset import ensure_task_dataset

    cfg = load_config(None, SWAP_CFG + ["data.task.vocab_size=32", "data.task.num_samples=64",
                                        "data.task.curriculum_samples=48", "data.micro_batch_size=4",
                                        "train.steps=16", f"data.cache_dir={tmp_path}"])
    assert read_meta(ensure_task_dataset(cfg.data))["ordered"] is True
    loader = build_train_loader(cfg.data, dp_rank=0, dp_size=1, cp_rank=0, cp_size=1)
    got = np.concatenate([b["input_ids"].numpy() for b in itertools.islice(iter(loader), 16)])
    ref = task_samples("swap", count=64, length=33, seed=0, vocab_size=32, num_elements=5, num_queries=5,
                       curriculum_samples=48)
    assert np.array_equal(got, np.stack([s.ids[:-1] for s in ref]))


class _Oracle(torch.nn.Module):
    """Predicts each sample's true next token (looked up by its first tokens), or a fixed wrong one."""

    def __init__(self, samples, vocab, right=True):
        super().__init__()
        self.by_prefix = {tuple(s.ids[:8].tolist()): s.ids for s in samples}
        self.vocab, self.right = vocab, right

    def forward(self, ids):
        out = torch.zeros(*ids.shape, self.vocab)
        for b, row in enumerate(ids):
            nxt = (torch.as_tensor(self.by_prefix[tuple(row[:8].tolist())][1:]) if self.right
                   else torch.zeros(ids.shape[1], dtype=torch.long))
            out[b, torch.arange(ids.shape[1]), nxt] = 1.0
        return out


def test_task_accuracy_scores_answers_only():
    from lctrain.eval.task import task_accuracy

    samples = task_samples("swap", count=5, length=40, seed=0, vocab_size=64, num_elements=5, num_queries=2)
    good = task_accuracy(_Oracle(samples, 64), samples, device=torch.device("cpu"), batch_size=2)
    bad = task_accuracy(_Oracle(samples, 64, right=False), samples, device=torch.device("cpu"), batch_size=2)
    assert good == {"correct": 10, "total": 10, "accuracy": 1.0}
    assert bad["total"] == 10 and bad["correct"] == 0
