"""Needles in haystacks: the one place that says what a needle, its key and value, the haystack
noise and the needle's placement are, for the training samples and the evals alike.

- values: `random_value` (NEEDLE_DIGITS-digit numbers, RULER's 7, or UUIDs); keys: `random_key`
  ("adjective-noun", from one of two word lists: the training samples' or the evals' larger one);
- wording: RULER's needle sentence (`needle_text`), the training samples' question (`question_text`)
  and their compact form for short samples (COMPACT_*); the evals' prompt templates
  (lctrain/eval/ruler.py) are built from these;
- haystacks: NOISE (RULER's repeated sentences, task s_niah_1) or essay text (the embedded corpus);
- placement: `needle_position`, the sentence end nearest the requested depth, else the nearest word
  boundary; `NeedleSample`, what a built prompt holds and where its needle went.

Training tasks:
  s_niah_1  a number hidden in repeated noise sentences (the classic passkey)
  s_niah_2  a number hidden in essay text (the embedded corpus)
  s_niah_3  a UUID hidden in essay text
`build_needle_sample` works on token ids so that the prompt has EXACTLY the requested number of tokens
for any tokenizer (words are encoded separately and the last one is cut at a token): the prompt is
haystack + " " + needle + haystack + "\n\n" + question, and the answer is " {value}".
`training_needle_sample` / `packed_needle_sample` turn such prompts into training samples.
"""
from __future__ import annotations

import math
import random
import uuid as _uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

# Digits of every numeric needle value, in training and in the evals: RULER's S-NIAH values have 7,
# and a model trained on fewer writes fewer.
NEEDLE_DIGITS = 7
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE_TEMPLATE = "One of the special magic {kind} for {key} is: {value}."  # RULER's needle sentence
QUESTION_TEMPLATE = (
    "What is the special magic {kind_one} for {key} mentioned in the provided text? "
    "The special magic {kind_one} for {key} mentioned in the provided text is:"
)
TASKS = ("s_niah_1", "s_niah_2", "s_niah_3")
# For training samples too short for the RULER wording (byte tokenizer: < ~300 tokens).
COMPACT_NEEDLE_TEMPLATE = "The pass key is {value}."
COMPACT_QUESTION = "The pass key is:"

# "adjective-noun" keys, as RULER's look: the training samples draw from the short lists, the evals'
# RULER template from the long ones (keys the model has not seen in training)
KEY_WORDS = {
    "train": (
        ("amber", "brave", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly",
         "keen", "lively", "mellow", "noble", "odd", "proud", "quiet", "rapid", "silent", "tidy"),
        ("anchor", "badger", "canyon", "dragon", "ember", "falcon", "garden", "harbor", "island",
         "jungle", "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quarry", "river",
         "saddle", "tunnel"),
    ),
    "eval": (
        tuple("ancient bitter brave calm clever crimson curious damp eager early fancy fierce fragile gentle "
              "gloomy golden grumpy hollow humble icy jolly lazy lively loud lucky mellow misty modest nimble "
              "noisy odd pale polite proud quick quiet rapid rough rusty shiny silent silly sleepy slow smooth "
              "sour spicy steady stormy sturdy sunny swift tame tender tidy tiny vast velvet vivid wary wild "
              "witty young zealous".split()),
        tuple("anchor apple arrow badge basket beacon bell blanket bottle bridge bucket cabin candle canyon "
              "castle cloud compass copper cottage crayon desert dragon drum eagle engine falcon feather fiddle "
              "forest fountain garden glacier hammer harbor helmet island jacket kettle ladder lantern lemon "
              "magnet meadow mirror mountain needle orchard otter paddle parrot pebble pencil piano pillow "
              "planet pocket puzzle quilt rabbit ribbon river rocket saddle shovel spoon storm tiger tower "
              "tulip valley violin wagon whistle".split()),
    ),
}


@dataclass
class NeedleSample:
    """One built prompt. `prompt_ids` ends where the model should continue with the answers."""

    task: str
    depth: float  # requested depth in [0, 1]
    prompt: str
    prompt_ids: list[int]
    answers: list[str]  # the values the model must produce, in order
    keys: list[str]  # every needle's key; the queried ones first
    needle_start: int  # token offset of the (first queried) needle in prompt_ids
    needle_tokens: int  # its length in tokens
    context_span: tuple[int, int]  # [start, end) tokens of the context: the haystack with its needles
    template: str = ""  # the wording used
    length: int = 0  # the token budget it was built for
    index: int = 0  # sample index within its (task, length, depth) cell
    extra: dict = field(default_factory=dict)

    @property
    def measured_depth(self) -> float:
        """Context tokens before the needle / context tokens other than the needle."""
        a, b = self.context_span
        return (self.needle_start - a) / max(1, b - a - self.needle_tokens)


