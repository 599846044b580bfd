"""The documentation points at things that exist: every relative link `[text](path)` and every repo
path named in a tracked Markdown file (`lctrain/foo.py`, `docs/design.md`, `kernels/triton/`) resolves.

Repo paths are recognised by their first folder (one of the repository's top-level folders) and a file
extension or a trailing slash. Left alone: fenced code blocks (commands, outputs that a run creates),
arguments of options (`--json docs/results/new.json`), key=value overrides, globs and placeholders
(`docs/results/*.json`, `<out_dir>/slurm`, `runs/...`) and URLs.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP_FOLDERS = ("lctrain", "kernels", "parallel", "recipes", "slurm", "tests", "docs", ".ci")

_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_CODE_SPAN = re.compile(r"`([^`]+)`")
_PATH = re.compile(r"(?:%s)/(?:[\w.\-]+/)*(?:[\w.\-]+\.[A-Za-z0-9]+)?$" % "|".join(re.escape(f) for f in TOP_FOLDERS))
_TOP_FILE = re.compile(r"[A-Z][A-Z0-9_\-]*\.md$|pyproject\.toml$")  # README.md, BENCHMARKS.md, ... at the root
_NOT_A_PATH = set("*?<>{}$[]=") | {"..."}


def tracked_markdown(root: Path) -> list[Path]:
    """The Markdown files git tracks under root (every *.md outside hidden and virtual-env folders
    when root is not a git checkout)."""
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--", "*.md"], capture_output=True,
                             check=True, text=True).stdout
        files = [root / p for p in out.split("\0") if p]
        if files:
            return [f for f in files if f.is_file()]
    except (OSError, subprocess.CalledProcessError):
        pass
    return [p for p in root.rglob("*.md")
            if not any(part.startswith(".") or part in ("venv",
                                                        "node_modules") for part in p.relative_to(root).parts[:-1])]


def _prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        if not fenced:
            yield n, line


def _repo_paths(span: str):
    """Tokens of a code span or prose that name a repo path (see the module doc)."""
    tokens = span.split()
    for i, raw in enumerate(tokens):
        if i > 0 and tokens[i - 1].startswith("-"):
            continue  # an option's argument: may be an output that does not exist yet
        token = raw.lstrip("(\"'").rstrip(",;:.!?)\"'").split("::")[0]  # pytest node ids name their file first
        if token.startswith("./"):
            token = token[2:]
        if any(mark in token for mark in _NOT_A_PATH) or not (_PATH.match(token) or _TOP_FILE.match(token)):
            continue
        yield token


def broken_references(root: Path, md_files: list[Path]) -> list[str]:
    """'file:line: what' for each relative link or repo path in md_files that does not resolve."""
    problems = []
    for md in md_files:
        rel = md.relative_to(root)
        for n, line in _prose_lines(md.read_text(encoding="utf-8")):
            for target in _LINK.findall(line):
                if re.match(r"^[a-z][a-z0-9+.\-]*:", target) or target.startswith("#"):
                    continue  # URL, mail, anchor in the same file
                path = target.split("#", 1)[0]
                if path and not (md.parent / path).exists():
                    problems.append(f"{rel}:{n}: link target {target!r} does not exist")
            spans = _CODE_SPAN.findall(line)
            prose = _CODE_SPAN.sub(" ", _LINK.sub(" ", line))
            for text in spans + [prose]:
                for path in _repo_paths(text):
                    if not (root / path).exists() and not (md.parent / path).exists():
                        problems.append(f"{rel}:{n}: path {path!r} does not exist")
    return problems


def test_every_link_and_path_in_the_docs_resolves():
    md_files = tracked_markdown(ROOT)
    assert ROOT / "README.md" in md_files and ROOT / "docs" / "design.md" in md_files
    problems = broken_references(ROOT, md_files)
    assert not problems, "broken references in the Markdown files:\n" + "\n".join(problems)


def test_docs_named_in_the_code_exist():
    """Docstrings and comments that cite a note (`docs/design.md §3`, `docs/eval-notes.md`) cite one
    that is there."""
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--", "*.py", "*.sh", "*.yaml", "*.toml", "*.tmpl"],
                         capture_output=True, text=True).stdout.split()
    files = [ROOT / p for p in out] or [p for p in ROOT.rglob("*.py") if ".venv" not in p.parts]
    cited = re.compile(r"(?<![\w/.])(docs/[\w.\-/]+\.md)\b")
    here = Path(__file__).resolve()  # this file names missing notes on purpose (the test below)
    problems = [f"{f.relative_to(ROOT)}: {name}" for f in files if f.is_file() and f.resolve() != here
                for name in cited.findall(f.read_text(encoding="utf-8", errors="replace"))
                if not (ROOT / name).exists()]
    assert not problems, "notes cited in the code that do not exist:\n" + "\n".join(sorted(set(problems)))


def test_the_check_finds_broken_links_and_paths(tmp_path):
    (tmp_path / "lctrain").mkdir()
    (tmp_path / "lctrain" / "real.py").write_text("")
    (tmp_path / ".ci").mkdir()
    (tmp_path / ".ci" / "run.sh").write_text("")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.md").write_text("see [home](../README.md#top) and `lctrain/real.py`\n")
    readme = tmp_path / "README.md"
    readme.write_text(
        "Good: [notes](docs/notes.md), [web](https://example.org/x.md), `lctrain/`, lctrain/real.py, README.md,\n"
        "`bash .ci/run.sh`; not checked: `docs/results/*.json`, `<out>/a.py`, `runs/x.py`,\n"
        "`lctrain bench kernels --json docs/results/new.json` or `train.out_dir=docs/run.md`.\n"
        "```\nlctrain/in_a_code_block.py\n```\n"
        "Broken: [gone](docs/gone.md), `lctrain/missing.py`, also in prose (kernels/nope.py), DESIGN.md §3.\n")
    problems = broken_references(tmp_path, [readme, tmp_path / "docs" / "notes.md"])
    assert problems == [
        "README.md:7: link target 'docs/gone.md' does not exist",
        "README.md:7: path 'lctrain/missing.py' does not exist",
        "README.md:7: path 'kernels/nope.py' does not exist",
        "README.md:7: path 'DESIGN.md' does not exist",
    ], problems
