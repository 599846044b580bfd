"""Needle-in-a-haystack (RULER S-NIAH) prompts, for training samples and for evals.

Tasks:
  s_niah_1  a number hidden in repeated noise sentences (the classic passkey)
  s_niah_2  a number hidden in essay text (the embedded corpus)
  s_niah_3  a UUID hidden in essay text
The needle is "One of the special magic numbers for {key} is: {value}." (uuids for s_niah_3), placed
at the sentence end (else word boundary) closest to `depth` in [0, 1] of the haystack; the prompt ends with the question and the
answer prefix, and the answer is " {value}".

`build_needle_sample` works on token ids so that the prompt has EXACTLY the requested number of tokens for any
tokenizer (words are encoded separately and the last one is cut at a token; used for training);
`niah_sample` / `niah_prompt` (evals) return text whose re-encoding is within +-1% of the target (exact for the byte
tokenizer on ASCII text).
"""
from __future__ import annotations

import math
import random
import uuid as _uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE_TEMPLATE = "One of the special magic {kind} for {key} is: {value}."
QUESTION_TEMPLATE = (
    "What is the special magic {kind_one} for {key} mentioned in the provided text? "
    "The special magic {kind_one} for {key} mentioned in the provided text is:"
)
TASKS = ("s_niah_1", "s_niah_2", "s_niah_3")
# For training samples too short for the RULER wording (byte tokenizer: < ~300 tokens).
COMPACT_NEEDLE_TEMPLATE = "The pass key is {value}."
COMPACT_QUESTION = "The pass key is:"

_KEY_WORDS_A = ("amber", "brave", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly",
                "keen", "lively", "mellow", "noble", "odd", "proud", "quiet", "rapid", "silent", "tidy")
_KEY_WORDS_B = ("anchor", "badger", "canyon", "dragon", "ember", "falcon", "garden", "harbor", "island",
                "jungle", "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quarry", "river",
                "saddle", "tunnel")


@dataclass
class NeedleSample:
    """One prompt: `prompt_ids` ends with the answer prefix; `answer_ids` is what should follow."""

    task: str
    key: str
    value: str
    prompt_ids: list[int]
    answer_ids: list[int]
    prompt_text: str
    answer_text: str
    depth: float  # requested depth
    needle_start: int  # token offset of the needle inside prompt_ids
    needle_len: int
    haystack_len: int  # haystack tokens (prompt minus needle minus question)
    extra: dict = field(default_factory=dict)

    @property
    def actual_depth(self) -> float:
        return self.needle_start / max(1, self.haystack_len)


def random_key(rng: random.Random) -> str:
    return f"{rng.choice(_KEY_WORDS_A)}-{rng.choice(_KEY_WORDS_B)}"


def random_number(rng: random.Random, digits: int) -> str:
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def random_uuid(rng: random.Random) -> str:
    return str(_uuid.UUID(int=rng.getrandbits(128), version=4))


def needle_text(task: str, key: str, value: str) -> str:
    return NEEDLE_TEMPLATE.format(kind=_kind(task), key=key, value=value)


def question_text(task: str, key: str) -> str:
    return QUESTION_TEMPLATE.format(kind_one=_kind(task)[:-1], key=key)


def _kind(task: str) -> str:
    _check_task(task)
    return "uuids" if task == "s_niah_3" else "numbers"


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown needle task {task!r}; use one of {TASKS}")


def _haystack_sentences(task: str, rng: random.Random) -> tuple[Sequence[str], int]:
    """The haystack's sentences and where to start reading them (random start for essays)."""
    if task == "s_niah_1":
        return [s + "." for s in NOISE.rstrip(".").split(". ")], 0
    from lctrain.data.corpus import _essay_sentences

    sents = _essay_sentences()  # the cached tuple: no copy per sample
    return sents, rng.randrange(len(sents))


class _SentenceIds:
    """Token ids of haystack words, encoded once each as " " + word (the canonical form for BPE)."""

    def __init__(self, tokenizer: Any):
        self.tok, self.cache = tokenizer, {}

    def __call__(self, s: str) -> list[int]:
        ids = self.cache.get(s)
        if ids is None:
            ids = self.cache[s] = self.tok.encode(" " + s)
        return ids


