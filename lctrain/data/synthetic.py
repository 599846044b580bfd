"""Synthetic algorithmic tasks for small-model reproductions: MQAR, swap tracking, DAG reachability.

Every generator takes a `numpy.random.Generator` and returns a `TaskSample`: exactly `length` token
ids, a 0/1 `answer_mask` that is 1 where a token is an answer (aligned with `ids`, like the needle
samples' mask: training weights these tokens via train.answer_loss_weight, the eval scores them), and
the answers themselves. Each task also has a checker (`check_*`) that re-derives the answers from the
token sequence alone, by simulating the task, so that tests do not trust the generator's internals.

Token ids are small integers, independent of any text tokenizer (all < `vocab_size`, which must not
exceed model.vocab_size). Ids 0..SPECIALS-1 are reserved: PAD fills unused room, QUERY/SWAP/EDGE
mark the parts of a sample, YES/NO answer reachability queries.

- MQAR (multi-query associative recall): key-value pairs `k1 v1 ... kN vN`, then queries: the keys
  again (a random subset, in random order, at random places in the rest of the sample, PAD between),
  each followed by its value, which is the answer. Keys come from the lower half of the item ids and
  are distinct within a sample, values from the upper half.
- Swap tracking: n elements start in a random arrangement over n positions (`e_0 ... e_{n-1}`: the
  element at position p); then swaps `SWAP i j` exchange the elements at positions i and j; then
  queries `QUERY x p`: element x is at position p after all swaps (p is the answer).
- DAG reachability: a random DAG on n nodes (random topological order), its edges `EDGE u v` in a
  random order; then queries `QUERY u v YES|NO`: is v reachable from u along edges (half reachable
  when possible).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PAD, QUERY, SWAP, EDGE, YES, NO = 0, 1, 2, 3, 4, 5
SPECIALS = 8  # ids below this are markers; task items start here


class TaskError(ValueError):
    """The task's knobs are impossible together (e.g. more pairs than the length or the vocabulary holds)."""


@dataclass
class TaskSample:
    ids: np.ndarray  # int64 [length]
    answer_mask: np.ndarray  # uint8 [length], 1 on answer tokens
    answers: list = field(default_factory=list)  # the answer token ids, in order of position


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise TaskError(message)


# ---------------------------------------------------------------- MQAR

def mqar_ranges(vocab_size: int) -> tuple[range, range]:
    """(key ids, value ids) of MQAR for a vocabulary of `vocab_size`."""
    items = vocab_size - SPECIALS
    half = items // 2
    return range(SPECIALS, SPECIALS + half), range(SPECIALS + half, vocab_size)


def mqar_sample(rng: np.random.Generator, *, length: int, num_pairs: int, num_queries: int | None = None,
                vocab_size: int = 256) -> TaskSample:
    """One MQAR sample of exactly `length` ids with `num_pairs` key-value pairs and `num_queries`
    queries (default: every key once)."""
    q = num_pairs if num_queries is None else num_queries
    keys, values = mqar_ranges(vocab_size)
    _need(num_pairs >= 1, f"num_pairs must be >= 1, got {num_pairs}")
    _need(len(keys) >= num_pairs and len(values) >= 1,
          f"{num_pairs} distinct keys need vocab_size >= {SPECIALS + 2 * num_pairs}, got {vocab_size}")
    _need(1 <= q <= num_pairs, f"num_queries must lie in [1, num_pairs={num_pairs}], got {q}")
    _need(length >= 2 * num_pairs + 2 * q,
          f"length {length} cannot hold {num_pairs} pairs and {q} queries (needs >= {2 * num_pairs + 2 * q})")
    k = rng.choice(np.asarray(keys), size=num_pairs, replace=False)
    v = rng.choice(np.asarray(values), size=num_pairs, replace=True)
    ids = np.full(length, PAD, dtype=np.int64)
    ids[0:2 * num_pairs:2], ids[1:2 * num_pairs:2] = k, v
    # q query slots of 2 tokens at random places in the rest: choose q gap sizes summing to the spare room
    spare = length - 2 * num_pairs - 2 * q
    cuts = np.sort(rng.integers(0, spare + 1, size=q))
    order = rng.permutation(num_pairs)[:q]
    mask = np.zeros(length, dtype=np.uint8)
    answers = []
    for j, (pair, cut) in enumerate(zip(order, cuts)):
        pos = 2 * num_pairs + 2 * j + int(cut)
        ids[pos], ids[pos + 1] = k[pair], v[pair]
        mask[pos + 1] = 1
        answers.append(int(v[pair]))
    return TaskSample(ids, mask, answers)


