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
    (dag_sample, dict(length=6, num_nodes=4, vocab_size=256), "length 6"),
    (dag_sample, dict(length=100, num_nodes=300, vocab_size=256), "vocab_size"),
])
def test_impossible_knobs_are_refused(make, kwargs, words):
    with pytest.raises(TaskError, match=words):
        make(np.random.default_rng(0), **kwargs)
    with pytest.raises(TaskError, match="unknown task"):
        task_samples("sort", count=1, length=8, seed=0, vocab_size=64)


SYN = ["data.source=synthetic:mqar", "model.document_end_id=null"]


@pytest.mark.parametrize("overrides,key", [
    (SYN, "data.task.num_pairs"),  # required knob missing
    (["data.task.num_pairs=4"], "data.task.num_pairs"),  # knob without a synthetic source
    (SYN + ["data.task.num_pairs=4", "data.task.num_nodes=3"], "data.task.num_nodes"),  # another task's knob
    (SYN + ["data.task.num_pairs=300"], "data.task"),  # cannot be built
    (SYN + ["data.task.num_pairs=4", "data.task.vocab_size=512"], "data.task.vocab_size"),  # > model.vocab_size
    (["data.source=synthetic:mqar", "data.task.num_pairs=4", "model.document_end_id=7"], "model.document_end_id"),
    (["data.source=synthetic:sort"], "data.source"),
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