def build_needle_sample(
    task: str,
    tokenizer: Any,
    prompt_tokens: int,
    depth: float,
    rng: random.Random,
    *,
    digits: int = 7,
    key: str | None = None,
    value: str | None = None,
    compact: bool = False,
    _encode_cache: _SentenceIds | None = None,
) -> NeedleSample:
    """A prompt of exactly `prompt_tokens` tokens with the needle at `depth`, ending with the question.

    compact=True uses the short "The pass key is {value}." / "The pass key is:" wording (training only).
    """
    _check_task(task)
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"needle depth must lie in [0, 1], got {depth}")
    key = key or random_key(rng)
    if value is None:
        value = random_uuid(rng) if task == "s_niah_3" else random_number(rng, digits)
    enc = _encode_cache or _SentenceIds(tokenizer)
    needle = COMPACT_NEEDLE_TEMPLATE.format(value=value) if compact else needle_text(task, key, value)
    question = COMPACT_QUESTION if compact else question_text(task, key)
    needle_ids = tokenizer.encode(" " + needle)
    question_ids = tokenizer.encode("\n\n" + question)
    answer_text = " " + value
    answer_ids = tokenizer.encode(answer_text)
    hay_budget = prompt_tokens - len(needle_ids) - len(question_ids)
    if hay_budget < 0:
        raise ValueError(f"prompt_tokens={prompt_tokens} is too short for the needle and the question "
                         f"({len(needle_ids) + len(question_ids)} tokens); use a longer length")

    # Haystack: words (each encoded with its leading space) until the budget is met, the last one
    # cut at a token. The needle goes to the sentence end closest to depth * budget, or to the
    # closest word boundary when no sentence ends within 2% of the haystack of that point.
    sents, start = _haystack_sentences(task, rng)
    pieces: list[list[int]] = []
    texts: list[str] = []
    sentence_end = [True]  # per boundary: does a sentence end there (boundary 0 = start)
    total, i = 0, start
    while total < hay_budget:
        words = sents[i % len(sents)].split()
        for w_i, w in enumerate(words):
            ids = enc(w)
            take = ids[: hay_budget - total]
            pieces.append(take)
            texts.append(" " + w if len(take) == len(ids) else tokenizer.decode(take))
            sentence_end.append(w_i == len(words) - 1)
            total += len(take)
            if total >= hay_budget:
                break
        i += 1

    bounds = [0]
    for p in pieces:
        bounds.append(bounds[-1] + len(p))
    target = depth * hay_budget
    by_distance = sorted(range(len(bounds)), key=lambda j: (abs(bounds[j] - target), j))
    cut = by_distance[0]
    sentence_cuts = [j for j in by_distance if sentence_end[j] or j == len(bounds) - 1]
    if sentence_cuts and abs(bounds[sentence_cuts[0]] - target) <= 0.02 * hay_budget:
        cut = sentence_cuts[0]
    hay_before = [t for p in pieces[:cut] for t in p]
    hay_after = [t for p in pieces[cut:] for t in p]
    prompt_ids = hay_before + needle_ids + hay_after + question_ids
    assert len(prompt_ids) == prompt_tokens, (len(prompt_ids), prompt_tokens)

    prompt_text = "".join(texts[:cut]) + " " + needle + "".join(texts[cut:]) + "\n\n" + question
    return NeedleSample(task=task, key=key, value=value, prompt_ids=prompt_ids, answer_ids=answer_ids,
                        prompt_text=prompt_text, answer_text=answer_text, depth=depth,
                        needle_start=len(hay_before), needle_len=len(needle_ids), haystack_len=hay_budget)


def niah_sample(task: str, tokenizer: Any, target_tokens: int, depth: float, *, seed: int = 0,
                digits: int = 7) -> NeedleSample:
    """An eval prompt whose text re-encodes to within +-1% of `target_tokens` (exactly, for the byte
    tokenizer on ASCII); `prompt_ids` here ARE `tokenizer.encode(prompt_text)` (canonical tokens).

    The token-level builder joins separately encoded words, which a BPE tokenizer may merge
    differently when it encodes the whole text, so the haystack size is corrected a few times.
    """
    want, best = target_tokens, None
    for _ in range(8):
        s = build_needle_sample(task, tokenizer, want, depth, random.Random(seed), digits=digits)
        text = s.prompt_text[1:] if s.prompt_text.startswith(" ") else s.prompt_text
        ids = tokenizer.encode(text)
        if best is None or abs(len(ids) - target_tokens) < abs(len(best[2]) - target_tokens):
            best = (s, text, ids)
        if len(ids) == target_tokens:
            break
        step = round((target_tokens - len(ids)) * want / max(1, len(ids)))
        want = max(1, want + (step or (1 if len(ids) < target_tokens else -1)))
    s, text, ids = best
    needle = text.index(" " + needle_text(task, s.key, s.value)) if s.needle_start else 0
    needle_start = len(tokenizer.encode(text[:needle])) if needle else 0
    question = len(tokenizer.encode("\n\n" + question_text(task, s.key)))
    return NeedleSample(task=task, key=s.key, value=s.value, prompt_ids=ids, answer_ids=s.answer_ids,
                        prompt_text=text, answer_text=s.answer_text, depth=depth, needle_start=needle_start,
                        needle_len=s.needle_len, haystack_len=len(ids) - s.needle_len - question)


