"""Every Python code block in docs/ runs, as written, against the package.

How blocks are collected and run:

* every ``docs/**/*.md`` file is one test (``docs/zh/`` included);
* a fenced block whose info string starts with ``python`` is collected, e.g.
  ````` ```python `````;
* the blocks of one file run in order, in ONE fresh Python process, in one shared
  namespace (like the cells of a notebook), with the repository root as the
  working directory and on ``PYTHONPATH``;
* a block marked ``no-run`` after the language, ````` ```python no-run `````, is
  shown to readers but not run. Use it only for a snippet that cannot run in a
  test (one that blocks until Ctrl-C, binds a fixed port, needs a GPU or another
  machine) and keep such blocks rare;
* the process must exit 0 within ``RUN_TIMEOUT_S``; tracebacks name the Markdown
  file and its line numbers.

Runnable snippets therefore bind ``host="127.0.0.1", port=0`` and stop what they start.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List, NamedTuple

import pytest

from conftest import NEEDS_TORCH

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
#: Folders under docs/ whose blocks are not run, relative to docs/ (none: docs/zh/ runs too).
SKIPPED_DIRS: tuple = ()
#: The marker, after the language in a fence's info string, that keeps a block from running.
NO_RUN = "no-run"
#: Wall-clock limit for one file's blocks, all together.
RUN_TIMEOUT_S = 120

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>.*?)[ \t]*$")


class Block(NamedTuple):
    line: int  # 1-based line number of the block's first code line
    code: str
    run: bool


def extract_blocks(text: str) -> List[Block]:
    """The ```python blocks of a Markdown text, in order."""
    blocks: List[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        indent, fence, info = m.group("indent"), m.group("fence"), m.group("info")
        words = info.split()
        body: List[str] = []
        j = i + 1
        while j < len(lines):
            close = _FENCE.match(lines[j])
            if close is not None and close.group("info") == "":
                closing = close.group("fence")
                if closing[0] == fence[0] and len(closing) >= len(fence):
                    break
            line = lines[j]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            j += 1
        if words and words[0].lower() in ("python", "py", "python3"):
            code = "\n".join(body) + "\n"
            blocks.append(Block(line=i + 2, code=code, run=NO_RUN not in words[1:]))
        i = j + 1
    return blocks


def doc_files() -> List[Path]:
    if not DOCS.is_dir():
        return []
    skipped = [DOCS / d for d in SKIPPED_DIRS]
    return sorted(p for p in DOCS.rglob("*.md")
                  if not any(s == p or s in p.parents for s in skipped))


# Runs in the child: each block compiled under the Markdown file's name, padded so
# that line numbers in tracebacks are the file's own; one namespace for all.
_DRIVER = r"""
import json, sys
spec = json.load(sys.stdin)
namespace = {"__name__": "__main__", "__file__": spec["file"]}
for line, code in spec["blocks"]:
    exec(compile("\n" * (line - 1) + code, spec["file"], "exec"), namespace)
"""


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _python() -> List[str]:
    """This interpreter; with -P when it runs with -P (``make asan``), so that the working
    directory (the repository root) cannot shadow the build on PYTHONPATH."""
    return [sys.executable, "-P"] if getattr(sys.flags, "safe_path", False) else [sys.executable]


@pytest.mark.timeout(RUN_TIMEOUT_S + 30)
@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(DOCS)))
def test_doc_python_blocks_run(path: Path) -> None:
    blocks = [b for b in extract_blocks(path.read_text(encoding="utf-8")) if b.run]
    if not blocks:
        pytest.skip(f"{path.relative_to(ROOT)} has no runnable python blocks")
    if importlib.util.find_spec("torch") is None and any(
            re.search(r"^\s*(import|from) torch\b", b.code, re.MULTILINE) for b in blocks):
        pytest.skip(f"{path.relative_to(ROOT)}: {NEEDS_TORCH}")
    spec = {"file": str(path.relative_to(ROOT)), "blocks": [(b.line, b.code) for b in blocks]}
    try:
        proc = subprocess.run([*_python(), "-c", _DRIVER], input=json.dumps(spec), cwd=ROOT,
                              env=_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{spec['file']}: its blocks did not finish within {RUN_TIMEOUT_S} s\n"
                    f"--- stdout ---\n{e.stdout or ''}\n--- stderr ---\n{e.stderr or ''}")
    assert proc.returncode == 0, (
        f"{spec['file']}: exit code {proc.returncode}\n--- stdout ---\n{proc.stdout}\n"
        f"--- stderr ---\n{proc.stderr}")


def test_the_main_docs_exist_and_have_runnable_blocks() -> None:
    for name in ("quick-start.md", "api.md", "protocol.md", "extending.md", "zh/extending.md"):
        path = DOCS / name
        assert path.is_file(), f"missing {path.relative_to(ROOT)}"
        assert any(b.run for b in extract_blocks(path.read_text(encoding="utf-8"))), name


def test_extract_blocks() -> None:
    text = "\n".join([
        "# Title",
        "```python",
        "a = 1",
        "```",
        "```sh",
        "make test",
        "```",
        "```python no-run",
        "server.wait_for_termination()",
        "```",
        "- item:",
        "",
        "  ```python",
        "  b = a + 1",
        "  ```",
        "````python",
        "s = '''",
        "```",
        "'''",
        "````",
    ])
    assert extract_blocks(text) == [
        Block(3, "a = 1\n", True),
        Block(9, "server.wait_for_termination()\n", False),
        Block(14, "b = a + 1\n", True),
        Block(17, "s = '''\n```\n'''\n", True),
    ]


