"""Haystack text that every machine already has (no download).

- noise: RULER's repeated noise sentences (`lctrain.data.needle.NOISE`: "The grass is green. The sky
  is blue. ..."), cycled.
- essay: the embedded corpus of the data pipeline (`lctrain.data.corpus.essay_sentences`: prose
  paragraphs of CPython's reference docs and the machine's license texts), as words. RULER uses
  Paul Graham's essays; this is our offline stand-in. Words are cycled when a haystack needs more.
"""
from __future__ import annotations

import functools

_MIN_ESSAY_WORDS = 2000


@functools.lru_cache(maxsize=1)
def noise_words() -> list[str]:
    from lctrain.data.needle import NOISE

    return NOISE.split()


@functools.lru_cache(maxsize=1)
def essay_words() -> list[str]:
    from lctrain.data.corpus import essay_sentences

    words = " ".join(essay_sentences()).encode("ascii", "ignore").decode().split()
    if len(words) < _MIN_ESSAY_WORDS:
        raise RuntimeError(f"the embedded corpus has only {len(words)} words of prose on this machine; "
                           "use the noise haystack (task s_niah_1) instead")
    return words