def niah_prompt(task: str, tokenizer: Any, target_tokens: int, depth: float, *, seed: int = 0,
                digits: int = 7) -> tuple[str, str]:
    """(prompt_text, answer_text): about `target_tokens` prompt tokens (+-1%), the needle at `depth`."""
    s = niah_sample(task, tokenizer, target_tokens, depth, seed=seed, digits=digits)
    return s.prompt_text, s.answer_text


def training_needle_sample(tokenizer: Any, length: int, rng: random.Random, *, tasks: Sequence[str] = ("s_niah_1", "s_niah_2"),
                           digits: int = 5, compact: bool | None = None, with_answer_mask: bool = False,
                           _encode_cache: _SentenceIds | None = None) -> list[int] | tuple[list[int], list[int]]:
    """`length` token ids: a needle prompt at a random depth whose last tokens are the answer digits.

    Used for training samples (length = seq_len + 1): the loss on the final answer tokens rewards
    retrieving the number from far back in the context. Lengths too short for the RULER wording use
    the compact one; `min_training_length` is the shortest length that works at all.
    compact=True/False forces a wording (packed samples put RULER-worded units into short spans too).
    with_answer_mask=True returns (ids, mask): mask[i] = 1 where ids[i] is an answer token, else 0.
    """
    task = rng.choice(list(tasks))
    value = random_number(rng, digits)
    answer_len = len(tokenizer.encode(" " + value))
    if compact is None:
        compact = uses_compact_wording(tokenizer, length, answer_len)
    s = build_needle_sample(task, tokenizer, length - answer_len, rng.random(), rng, value=value,
                            compact=compact, _encode_cache=_encode_cache)
    ids = s.prompt_ids + s.answer_ids
    assert len(ids) == length
    if with_answer_mask:
        return ids, [0] * len(s.prompt_ids) + [1] * len(s.answer_ids)
    return ids


# Packed samples: passkey units of at most this many tokens (so that the needle-to-question distance varies).
MAX_UNIT_TOKENS = 450


def copy_unit(tokenizer: Any, length: int, rng: random.Random, *, digits: int = 5) -> list[int]:
    """`length` token ids: a line of random `digits`-digit numbers, a blank line, then the same line again.

    Every token of the repeat can be predicted only by copying from the first line: a dense signal
    for the induction (copy) heads that passkey retrieval rests on, which the few answer digits of
    passkey units alone train too slowly. The repeat is cut to fit `length`.
    """
    if length < 4:
        raise ValueError(f"a copy unit needs >= 4 tokens, got {length}")
    sep = tokenizer.encode("\n\n")
    half = (length - len(sep)) // 2 + 1
    line: list[int] = []
    while len(line) < half:
        line += tokenizer.encode(" " + random_number(rng, digits))
    ids = line[:half] + sep + line
    return ids[:length]