def random_key(rng: random.Random, words: str = "train") -> str:
    """An "adjective-noun" key from the word lists KEY_WORDS[words]."""
    if words not in KEY_WORDS:
        raise ValueError(f"unknown key word list {words!r}; use one of {sorted(KEY_WORDS)}")
    adjectives, nouns = KEY_WORDS[words]
    return f"{rng.choice(adjectives)}-{rng.choice(nouns)}"


def random_value(rng: random.Random, value_type: str = "numbers", digits: int = NEEDLE_DIGITS) -> str:
    """A needle value: a `digits`-digit number ("numbers") or a UUID4 ("uuids")."""
    if value_type == "numbers":
        if digits < 1:
            raise ValueError(f"digits must be >= 1, got {digits}")
        return str(rng.randrange(10 ** (digits - 1), 10 ** digits))
    if value_type == "uuids":
        return str(_uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle value type {value_type!r}; use numbers or uuids")


def value_type(task: str) -> str:
    """What the needles of a training task hold: "uuids" (s_niah_3) or "numbers"."""
    _check_task(task)
    return "uuids" if task == "s_niah_3" else "numbers"


def needle_text(task: str, key: str, value: str) -> str:
    return NEEDLE_TEMPLATE.format(kind=value_type(task), key=key, value=value)


def question_text(task: str, key: str) -> str:
    return QUESTION_TEMPLATE.format(kind_one=value_type(task)[:-1], key=key)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown needle task {task!r}; use one of {TASKS}")


def noise_sentences() -> list[str]:
    """NOISE as sentences, each with its full stop."""
    return [s + "." for s in NOISE.rstrip(".").split(". ")]


def needle_position(bounds: Sequence[float], sentence_ends: Sequence[bool], target: float, slack: float) -> int:
    """Where a needle aimed at offset `target` goes: the index into `bounds` (ascending boundary
    offsets of the haystack, first = its start, last = its end) of the nearest boundary that ends a
    sentence (`sentence_ends`; the first and last boundary count as such) when it lies within `slack`
    of the target, else of the nearest boundary. Ties go to the earlier boundary."""
    last = len(bounds) - 1
    nearest = min(range(len(bounds)), key=lambda j: (abs(bounds[j] - target), j))
    ends = [j for j in range(len(bounds)) if sentence_ends[j] or j in (0, last)]
    best = min(ends, key=lambda j: (abs(bounds[j] - target), j))
    return best if abs(bounds[best] - target) <= slack else nearest


def _haystack_sentences(task: str, rng: random.Random) -> tuple[Sequence[str], int]:
    """The haystack's sentences and where to start reading them (random start for essays)."""
    if task == "s_niah_1":
        return noise_sentences(), 0
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
    digits: int = NEEDLE_DIGITS,
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
        value = random_value(rng, value_type(task), digits)
    enc = _encode_cache or _SentenceIds(tokenizer)
    needle = COMPACT_NEEDLE_TEMPLATE.format(value=value) if compact else needle_text(task, key, value)
    question = COMPACT_QUESTION if compact else question_text(task, key)
    needle_ids = tokenizer.encode(" " + needle)
    question_ids = tokenizer.encode("\n\n" + question)
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
    cut = needle_position(bounds, sentence_end, depth * hay_budget, 0.02 * hay_budget)
    hay_before = [t for p in pieces[:cut] for t in p]
    hay_after = [t for p in pieces[cut:] for t in p]
    prompt_ids = hay_before + needle_ids + hay_after + question_ids
    assert len(prompt_ids) == prompt_tokens, (len(prompt_ids), prompt_tokens)

    prompt = "".join(texts[:cut]) + " " + needle + "".join(texts[cut:]) + "\n\n" + question
    return NeedleSample(task=task, depth=depth, prompt=prompt, prompt_ids=prompt_ids, answers=[value], keys=[key],
                        needle_start=len(hay_before), needle_tokens=len(needle_ids),
                        context_span=(0, hay_budget + len(needle_ids)), template="compact" if compact else "train",
                        length=prompt_tokens)


def training_needle_sample(tokenizer: Any, length: int, rng: random.Random, *,
                           tasks: Sequence[str] = ("s_niah_1", "s_niah_2"),
                           digits: int = NEEDLE_DIGITS, compact: bool | None = None, with_answer_mask: bool = False,
                           _encode_cache: _SentenceIds | None = None) -> list[int] | tuple[list[int], list[int]]:
    """`length` token ids: a needle prompt at a random depth whose last tokens are the answer digits.

    Used for training samples (length = seq_len + 1): the loss on the final answer tokens rewards
    retrieving the number from far back in the context. Lengths too short for the RULER wording use
    the compact one; `min_training_length` is the shortest length that works at all.
    compact=True/False forces a wording (packed samples put RULER-worded units into short spans too).
    with_answer_mask=True returns (ids, mask): mask[i] = 1 where ids[i] is an answer token, else 0.
    """
    task = rng.choice(list(tasks))
    value = random_value(rng, "numbers", digits)
    answer_ids = tokenizer.encode(" " + value)
    if compact is None:
        compact = uses_compact_wording(tokenizer, length, len(answer_ids))
    s = build_needle_sample(task, tokenizer, length - len(answer_ids), rng.random(), rng, value=value,
                            compact=compact, _encode_cache=_encode_cache)
    ids = s.prompt_ids + answer_ids
    assert len(ids) == length
    if with_answer_mask:
        return ids, [0] * len(s.prompt_ids) + [1] * len(answer_ids)
    return ids


# Packed samples: passkey units of at most this many tokens (so that the needle-to-question distance varies).
MAX_UNIT_TOKENS = 450


def packed_needle_sample(tokenizer: Any, length: int, rng: random.Random, *,
                         tasks: Sequence[str] = ("s_niah_1", "s_niah_2"),
                         digits: int = NEEDLE_DIGITS, max_unit: int = MAX_UNIT_TOKENS, full_unit_share: float = 0.5,
                         with_answer_mask: bool = False,
                         _encode_cache: _SentenceIds | None = None) -> list[int] | tuple[list[int], list[int]]:
    """`length` token ids holding SEVERAL complete passkey units joined by EOS, the last one ending the sample.

    Each unit is a `training_needle_sample`; its length is drawn log-uniformly from the shortest that
    works up to `max_unit`, so that short needle-to-question distances (where copying is learned
    first) are common and long ones occur. Units follow the length rule for their wording (compact
    below ~340 byte tokens); with probability `full_unit_share` one unit of 240+ tokens uses RULER's
    wording regardless, so that the wording the evals use at longer lengths is trained densely too.
    One sample thus yields several answers at varied distances instead of one. Units are separated
    by EOS as packed documents are.
    with_answer_mask=True returns (ids, mask): 1 on the units' answer tokens, else 0.
    """
    lo = min_training_length(tokenizer, digits)
    if length < lo:
        raise ValueError(f"length={length} is too short for a passkey unit (>= {lo} tokens); use a longer seq_len")
    eos = getattr(tokenizer, "eos_id", None)
    sep = [] if eos is None else [eos]
    enc = _encode_cache or _SentenceIds(tokenizer)
    units: list[tuple[int, bool | None]] = []  # (tokens, forced wording)
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
        rng.random()  # this draw once chose digit-copy units (gone); kept so the embedded data stays as built
        units.append((n, None))
        left -= n + len(sep)
    rng.shuffle(units)
    units.append((left, None))  # a passkey unit always ends the sample
    ids: list[int] = []
    mask: list[int] = []
    for i, (n, compact) in enumerate(units):
        unit, unit_mask = training_needle_sample(tokenizer, n, rng, tasks=tasks, digits=digits, compact=compact,
                                                 with_answer_mask=True, _encode_cache=enc)
        ids += unit
        mask += unit_mask
        if i < len(units) - 1:
            ids += sep
            mask += [0] * len(sep)
    assert len(ids) == length == len(mask), (len(ids), length)
    return (ids, mask) if with_answer_mask else ids


# The compact-wording rule measures the full wording with a 5-digit placeholder value (the value's own
# tokens enter as answer_tokens). The rule was set so and the embedded dataset is built by it: changing
# it changes which samples are compact.
_RULE_PLACEHOLDER_DIGITS = 5


def _min_prompt(tokenizer: Any, *, compact: bool, digits: int = NEEDLE_DIGITS) -> int:
    """Prompt tokens taken by the needle and the question alone (no haystack)."""
    value = "9" * digits
    if compact:
        return (len(tokenizer.encode(" " + COMPACT_NEEDLE_TEMPLATE.format(value=value)))
                + len(tokenizer.encode("\n\n" + COMPACT_QUESTION)))
    key = "gentle-lantern"
    return (len(tokenizer.encode(" " + needle_text("s_niah_2", key, value)))
            + len(tokenizer.encode("\n\n" + question_text("s_niah_2", key))))


def uses_compact_wording(tokenizer: Any, length: int, answer_tokens: int) -> bool:
    """Whether a training sample of `length` tokens (answer included) is too short for the full
    wording and uses the compact one: length < 1.5 x (full needle + question tokens) + answer tokens."""
    return length < _min_prompt(tokenizer, compact=False, digits=_RULE_PLACEHOLDER_DIGITS) * 1.5 + answer_tokens


def min_training_length(tokenizer: Any, digits: int = NEEDLE_DIGITS) -> int:
    """The shortest sample `training_needle_sample` can build (compact wording, a little haystack)."""
    return _min_prompt(tokenizer, compact=True, digits=digits) + len(tokenizer.encode(" " + "9" * digits)) + 8