# -- what a reader follows: fences, links, anchors ---------------------------------------

_LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")
_CODE_MD = re.compile(r"`(?P<name>[\w./-]+\.md)`")


def _markdown_files() -> List[Path]:
    return doc_files() + [ROOT / "README.md"]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[`*_]", lambda m: "_" if m.group(0) == "_" else "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set:
    anchors = set()
    in_fence = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence and line.startswith("#"):
            anchors.add(_slug(line.lstrip("#")))
    return anchors


def _prose(text: str) -> str:
    """``text`` without its fenced blocks."""
    out, in_fence = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence:
            out.append(line)
    return "\n".join(out)


def _empty_fences(text: str) -> List[int]:
    """Line numbers of fenced blocks with nothing in them."""
    empty, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        j = i + 1
        while j < len(lines):
            close = _FENCE.match(lines[j])
            if close is not None and close.group("info") == "" and \
                    close.group("fence")[0] == m.group("fence")[0]:
                break
            j += 1
        if all(not line.strip() for line in lines[i + 1:j]):
            empty.append(i + 1)
        i = j + 1
    return empty


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_empty_code_blocks(path: Path) -> None:
    assert _empty_fences(path.read_text(encoding="utf-8")) == [], path


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_anchors_resolve(path: Path) -> None:
    text = _prose(path.read_text(encoding="utf-8"))
    broken = []
    for m in _LINK.finditer(re.sub(r"`[^`]*`", "", text)):
        target = m.group("target")
        if re.match(r"^[a-z]+:", target):
            continue  # http:, https:, mailto:
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target)
    # a Markdown file named in code (`name.md`) must exist too, somewhere in the project
    names = {p.name for p in ROOT.rglob("*.md") if ".venv" not in p.parts}
    broken += [m.group("name") for m in _CODE_MD.finditer(text)
               if Path(m.group("name")).name not in names]
    assert broken == [], f"{path.relative_to(ROOT)}: broken links {broken}"


@pytest.mark.parametrize("name", ["extending.md", "zh/extending.md"])
def test_the_guide_does_not_compare_itself_with_a_text_the_reader_has_not_seen(name: str) -> None:
    text = (DOCS / name).read_text(encoding="utf-8")
    for phrase in ("**Changed", "the guide's", "As in the guide", "原指南", "**更改"):
        assert phrase not in text, (name, phrase)


def test_slug() -> None:
    assert _slug(" The interceptors of the guide") == "the-interceptors-of-the-guide"
    assert _slug("Several compute functions (model_id)") == "several-compute-functions-model_id"
    assert _slug("`SparseTensorCodec`, and its bug") == "sparsetensorcodec-and-its-bug"