def check_mqar(ids, num_pairs: int, vocab_size: int = 256) -> tuple[list[int], list[int]]:
    """(answer positions, answers) re-derived from an MQAR sequence: after the first `num_pairs`
    pairs, every key token is a query whose answer is the next position, the value bound to it."""
    ids = np.asarray(ids)
    keys, _ = mqar_ranges(vocab_size)
    table = {}
    for i in range(num_pairs):
        key, value = int(ids[2 * i]), int(ids[2 * i + 1])
        if key not in keys or key in table:
            raise TaskError(f"pair {i}: {key} is not a fresh key")
        table[key] = value
    positions, answers = [], []
    for pos in range(2 * num_pairs, len(ids) - 1):
        if int(ids[pos]) in keys:
            positions.append(pos + 1)
            answers.append(table[int(ids[pos])])
    return positions, answers


# ---------------------------------------------------------------- swap tracking

def swap_capacity(length: int, num_elements: int, num_queries: int = 1) -> int:
    """How many swaps a swap sample of `length` ids holds (the task's number of swaps)."""
    return (length - num_elements - 3 * num_queries) // 3


def swap_sample(rng: np.random.Generator, *, length: int, num_elements: int, num_queries: int = 1,
                vocab_size: int = 256, min_swaps: int = 0, max_swaps: int = 0) -> TaskSample:
    """One swap-tracking sample of exactly `length` ids: as many swaps as fit after the start and
    before `num_queries` queries (PAD fills the remainder at the front).

    `min_swaps` > 0 (a training mixture of difficulties): the sample holds a number of swaps drawn
    uniformly from min_swaps..(as many as fit) instead, PAD filling the rest at the front; the
    queries stay at the end. 0 (the default, and the eval's task) draws nothing extra from `rng`."""
    n = num_elements
    _need(n >= 2, f"num_elements must be >= 2, got {n}")
    _need(vocab_size >= SPECIALS + 2 * n,
          f"{n} elements and {n} positions need vocab_size >= {SPECIALS + 2 * n}, got {vocab_size}")
    _need(1 <= num_queries <= n, f"num_queries must lie in [1, num_elements={n}], got {num_queries}")
    room = length - n - 3 * num_queries
    _need(room >= 3,
          f"length {length} holds no swap after {n} elements and {num_queries} queries (needs >= "
          f"{n + 3 * num_queries + 3})")
    num_swaps, pad = divmod(room, 3)
    _need(0 <= min_swaps <= num_swaps,
          f"min_swaps must lie in [0, {num_swaps}] (the swaps length {length} holds), got {min_swaps}")
    _need(0 <= max_swaps <= num_swaps and (not max_swaps or max_swaps >= min_swaps),
          f"max_swaps must lie in [max(1, min_swaps={min_swaps}), {num_swaps}] or be 0, got {max_swaps}")
    if min_swaps or max_swaps:
        fewer = num_swaps - int(rng.integers(max(min_swaps, 1), (max_swaps or num_swaps) + 1))
        num_swaps, pad = num_swaps - fewer, pad + 3 * fewer
    elem0, pos0 = SPECIALS, SPECIALS + n
    where = rng.permutation(n)  # where[x] = position of element x
    at = np.empty(n, dtype=np.int64)
    at[where] = np.arange(n)  # at[p] = element at position p
    parts = [np.full(pad, PAD), elem0 + at]
    for _ in range(num_swaps):
        i, j = rng.choice(n, size=2, replace=False)
        at[i], at[j] = at[j], at[i]
        parts.append(np.array([SWAP, pos0 + i, pos0 + j]))
    where[at] = np.arange(n)
    asked = rng.choice(n, size=num_queries, replace=False)
    answers = [int(pos0 + where[x]) for x in asked]
    for x, a in zip(asked, answers):
        parts.append(np.array([QUERY, elem0 + x, a]))
    ids = np.concatenate(parts).astype(np.int64)
    mask = np.zeros(length, dtype=np.uint8)
    mask[length - 3 * num_queries + 2::3] = 1
    return TaskSample(ids, mask, answers)


