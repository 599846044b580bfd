"""The embedded corpus: real English text every machine already has, so the default job downloads nothing.

Sources, in this fixed order: CPython's `pydoc_data.topics` (always present), then the Debian license
texts in /usr/share/common-licenses/* and /usr/share/doc/**/copyright when the machine has them.
Each source file (or pydoc topic) is one document of plain-text paragraphs; code blocks, grammar
rules and heading underlines are dropped; a paragraph seen before (license texts repeat a lot) is
dropped too. Which files exist depends on the machine, so `corpus_fingerprint` goes into cache keys.
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path

LICENSE_DIRS = ("/usr/share/common-licenses",)
DOC_DIR = "/usr/share/doc"

_RULE = re.compile(r"^\s*([*=\-~^#+_.])\1{2,}\s*$")


# the ASCII characters that are letters or whitespace (str.isalpha / str.isspace), for bytes.translate
_ASCII_LETTERS_AND_SPACES = bytes(c for c in range(128) if chr(c).isalpha() or chr(c).isspace())


def _letters_and_spaces(para: str) -> int:
    """How many characters of `para` are letters or whitespace. ASCII text (nearly all of it) is
    counted in C: this used to be a per-character generator, ~2.5 s of every process that opened the
    embedded dataset (each rank of a launch)."""
    if para.isascii():
        return len(para) - len(para.encode("ascii").translate(None, _ASCII_LETTERS_AND_SPACES))
    return sum(n for c, n in Counter(para).items() if c.isalpha() or c.isspace())


def _paragraphs(text: str) -> list[str]:
    """Plain prose paragraphs of `text`, each on one line."""
    out = []
    for block in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        lines = [ln for ln in block.split("\n") if ln.strip() and not _RULE.match(ln)]
        if not lines:
            continue
        if all(ln.startswith("   ") for ln in lines) and any(c in block for c in "()[]{}=:"):
            continue  # an indented code / grammar block
        para = " ".join(" ".join(ln.strip() for ln in lines).split())  # whitespace runs -> one space
        if len(para.split()) < 4 or ">>>" in para or "::=" in para:
            continue
        if _letters_and_spaces(para) < 0.8 * len(para):
            continue
        out.append(para)
    return out


def _source_texts() -> list[tuple[str, str]]:
    """(name, raw text) of every source, in the fixed order."""
    from pydoc_data.topics import topics

    sources = [(f"pydoc:{key}", topics[key]) for key in sorted(topics)]
    files: list[Path] = []
    for d in LICENSE_DIRS:
        p = Path(d)
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.is_file())
    doc = Path(DOC_DIR)
    if doc.is_dir():
        files += sorted(f for f in doc.glob("*/copyright") if f.is_file())
    for f in files:
        try:
            sources.append((str(f), f.read_text(encoding="utf-8", errors="replace")))
        except OSError:
            continue
    return sources


@lru_cache(maxsize=1)
def _documents() -> tuple[str, ...]:
    seen: set[str] = set()
    docs = []
    for _name, text in _source_texts():
        keep = []
        for para in _paragraphs(text):
            key = hashlib.sha1(para.encode("utf-8")).hexdigest()
            if key in seen:
                continue
            seen.add(key)
            keep.append(para)
        if keep:
            docs.append("\n\n".join(keep))
    return tuple(docs)


def embedded_documents() -> list[str]:
    """The corpus as a list of documents (plain text, paragraphs separated by blank lines)."""
    return list(_documents())


def corpus_fingerprint() -> str:
    """A short hash of the whole corpus: differs between machines with different /usr/share/doc."""
    h = hashlib.sha256()
    for d in _documents():
        h.update(d.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:12]


def essay_sentences() -> list[str]:
    """The corpus split into sentences (the haystack of the essay needle tasks), in corpus order."""
    return list(_essay_sentences())


@lru_cache(maxsize=1)
def _essay_sentences() -> tuple[str, ...]:
    out = []
    for doc in _documents():
        for para in doc.split("\n\n"):
            for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'(])", para):
                s = s.strip()
                if len(s) < 20:
                    continue
                words = s.split()  # long run-ons (license headers) are cut into ~25-word pieces
                for j in range(0, len(words), 25):
                    out.append(" ".join(words[j:j + 25]))
    return tuple(out)
