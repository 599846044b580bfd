"""`lctrain data prepare`: tokenize text, pack it into samples of seq_len + 1 tokens, write MDS shards.

    lctrain data prepare --out DIR [--input PATH ...] [--text-field text] [--seq-len 512]
                         [--tokenizer byte|tokenizer.json] [--needle-fraction 0] [--num-samples N]
                         [--seed 0] [--overwrite]

Without --input the embedded corpus is used (the text of the default job). Inputs: .txt/.md files
(one document each), .jsonl files (one JSON object per line, the document in --text-field), or
directories (searched recursively for those, in sorted order). Documents are joined with EOS.
--needle-fraction mixes in synthetic passkey/needle samples. The output is written atomically and an
existing directory is refused unless --overwrite.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Iterator, Sequence

from lctrain.data.corpus import embedded_documents
from lctrain.data.embedded import mix_samples
from lctrain.data.mds import DatasetExistsError, write_mds
from lctrain.data.packing import pack_documents, packed_epochs, token_dtype
from lctrain.data.tokenizer import TokenizerError, get_tokenizer
from lctrain.errors import UserError

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson")


class PrepareError(UserError, ValueError):
    """Bad input to `lctrain data prepare`; the message says what to change."""


def _input_files(paths: Sequence[str], flag: str = "--input") -> list[Path]:
    files: list[Path] = []
    for p in paths:
        path = Path(p).expanduser()
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES)
            if not found:
                raise PrepareError(f"{flag} {p}: the directory holds no {'/'.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} "
                                   "files")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise PrepareError(f"{flag} {p}: no such file or directory")
    return files


def _read_text(f: Path, flag: str) -> str:
    """A text file's contents; a binary file (NUL bytes, or not UTF-8) is refused, not tokenized as text."""
    data = f.read_bytes()
    if b"\0" in data[: 1 << 20]:
        raise PrepareError(f"{flag} {f}: looks like a binary file (it holds NUL bytes); pass UTF-8 text, .jsonl or an "
                           "MDS folder")
    text = data.decode("utf-8", errors="replace")
    bad = text.count("\ufffd")
    if bad > max(8, len(text) // 100):
        raise PrepareError(f"{flag} {f}: is not UTF-8 text ({bad} undecodable bytes); convert it to UTF-8 or pass "
                           "another file")
    return text


def iter_documents(paths: Sequence[str], text_field: str = "text", flag: str = "--input") -> Iterator[str]:
    """Documents of the input files, in order. `flag` names the option in error messages."""
    for f in _input_files(paths, flag):
        if f.suffix in JSONL_SUFFIXES:
            with f.open(encoding="utf-8", errors="replace") as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise PrepareError(f"{f}:{n}: not valid JSON ({err.msg})") from None
                    if not isinstance(obj, dict) or text_field not in obj:
                        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                        raise PrepareError(f"{f}:{n}: no field {text_field!r} (found {keys}); pass --text-field NAME")
                    if not isinstance(obj[text_field], str):
                        raise PrepareError(f"{f}:{n}: field {text_field!r} is not a string")
                    yield obj[text_field]
        else:
            yield _read_text(f, flag)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="lctrain data prepare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True,
                    help="output directory of the MDS dataset (must not exist unless --overwrite)")
    ap.add_argument("--input", nargs="+", default=None, metavar="PATH",
                    help="text/jsonl files or directories (default: the embedded corpus)")
    ap.add_argument("--text-field", default="text", help="JSON field holding the document in .jsonl inputs")
    ap.add_argument("--seq-len", type=int, default=512, help="training context length; samples hold seq_len + 1 tokens")
    ap.add_argument("--tokenizer", default="byte", help="'byte' or the path of a HF tokenizer.json")
    ap.add_argument("--needle-fraction", type=float, default=0.0,
                    help="share of synthetic passkey/needle samples in [0, 1]")
    ap.add_argument("--num-samples", type=int, default=None,
                    help="number of samples; default: one pass over the text (plus the needle share); more repeats the "
                         "text reshuffled")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return ap.parse_args(list(argv))


def prepare(args: argparse.Namespace) -> Path:
    if args.seq_len < 2:
        raise PrepareError(f"--seq-len must be >= 2, got {args.seq_len}")
    if not 0.0 <= args.needle_fraction <= 1.0:
        raise PrepareError(f"--needle-fraction must lie in [0, 1], got {args.needle_fraction}")
    if args.num_samples is not None and args.num_samples < 1:
        raise PrepareError(f"--num-samples must be >= 1, got {args.num_samples}")
    out = Path(args.out).expanduser()
    if out.exists() and not args.overwrite:
        raise DatasetExistsError(f"{out} already exists; choose another --out or pass --overwrite")
    tok = get_tokenizer(args.tokenizer)
    length = args.seq_len + 1
    docs = iter_documents(args.input, args.text_field) if args.input else iter(embedded_documents())
    doc_ids = [tok.encode(d) for d in docs]
    if args.num_samples is not None:
        n_needle = round(args.needle_fraction * args.num_samples)
        n_text = args.num_samples - n_needle
        text = packed_epochs(doc_ids, length, tok.eos_id, n_text, args.seed) if n_text else []
    else:
        if args.needle_fraction >= 1.0:
            raise PrepareError("--needle-fraction 1 leaves no text to count samples by; pass --num-samples N")
        text = list(pack_documents(doc_ids, length, tok.eos_id))
        if not text:
            raise PrepareError(f"the input holds fewer than {length} tokens (one sample of --seq-len {args.seq_len} + "
                               "1); give more text or a shorter --seq-len")
        f = args.needle_fraction
        n_needle = math.ceil(f * len(text) / (1.0 - f)) if f > 0 else 0
    samples, masks = mix_samples(text, n_needle, tok, length, args.seed)
    meta = {"source": "prepare", "inputs": [str(p) for p in (args.input or ["<embedded>"])], "tokenizer": tok.name,
            "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "seq_len": args.seq_len,
            "needle_fraction": args.needle_fraction, "seed": args.seed}
    return write_mds(out, samples, answer_masks=masks if n_needle else None, sample_len=length,
                     dtype=token_dtype(tok.vocab_size), meta=meta, overwrite=args.overwrite)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        out = prepare(args)
    except (PrepareError, TokenizerError, DatasetExistsError, ValueError) as err:
        print(f"lctrain data prepare: {err}", file=sys.stderr)
        return 2
    from lctrain.data.mds import read_meta

    meta = read_meta(out)
    print(f"wrote {meta['num_samples']} samples of {meta['sample_len']} tokens ({meta['dtype']}) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