def check_swap(ids, num_elements: int) -> tuple[list[int], list[int]]:
    """(answer positions, answers) re-derived by replaying the swaps on the starting arrangement."""
    ids = [int(t) for t in ids]
    n, elem0, pos0 = num_elements, SPECIALS, SPECIALS + num_elements
    start = 0
    while ids[start] == PAD:
        start += 1
    at = [t - elem0 for t in ids[start:start + n]]
    if sorted(at) != list(range(n)):
        raise TaskError("the start is not an arrangement of the elements")
    positions, answers = [], []
    pos = start + n
    while pos < len(ids):
        op, a, b = ids[pos:pos + 3]
        if op == SWAP:
            i, j = a - pos0, b - pos0
            at[i], at[j] = at[j], at[i]
        elif op == QUERY:
            positions.append(pos + 2)
            answers.append(pos0 + at.index(a - elem0))
        else:
            raise TaskError(f"unexpected token {op} at {pos}")
        pos += 3
    return positions, answers


# ---------------------------------------------------------------- DAG reachability

def _reachable(n: int, edges: list[tuple[int, int]]) -> np.ndarray:
    """reach[u, v]: v can be reached from u by one or more edges (transitive closure)."""
    reach = np.zeros((n, n), dtype=bool)
    for u, v in edges:
        reach[u, v] = True
    for k in range(n):  # Floyd-Warshall on booleans
        reach |= reach[:, k:k + 1] & reach[k:k + 1, :]
    return reach


