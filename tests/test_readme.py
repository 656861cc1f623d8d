"""What a newcomer checks in README.md and docs/: the contents and every relative link lead
somewhere, the `moebus` and `make` commands they would paste work with this code, and the
quick start is on the first screen. No command is run: each is parsed by the real CLI parser."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.cli import parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
FIRST_SCREEN = 60  # lines a newcomer sees before scrolling

FENCE = re.compile(r"^\s*```")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"`[^`]*`")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


@dataclass(frozen=True)
class Line:
    page: Path
    number: int  # 1-based, where the (first physical) line starts
    text: str
    in_code: bool
    lang: str = ""  # the fence's language, in code

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.number}"


def lines(page: Path) -> list[Line]:
    out: list[Line] = []
    in_code, lang = False, ""
    for n, raw in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(raw):  # an opening fence names the language, a closing one nothing
            lang = "" if in_code else raw.strip().removeprefix("```").strip()
            in_code = not in_code
            continue
        out.append(Line(page, n, raw, in_code, lang))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, markup and punctuation dropped."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out: set[str] = set()
    for line in lines(page):
        m = HEADING.match(line.text)
        if line.in_code or not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[tuple[Line, str]]:
    return [(line, target) for line in lines(page) if not line.in_code
            for target in LINK.findall(INLINE_CODE.sub("", line.text))]


def code_commands(page: Path) -> list[Line]:
    """Logical command lines of the code blocks: `\\` continuations joined, `$ ` prompts dropped."""
    out: list[Line] = []
    pending: Line | None = None
    for line in lines(page):
        if not line.in_code:
            pending = None
            continue
        text = line.text.strip()
        if pending is not None:
            text, start = pending.text + " " + text, pending
        else:
            text, start = text.removeprefix("$ "), line
        if text.endswith("\\"):
            pending = Line(page, start.number, text[:-1].rstrip(), True, line.lang)
            continue
        pending = None
        out.append(Line(page, start.number, text, True, line.lang))
    return out


def argv_of(command: str) -> list[str] | None:
    """The moebus arguments of one shell line (`moebus ...`, `.venv/bin/moebus ...`, or
    `make run ARGS="..."`, which runs `moebus up`), or None when it runs something else."""
    try:
        words = shlex.split(command, comments=True)
    except ValueError:
        return None
    for i, w in enumerate(words):  # only the first command of `a && b`, `a | b`, `a; b`
        if w in ("&&", "||", "|", ";"):
            words = words[:i]
            break
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):  # VAR=value prefixes
        words = words[1:]
    if words and Path(words[0]).name == "moebus":
        return words[1:]
    if words[:2] == ["make", "run"]:
        given = [w.removeprefix("ARGS=") for w in words[2:] if w.startswith("ARGS=")]
        return ["up", *shlex.split(given[0])] if given else ["up"]
    return None


MOEBUS_LINES = [(line, argv) for page in PAGES for line in code_commands(page)
                if (argv := argv_of(line.text)) is not None]


def test_the_pages_hold_moebus_commands_to_check():
    # the extractor finding nothing would make the parse test below pass vacuously
    assert len([1 for line, _ in MOEBUS_LINES if line.page == README]) >= 8, MOEBUS_LINES
    assert {argv[0] for _, argv in MOEBUS_LINES} >= {"up", "init-cluster", "worker", "router", "gateway", "perfmodel"}


@pytest.mark.parametrize("line,argv", MOEBUS_LINES, ids=[line.where() for line, _ in MOEBUS_LINES])
def test_every_moebus_command_in_a_code_block_parses(line: Line, argv: list[str]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            parser().parse_args(argv)
        except SystemExit as e:
            code = e.code
        else:
            code = 0
    assert code == 0, f"{line.where()}: `{line.text}` is refused by moebus:\n{err.getvalue()}"


def test_the_table_of_contents_lists_every_section_and_each_link_resolves():
    body = lines(README)
    start = next(i for i, line in enumerate(body) if line.text.strip() == "## Contents")
    end = next(i for i in range(start + 1, len(body)) if body[i].text.startswith("## "))
    entries = [target for line in body[start:end] for target in LINK.findall(line.text)]
    own = anchors(README)
    assert entries, "the Contents section has no links"
    broken = [t for t in entries if not t.startswith("#") or t[1:] not in own]
    assert not broken, f"contents entries that lead to no heading of README.md: {broken}"
    sections = {slug(HEADING.match(line.text).group(2)) for line in body
                if not line.in_code and line.text.startswith("## ")} - {"contents"}
    missing = sections - {t[1:] for t in entries}
    assert not missing, f"sections of README.md missing from its contents: {sorted(missing)}"


def test_every_relative_link_resolves_to_a_file_and_heading():
    broken: list[str] = []
    for page in PAGES:
        for line, target in links(page):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{line.where()}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{line.where()}: {target} (no such heading in {dest.name})")
    assert not broken, "\n".join(broken)


def test_every_page_of_docs_is_linked_from_the_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for _, t in links(README)}
    assert DOCS, "no docs/*.md"
    orphans = [d.name for d in DOCS if d.resolve() not in linked]
    assert not orphans, f"docs pages no README link leads to: {orphans}"


def _makefile() -> tuple[set[str], set[str]]:
    text = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", text, re.M))
    variables = set(re.findall(r"\$\((\w+)\)", text))
    return targets, variables


def _make_invocations() -> list[tuple[Line, list[str]]]:
    found: list[tuple[Line, list[str]]] = []
    for page in PAGES:
        for line in lines(page):
            spans = [line.text] if line.in_code else [s.strip("`") for s in INLINE_CODE.findall(line.text)]
            for span in spans:
                for m in re.finditer(r"(?:^|[\s;&|(])make((?:\s+(?:[A-Z_]+=(?:\"[^\"]*\"|'[^']*'|\S+)|[a-z][\w.-]*))+)", span):
                    try:
                        words = shlex.split(m.group(1), comments=True)
                    except ValueError:
                        words = m.group(1).split()
                    found.append((line, words))
    return found


def test_every_make_target_and_variable_named_exists_in_the_makefile():
    targets, variables = _makefile()
    calls = _make_invocations()
    assert len(calls) >= 5, calls
    wrong = []
    for line, words in calls:
        for w in words:
            name, eq, _ = w.partition("=")
            if eq and name not in variables:
                wrong.append(f"{line.where()}: make {' '.join(words)}: the Makefile reads no $({name})")
            elif not eq and w not in targets:
                wrong.append(f"{line.where()}: make {' '.join(words)}: no target {w!r}")
    assert not wrong, "\n".join(wrong)


def test_python_examples_compile():
    blocks: dict[tuple[Path, int], list[str]] = {}
    for page in PAGES:
        block_start = None
        for line in lines(page):
            if line.in_code and line.lang == "python":
                block_start = block_start or line.number
                blocks.setdefault((page, block_start), []).append(line.text)
            else:
                block_start = None
    assert blocks, "no python example"
    for (page, n), body in blocks.items():
        compile("\n".join(body), f"{page.name}:{n}", "exec")


def test_the_first_screen_has_the_contents_and_the_quick_start():
    screen = lines(README)[:FIRST_SCREEN]
    prose = "\n".join(line.text for line in screen if not line.in_code)
    code = [line.text.strip() for line in screen if line.in_code]
    assert "## Contents" in prose
    assert "## Quick start" in prose
    assert any(c.startswith("make run") for c in code), "the quick start's `make run` is not on the first screen"
    assert "3.11" in prose and "PYTHON=" in prose, "Python >= 3.11 and the PYTHON= override are not on the first screen"
    assert "pip install openai" in prose, "the client example's install step is not on the first screen"
    assert "#status-what-has-run-where" in prose, "the Mac path's status is not pointed to from the first screen"
