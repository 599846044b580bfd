"""RULER-style needle-in-a-haystack samples, built offline, and RULER's scorer.

Tasks (RULER's "niah" family; Hsieh et al. 2024, NVIDIA/RULER scripts/data/synthetic):

| task       | haystack                    | needles                          | queried         |
|------------|-----------------------------|----------------------------------|-----------------|
| s_niah_1   | repeated noise sentences    | 1 key -> 7-digit number (passkey) | that key        |
| s_niah_2   | essay text                  | 1 key -> 7-digit number           | that key        |
| s_niah_3   | essay text                  | 1 key -> UUID                     | that key        |
| mk_niah_1  | essay text                  | 4 keys -> 1 number each           | one key         |
| mv_niah    | essay text                  | 1 key -> 4 numbers                | that key (all 4)|
| mq_niah    | essay text                  | 4 keys -> 1 number each           | all 4 keys      |

Needle values, keys, wording, noise text and the placement rule come from `lctrain.data.needle`, the
one module the training samples use too: numeric values have NEEDLE_DIGITS (7) digits in every
template; keys are "adjective-noun" words (RULER draws them from wonderwords' lists; we keep our own).
Templates ("ruler", the default) are RULER's: needle "One of the special magic {type} for {key} is:
{value}.", question "What are all the special magic {type} for {query} mentioned in the provided
text?", answer prefix " The special magic {type} for {query} mentioned in the provided text are",
singularised when only one answer is asked for, as RULER does. Template "passkey" is the classic
passkey-retrieval prompt (Mohtashami & Jaggi 2023); template "train" is the passkey format the
embedded training data uses (`lctrain.data.needle`), for models trained only on that: RULER's needle
and singular question without the introduction, or, at lengths where the training data does so, its
compact wording ("The pass key is 1234567." ... "The pass key is:"); each record names the one used.

Placement and length (both in tokens of the model's tokenizer):
- `length` is the whole sequence budget as in RULER: prompt tokens + max_new_tokens <= length; the
  haystack is grown word by word (then character by character in its last word) to the largest
  prompt that fits, so the prompt is within a token or two of length - max_new_tokens.
- `depth` in [0, 1] is the fraction of the context (the haystack with its needles) that lies before
  the queried needle. The needle goes to the sentence boundary nearest that point (as RULER and the
  training samples place needles) when one lies within 10% of the context, else to the nearest word
  boundary (only very short or very long-sentenced haystacks); `measured_depth` records where it went. Other needles
  (distractor keys,
  further values) go to random depths.
Scoring is RULER's string_match_all: the fraction of the reference values that occur in the
prediction, case-insensitive; for one needle, exact containment of the value.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Callable, Sequence

from lctrain.data import needle as _needle
from lctrain.data.needle import NEEDLE_DIGITS, NeedleSample, needle_position, random_key, random_value

from .text import essay_words, noise_words

# --------------------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class Template:
    """How needles and the question are written. `needle(key, value, task)` -> the needle sentence;
    `prompt(context, query, task, n_answers)` -> the whole prompt, ending with the answer prefix the
    model continues. `single_only`: the template can ask for one value only. `key_words`: the
    word lists of its keys (lctrain.data.needle.KEY_WORDS)."""

    name: str
    needle: Callable[[str, str, "TaskSpec"], str]
    prompt: Callable[[str, str, "TaskSpec", int], str]
    description: str = ""
    single_only: bool = False
    key_words: str = "eval"


RULER_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
RULER_ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"


def _ruler_needle(key: str, value: str, spec: "TaskSpec") -> str:
    return _needle.NEEDLE_TEMPLATE.format(kind=spec.value_type, key=key, value=value)


def _ruler_prompt(context: str, query: str, spec: "TaskSpec", n_answers: int) -> str:
    text = RULER_TEMPLATE + RULER_ANSWER_PREFIX
    type_v = spec.value_type
    if n_answers == 1:  # RULER's singular form of the same template
        text = text.replace("Some", "A").replace("are all", "is").replace("are", "is")
        type_v = type_v[:-1] if type_v.endswith("s") else type_v
    return text.format(type_needle_v=type_v, context=context, query=query)


PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                 "I will quiz you about the important information there.")


def _passkey_needle(key: str, value: str, spec: "TaskSpec") -> str:
    return f"The pass key is {value}. Remember it. {value} is the pass key."


def _passkey_prompt(context: str, query: str, spec: "TaskSpec", n_answers: int) -> str:
    return f"{PASSKEY_INTRO}\n{context}\nWhat is the pass key? The pass key is"


def _train_task(spec: "TaskSpec") -> str:
    """The lctrain.data.needle task whose wording (numbers / uuids) matches `spec`."""
    return "s_niah_3" if spec.value_type == "uuids" else "s_niah_1"


def _train_needle(key: str, value: str, spec: "TaskSpec") -> str:
    return _needle.needle_text(_train_task(spec), key, value)


def _train_prompt(context: str, query: str, spec: "TaskSpec", n_answers: int) -> str:
    return f"{context}\n\n{_needle.question_text(_train_task(spec), query)}"


def _compact_needle(key: str, value: str, spec: "TaskSpec") -> str:
    return _needle.COMPACT_NEEDLE_TEMPLATE.format(value=value)


def _compact_prompt(context: str, query: str, spec: "TaskSpec", n_answers: int) -> str:
    return f"{context}\n\n{_needle.COMPACT_QUESTION}"


def train_uses_compact(length: int, tokenizer) -> bool:
    """Whether lctrain.data.needle.training_needle_sample writes a sample of `length` tokens in its
    compact wording (the rule is needle.uses_compact_wording)."""
    return _needle.uses_compact_wording(tokenizer, length, len(tokenizer.encode(" " + "9" * NEEDLE_DIGITS)))


TEMPLATES: dict[str, Template] = {
    "ruler": Template("ruler", _ruler_needle, _ruler_prompt, "RULER's niah needle, question and answer prefix"),
    "passkey": Template("passkey", _passkey_needle, _passkey_prompt,
                        "classic passkey retrieval (Mohtashami & Jaggi); one needle", single_only=True),
    # what `lctrain train` teaches the embedded default model (lctrain.data.needle.training_needle_sample):
    # haystack + needle + "\n\n" + singular question ending in "is:"
    "train": Template("train", _train_needle, _train_prompt,
                      "the embedded training data's passkey format (lctrain.data.needle)",
                      single_only=True, key_words="train"),
    # its compact wording, which the training data uses for samples too short for the full one
    # (`--template train` switches to it by itself at such lengths, as training did)
    "train_compact": Template("train_compact", _compact_needle, _compact_prompt,
                              "the embedded training data's compact passkey format (short samples)",
                              single_only=True),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown NIAH template {name!r}; use one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


# ------------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class TaskSpec:
    name: str
    haystack: str  # "noise" | "essay"
    value_type: str  # "numbers" | "uuids"
    num_keys: int = 1  # needles with different keys (the extra ones are distractors unless queried)
    num_values: int = 1  # values per key (all must be retrieved)
    num_queries: int = 1  # keys asked for


TASKS: dict[str, TaskSpec] = {
    "s_niah_1": TaskSpec("s_niah_1", "noise", "numbers"),
    "s_niah_2": TaskSpec("s_niah_2", "essay", "numbers"),
    "s_niah_3": TaskSpec("s_niah_3", "essay", "uuids"),
    "mk_niah_1": TaskSpec("mk_niah_1", "essay", "numbers", num_keys=4),
    "mv_niah": TaskSpec("mv_niah", "essay", "numbers", num_values=4),
    "mq_niah": TaskSpec("mq_niah", "essay", "numbers", num_keys=4, num_queries=4),
}

# ------------------------------------------------------------------------------- lengths and depths


def parse_lengths(text: str | Sequence) -> list[int]:
    """"1k,2k,131k" or [512, "4k"] -> token counts (k = 1024, m = 1024**2)."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for item in items:
        s = str(item).strip().lower()
        if not s:
            continue
        mult = 1
        if s[-1] in "km":
            mult = 1024 if s[-1] == "k" else 1024 * 1024
            s = s[:-1]
        try:
            value = float(s) * mult
        except ValueError:
            raise ValueError(f"length {item!r} is not a number of tokens; write e.g. 512, 4k or 131k") from None
        if value < 1 or value != int(value):
            raise ValueError(f"length {item!r} must be a positive whole number of tokens")
        out.append(int(value))
    if not out:
        raise ValueError("no lengths given; write e.g. --lengths 1k,2k,4k")
    return out