def dag_sample(rng: np.random.Generator, *, length: int, num_nodes: int, num_queries: int = 1,
               vocab_size: int = 256) -> TaskSample:
    """One DAG-reachability sample of exactly `length` ids: as many distinct edges as fit (at most
    every forward pair of a random topological order) before `num_queries` queries; PAD fills the
    front. Queries are reachable pairs or not with equal odds where both exist."""
    n = num_nodes
    _need(n >= 2, f"num_nodes must be >= 2, got {n}")
    _need(vocab_size >= SPECIALS + n, f"{n} nodes need vocab_size >= {SPECIALS + n}, got {vocab_size}")
    _need(num_queries >= 1, f"num_queries must be >= 1, got {num_queries}")
    room = length - 4 * num_queries
    _need(room >= 3, f"length {length} holds no edge before {num_queries} queries (needs >= {4 * num_queries + 3})")
    order = rng.permutation(n)
    forward = [(int(order[a]), int(order[b])) for a in range(n) for b in range(a + 1, n)]
    num_edges = min(room // 3, len(forward) // 2 or 1)  # at most half the forward pairs: leave unreachable pairs
    picked = rng.choice(len(forward), size=num_edges, replace=False)
    edges = [forward[i] for i in picked]
    reach = _reachable(n, edges)
    off = ~reach & ~np.eye(n, dtype=bool)
    parts = [np.full(length - 3 * num_edges - 4 * num_queries, PAD)]
    parts += [np.array([EDGE, SPECIALS + u, SPECIALS + v]) for u, v in edges]
    answers = []
    for _ in range(num_queries):
        pool = np.argwhere(reach) if (rng.random() < 0.5 or not off.any()) and reach.any() else np.argwhere(off)
        u, v = pool[rng.integers(len(pool))]
        a = YES if reach[u, v] else NO
        parts.append(np.array([QUERY, SPECIALS + u, SPECIALS + v, a]))
        answers.append(a)
    ids = np.concatenate(parts).astype(np.int64)
    mask = np.zeros(length, dtype=np.uint8)
    mask[length - 4 * num_queries + 3::4] = 1
    return TaskSample(ids, mask, answers)


def check_dag(ids) -> tuple[list[int], list[int]]:
    """(answer positions, answers) re-derived by a graph search over the sequence's edges."""
    ids = [int(t) for t in ids]
    adj: dict[int, set] = {}
    positions, answers = [], []
    pos = 0
    while pos < len(ids):
        if ids[pos] == PAD:
            pos += 1
        elif ids[pos] == EDGE:
            adj.setdefault(ids[pos + 1], set()).add(ids[pos + 2])
            pos += 3
        elif ids[pos] == QUERY:
            u, v = ids[pos + 1], ids[pos + 2]
            seen, todo = set(), list(adj.get(u, ()))
            while todo:
                w = todo.pop()
                if w not in seen:
                    seen.add(w)
                    todo.extend(adj.get(w, ()))
            positions.append(pos + 3)
            answers.append(YES if v in seen else NO)
            pos += 4
        else:
            raise TaskError(f"unexpected token {ids[pos]} at {pos}")
    return positions, answers


# ---------------------------------------------------------------- registry

TASKS = {"mqar": mqar_sample, "swap": swap_sample, "dag": dag_sample}
# samples in a task's cached training dataset when data.task.num_samples is 0
DEFAULT_TASK_SAMPLES = 20000

# knobs each task takes besides length and vocab_size
TASK_KNOBS = {"mqar": ("num_pairs", "num_queries"), "swap": ("num_elements", "num_queries"),
              "dag": ("num_nodes", "num_queries")}
# knobs that change only what a model is TRAINED on (the cached training dataset), never the task itself:
# the eval (`lctrain eval task`) builds its samples from TASK_KNOBS alone, so it scores the task as defined
TRAIN_KNOBS = {"mqar": (), "swap": ("min_swaps", "max_swaps", "curriculum_samples"), "dag": ()}


def swap_curriculum_cap(index: int, curriculum_samples: int, most: int) -> int:
    """The most swaps sample `index` of a curriculum may hold: 1 for the first 1/most of the
    `curriculum_samples` samples, 2 for the next 1/most, ..., `most` from there on."""
    return most if index >= curriculum_samples else 1 + index * most // curriculum_samples


def task_samples(name: str, *, count: int, length: int, seed: int, vocab_size: int, **knobs) -> list[TaskSample]:
    """`count` samples of task `name` from one seeded numpy Generator (reproducible for a seed).

    swap's `curriculum_samples` N (training only): sample i holds at most swap_curriculum_cap(i, N, most)
    swaps (`most`: max_swaps, else as many as fit), drawn uniformly from min_swaps (at least 1) up to
    that; the samples must then be read in order (the task dataset marks itself `ordered`)."""
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; use one of {sorted(TASKS)}")
    rng = np.random.default_rng([seed, count, length])
    curriculum = int(knobs.pop("curriculum_samples", 0) or 0)
    if not curriculum:
        return [TASKS[name](rng, length=length, vocab_size=vocab_size, **knobs) for _ in range(count)]
    _need(name == "swap", f"curriculum_samples is a knob of the swap task, not of {name}")
    _need(curriculum > 0, f"curriculum_samples must be >= 0, got {curriculum}")
    fit = swap_capacity(length, knobs["num_elements"], knobs.get("num_queries", 1))
    most = int(knobs.pop("max_swaps", 0) or 0) or fit
    low = max(1, int(knobs.pop("min_swaps", 0) or 0))
    _need(1 <= low <= most <= fit, f"min_swaps {low} <= max_swaps {most} <= {fit} (the swaps length {length} "
          "holds) must hold")
    out = []
    for i in range(count):
        cap = swap_curriculum_cap(i, curriculum, most)
        out.append(swap_sample(rng, length=length, vocab_size=vocab_size, min_swaps=min(low, cap), max_swaps=cap,
                               **knobs))
    return out
