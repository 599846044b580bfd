"""Tokenizers: a byte-level one (no files needed) and a wrapper around a HF `tokenizers` tokenizer.json.

Both expose `encode(str) -> list[int]`, `decode(list[int]) -> str`, `vocab_size`, `bos_id`, `eos_id`,
`pad_id` and `name` (what identifies the vocabulary, used in dataset cache keys).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Sequence

from lctrain.errors import UserError


class TokenizerError(UserError, ValueError):
    """The tokenizer setting is wrong; the message says what to change."""


class ByteTokenizer:
    """ids 0..255 are the UTF-8 bytes of the text; then BOS=256, EOS=257, PAD=258 (vocab_size 259)."""

    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259
    name = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes back to text; special ids are dropped, broken UTF-8 becomes U+FFFD."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259)"


# Special-token spellings tried in order when a tokenizer.json does not say which is which.
_EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]", "<|im_end|>")
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|bos|>", "[CLS]", "<|startoftext|>")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>")


class HFTokenizer:
    """A HF `tokenizers` tokenizer loaded from a tokenizer.json file.

    `encode` adds no special tokens (documents are joined with EOS by the packer). EOS must exist in
    the vocabulary; BOS and PAD fall back to EOS when the vocabulary has none.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(os.path.expanduser(str(path)))
        if not path.is_file():
            raise TokenizerError(f"data.tokenizer: {str(path)!r} is not a file; pass 'byte' or the path of a HF "
                                 "tokenizer.json")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise TokenizerError(
                f"data.tokenizer={str(path)!r} needs the `tokenizers` package, which is not installed; "
                "run `pip install tokenizers` or use data.tokenizer=byte") from None
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"data.tokenizer: {str(path)!r} is not a valid HF tokenizer.json ({err})") from None
        self.path = path
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        vocab = self._tok.get_vocab(with_added_tokens=True)
        eos = _first_present(vocab, _EOS_NAMES)
        if eos is None:
            raise TokenizerError(f"data.tokenizer: {str(path)!r} has no end-of-text token (looked for "
                                 f"{', '.join(_EOS_NAMES)}); "
                                 "add one so that documents can be separated")
        self.eos_id = eos
        self.bos_id = _first_present(vocab, _BOS_NAMES, default=eos)
        self.pad_id = _first_present(vocab, _PAD_NAMES, default=eos)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        self.name = f"hf-{digest}"

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def _first_present(vocab: dict, names: Sequence[str], default: int | None = None) -> int | None:
    for n in names:
        if n in vocab:
            return int(vocab[n])
    return default


def get_tokenizer(data_cfg: Any) -> ByteTokenizer | HFTokenizer:
    """The tokenizer named by `data.tokenizer` ("byte" or a tokenizer.json path); also accepts the string itself."""
    spec = data_cfg if isinstance(data_cfg, (str, os.PathLike)) else data_cfg.tokenizer
    spec = str(spec)
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)


def check_vocab_size(model_vocab_size: int, tokenizer: Any) -> None:
    """The embedding must hold every token id: model.vocab_size >= tokenizer.vocab_size."""
    if int(model_vocab_size) < int(tokenizer.vocab_size):
        raise TokenizerError(
            f"model.vocab_size={model_vocab_size} is smaller than the tokenizer's vocabulary ({tokenizer.vocab_size} "
            f"ids, {tokenizer!r}); "
            f"set model.vocab_size >= {tokenizer.vocab_size} (rounded up to a multiple of parallel.tp)")


def check_model_vocab(cfg: Any) -> None:
    """`check_vocab_size` on a whole config (model.vocab_size vs the tokenizer of data.tokenizer), and
    model.document_end_id (when set) must be that tokenizer's EOS id. A synthetic task
    (data.source=synthetic:<task>) has its own ids, checked against the model by config.validate."""
    if str(cfg.data.source).startswith("synthetic:"):
        return
    tok = get_tokenizer(cfg.data)
    check_vocab_size(cfg.model.vocab_size, tok)
    end = getattr(cfg.model, "document_end_id", None)
    if end is not None and int(end) != int(tok.eos_id):
        raise TokenizerError(f"model.document_end_id={end} is not the EOS id of the tokenizer ({tok.eos_id}, {tok!r}), "
                             "which "
                             f"separates packed documents; set model.document_end_id={tok.eos_id} (or null for no "
                             "document masking)")