def parse_depths(text: str | Sequence) -> list[float]:
    """"0:1:11" -> 11 evenly spaced depths from 0 to 1 (numpy linspace); "0,0.5,1" -> those values."""
    if not isinstance(text, str):
        values = [float(x) for x in text]
    elif ":" in text:
        parts = text.split(":")
        if len(parts) != 3:
            raise ValueError(f"depths {text!r}: write start:stop:count, e.g. 0:1:11")
        try:
            start, stop, count = float(parts[0]), float(parts[1]), int(parts[2])
        except ValueError:
            raise ValueError(f"depths {text!r}: write start:stop:count with numbers, e.g. 0:1:11") from None
        if count < 1:
            raise ValueError(f"depths {text!r}: count must be >= 1")
        values = [start + (stop - start) * i / (count - 1) if count > 1 else start for i in range(count)]
    else:
        try:
            values = [float(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"depths {text!r}: write start:stop:count or a comma list of fractions") from None
    values = [round(v, 6) for v in values]
    bad = [v for v in values if not 0.0 <= v <= 1.0]
    if bad or not values:
        raise ValueError(f"depths must be fractions in [0, 1] (0 = start of the context), got {text!r}")
    return values


# -------------------------------------------------------------------------------------- the samples


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Prompt token ids. No BOS: the training data (lctrain.data) packs documents joined by EOS and
    never starts a sample with BOS, so the evals do not either."""
    return list(tokenizer.encode(text))


def sample_rng(seed: int, *parts) -> random.Random:
    """A random.Random that depends only on the seed and the sample's coordinates."""
    digest = hashlib.sha256(repr((seed,) + tuple(parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


_CONTEXT_MARK = "\x00context\x00"


def _insertion_points(context_words: list[str]) -> tuple[list[int], list[bool]]:
    """Char offsets of the word boundaries of ' '.join(words) (start and end included) and whether a
    sentence ends at each."""
    bounds, sentence_ends, pos = [0], [True], 0
    for i, w in enumerate(context_words):
        pos += len(w)
        if i < len(context_words) - 1:
            bounds.append(pos + 1)
            sentence_ends.append(bool(w) and w[-1] in ".!?")
            pos += 1
    bounds.append(pos)
    sentence_ends.append(True)
    return bounds, sentence_ends


def insert_needles(haystack_words: list[str], needles: list[tuple[float, str]],
                   sentence_slack: float = 0.1) -> tuple[str, list[int]]:
    """Context text with each (depth, needle) inserted; returns (text, char offset of each needle).

    A needle at depth d goes where `lctrain.data.needle.needle_position` puts it: the sentence
    boundary nearest d * len(haystack) when one lies within `sentence_slack` of the haystack's
    length, else the nearest word boundary."""
    bounds, sentence_ends = _insertion_points(haystack_words)
    total = bounds[-1]
    text = " ".join(haystack_words)
    cuts = []
    for k, (depth, needle) in enumerate(needles):
        j = needle_position(bounds, sentence_ends, depth * total, sentence_slack * max(total, 1))
        cuts.append((bounds[j], k, needle))
    cuts.sort()
    pieces, offsets, last, out_len = [], [0] * len(needles), 0, 0
    for cut, k, needle in cuts:
        chunk = text[last:cut].rstrip(" ")
        if chunk:
            pieces.append(chunk)
            out_len += len(chunk) + 1
        offsets[k] = out_len
        pieces.append(needle)
        out_len += len(needle) + 1
        last = cut
    tail = text[last:].lstrip(" ")
    if tail:
        pieces.append(tail)
    return " ".join(pieces), offsets


def _haystack_source(task: TaskSpec) -> list[str]:
    return noise_words() if task.haystack == "noise" else essay_words()


def build_sample(task: str | TaskSpec, length: int, depth: float, tokenizer, *, index: int = 0, seed: int = 0,
                 max_new_tokens: int = 32, template: str | Template = "ruler") -> NeedleSample:
    """One NIAH prompt of `length` tokens (prompt + max_new_tokens, see module doc) with the queried
    needle at `depth`."""
    spec = TASKS[task] if isinstance(task, str) else task
    if isinstance(task, str) and task not in TASKS:
        raise ValueError(f"unknown NIAH task {task!r}; use one of {sorted(TASKS)}")
    tmpl = get_template(template) if isinstance(template, str) else template
    if tmpl.name == "train" and train_uses_compact(length, tokenizer):
        tmpl = TEMPLATES["train_compact"]  # what a training sample of this length looks like
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    if tmpl.single_only and spec.num_keys * spec.num_values > 1:
        raise ValueError(f"template {tmpl.name!r} holds one needle only; run {spec.name} with --template ruler")
    budget = length - max_new_tokens
    rng = sample_rng(seed, spec.name, length, round(depth, 6), index, tmpl.name)

    keys: list[str] = []
    while len(keys) < spec.num_keys:
        key = random_key(rng, tmpl.key_words)
        if key not in keys:
            keys.append(key)
    values = [[random_value(rng, spec.value_type) for _ in range(spec.num_values)] for _ in keys]
    queried = list(range(spec.num_queries))  # keys 0.. are asked for; the rest are distractors
    # the first queried needle sits at `depth`, every other needle at a random depth
    needles = []
    for ki, key in enumerate(keys):
        for vi, value in enumerate(values[ki]):
            d = depth if (ki, vi) == (0, 0) else rng.random()
            needles.append((d, tmpl.needle(key, value, spec)))
    answers = [v for ki in queried for v in values[ki]]
    qkeys = [keys[ki] for ki in queried]
    query = qkeys[0] if len(qkeys) == 1 else ", ".join(qkeys[:-1]) + ", and " + qkeys[-1]

    source = _haystack_source(spec)
    start = rng.randrange(len(source)) if spec.haystack == "essay" else 0

    def words(n: int) -> list[str]:
        return [source[(start + i) % len(source)] for i in range(n)]

    def make(ws: list[str]) -> tuple[str, str, int]:
        context, offsets = insert_needles(ws, needles)
        prompt = tmpl.prompt(context, query, spec, len(answers))
        return prompt, context, offsets[0]

    def n_tokens(ws: list[str]) -> int:
        return len(encode_prompt(tokenizer, make(ws)[0]))

    if n_tokens([]) > budget:
        raise ValueError(f"{spec.name} at length {length}: the template and needles alone take {n_tokens([])} tokens, "
                         f"more than length - max_new_tokens = {budget}; use lengths >= "
                         f"{n_tokens([]) + max_new_tokens} "
                         "or fewer --max-new-tokens")
    # largest word count that fits (exponential then binary search), then fill the last word by characters
    lo, hi = 0, 1
    while n_tokens(words(hi)) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if n_tokens(words(mid)) <= budget else (lo, mid)
    ws = words(lo)
    nxt = source[(start + lo) % len(source)]
    for cut in range(len(nxt) - 1, 0, -1):
        if n_tokens(ws + [nxt[:cut]]) <= budget:
            ws = ws + [nxt[:cut]]
            break
    prompt, context, needle_char = make(ws)
    first_needle = needles[0][1]
    ctx_start = tmpl.prompt(_CONTEXT_MARK, query, spec, len(answers)).index(_CONTEXT_MARK)
    ids = encode_prompt(tokenizer, prompt)
    needle_tok = len(encode_prompt(tokenizer, prompt[: ctx_start + needle_char]))
    ctx_a = len(encode_prompt(tokenizer, prompt[:ctx_start]))
    ctx_b = len(encode_prompt(tokenizer, prompt[: ctx_start + len(context)]))
    needle_end = len(encode_prompt(tokenizer, prompt[: ctx_start + needle_char + len(first_needle)]))
    return NeedleSample(task=spec.name, depth=depth, prompt=prompt, prompt_ids=ids, answers=answers, keys=keys,
                        needle_start=needle_tok, needle_tokens=needle_end - needle_tok, context_span=(ctx_a, ctx_b),
                        template=tmpl.name, length=length, index=index, extra={"query": query})


# ------------------------------------------------------------------------------------------ scoring


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """RULER's metric for one sample: fraction of references contained in the prediction (case-insensitive)."""
    if not references:
        raise ValueError("string_match_all needs at least one reference answer")
    pred = prediction.lower()
    return sum(1.0 for ref in references if ref.lower() in pred) / len(references)