def packed_needle_sample(tokenizer: Any, length: int, rng: random.Random, *, tasks: Sequence[str] = ("s_niah_1", "s_niah_2"),
                         digits: int = 5, max_unit: int = MAX_UNIT_TOKENS, full_unit_share: float = 0.5,
                         copy_share: float = 0.0, with_answer_mask: bool = False,
                         _encode_cache: _SentenceIds | None = None) -> list[int] | tuple[list[int], list[int]]:
    """`length` token ids holding SEVERAL complete passkey units joined by EOS, the last one ending the sample.

    Each unit is a `training_needle_sample`; its length is drawn log-uniformly from the shortest that
    works up to `max_unit`, so that short needle-to-question distances (where copying is learned
    first) are common and long ones occur. Units follow the length rule for their wording (compact
    below ~340 byte tokens); with probability `full_unit_share` one unit of 240+ tokens uses RULER's
    wording regardless, so that the wording the evals use at longer lengths is trained densely too.
    One sample thus yields several answers at varied distances instead of one. A share `copy_share`
    of the other units are `copy_unit`s (dense copying signal). Units are separated by EOS as packed
    documents are; a passkey unit ends the sample.
    with_answer_mask=True returns (ids, mask): 1 on the passkey units' answer tokens, else 0 (copy units too).
    """
    lo = min_training_length(tokenizer, digits)
    if length < lo:
        raise ValueError(f"length={length} is too short for a passkey unit (>= {lo} tokens); use a longer seq_len")
    eos = getattr(tokenizer, "eos_id", None)
    sep = [] if eos is None else [eos]
    enc = _encode_cache or _SentenceIds(tokenizer)
    units: list[tuple[int, bool | str | None]] = []  # (tokens, forced wording or "copy")
    left = length
    full_lo = _min_prompt(tokenizer, compact=False, digits=digits) + len(tokenizer.encode(" " + "9" * digits)) + 16
    if rng.random() < full_unit_share and left >= full_lo + lo + len(sep):
        n = rng.randint(full_lo, min(max_unit, left - lo - len(sep)))
        units.append((n, False))
        left -= n + len(sep)
    # the rest becomes the last unit when another unit + separator would not fit beside a shortest one
    # (and while a shortest unit still fits after this one: with max_unit < 2 * lo the last unit may exceed max_unit)
    while left > min(max_unit, 2 * lo + len(sep)) and left - len(sep) - lo >= lo:
        hi = min(max_unit, left - lo - len(sep))
        n = min(hi, max(lo, round(math.exp(rng.uniform(math.log(lo), math.log(hi))))))
        units.append((n, "copy" if rng.random() < copy_share else None))
        left -= n + len(sep)
    rng.shuffle(units)
    units.append((left, None))  # a passkey unit always ends the sample
    ids: list[int] = []
    mask: list[int] = []
    for i, (n, kind) in enumerate(units):
        if kind == "copy":
            unit = copy_unit(tokenizer, n, rng, digits=digits)
            ids += unit
            mask += [0] * len(unit)
        else:
            unit, unit_mask = training_needle_sample(tokenizer, n, rng, tasks=tasks, digits=digits, compact=kind,
                                                     with_answer_mask=True, _encode_cache=enc)
            ids += unit
            mask += unit_mask
        if i < len(units) - 1:
            ids += sep
            mask += [0] * len(sep)
    assert len(ids) == length == len(mask), (len(ids), length)
    return (ids, mask) if with_answer_mask else ids


def _min_prompt(tokenizer: Any, *, compact: bool, digits: int = 5) -> int:
    """Prompt tokens taken by the needle and the question alone (no haystack)."""
    value = "9" * digits
    if compact:
        return len(tokenizer.encode(" " + COMPACT_NEEDLE_TEMPLATE.format(value=value))) + len(tokenizer.encode("\n\n" + COMPACT_QUESTION))
    key = "gentle-lantern"
    return (len(tokenizer.encode(" " + needle_text("s_niah_2", key, value)))
            + len(tokenizer.encode("\n\n" + question_text("s_niah_2", key))))


def uses_compact_wording(tokenizer: Any, length: int, answer_tokens: int) -> bool:
    """Whether a training sample of `length` tokens (answer included) is too short for the full
    wording and uses the compact one: length < 1.5 x (full needle + question tokens) + answer tokens."""
    return length < _min_prompt(tokenizer, compact=False) * 1.5 + answer_tokens


def min_training_length(tokenizer: Any, digits: int = 5) -> int:
    """The shortest sample `training_needle_sample` can build (compact wording, a little haystack)."""
    return _min_prompt(tokenizer, compact=True, digits=digits) + len(tokenizer.encode(" " + "9" * digits)) + 8


def answer_from_prompt(prompt_text: str, key: str) -> str | None:
    """The value the prompt's needle gives for `key` (what a perfect reader answers), or None."""
    import re

    m = re.search(r"One of the special magic (?:numbers|uuids) for " + re.escape(key) + r" is: ([0-9a-f\-]+)\.", prompt_text)
    return m.group(1) if m else None
