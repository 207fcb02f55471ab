"""The documentation stays true to the tree: the configuration reference is the one generated from the settings
models, every relative link in README.md and docs/ reaches a file (and a heading, where it names one), and no
internal issue numbers ("issue 9") are left in docs, code or comments: they mean nothing to a reader, so the
text names the feature instead. Milliseconds, no model.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

# Where an issue number must not appear. pyproject.toml is left out on purpose (its owner edits it).
ISSUE_SCOPE = ["README.md", "docs", "server", "compression", "kernels", "scripts"]
ISSUE_NUMBER = re.compile(r"\bissues?\s+#?\d+", re.IGNORECASE)
TEXT_SUFFIXES = {".md", ".py", ".txt", ".yaml", ".yml", ".json", ".jsonl", ".sh", ".toml", ".cfg", ".ini", ""}


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", ROOT / "scripts" / "gen_config_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_is_current() -> None:
    gen = _generator()
    committed = gen.OUT.read_text(encoding="utf-8") if gen.OUT.exists() else ""
    generated = gen.render()
    if committed != generated:
        diff = "".join(list(difflib.unified_diff(committed.splitlines(keepends=True),
                                                 generated.splitlines(keepends=True),
                                                 "docs/configuration.md", "generated"))[:80])
        pytest.fail("docs/configuration.md is stale: run `.venv/bin/python scripts/gen_config_reference.py`\n" + diff)


# ------------------------------------------------------------------------------ links
_FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.MULTILINE)


def _prose(text: str) -> str:
    """The text without fenced code blocks (their lines kept blank, so line numbers hold)."""
    return _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: links reduced to their text, code marks and punctuation dropped,
    lowercase, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return "".join("-" if ch == " " else ch for ch in text if ch.isalnum() or ch in " -_")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for match in _HEADING.finditer(_prose(path.read_text(encoding="utf-8"))):
        base = github_anchor(match.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    text = _prose(path.read_text(encoding="utf-8"))
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for match in _LINK.finditer(_INLINE_CODE.sub("", line)):
            out.append((lineno, match.group(1)))
    return out


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """The links of one page whose file, or heading, does not exist (shown relative to `root`)."""
    problems = []
    for lineno, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / unquote(file_part)).resolve() if file_part else path
        where = f"{path.relative_to(root)}:{lineno}: {target}"
        if not dest.exists():
            problems.append(f"{where} (no such file)")
        elif anchor and dest.suffix == ".md" and unquote(anchor).lower() not in anchors(dest):
            problems.append(f"{where} (no heading with anchor #{anchor} in {dest.relative_to(root)})")
    return problems


def test_every_relative_link_in_the_docs_resolves() -> None:
    assert len(MARKDOWN) > 5, "README.md and docs/ should be found"
    problems = [p for path in MARKDOWN for p in broken_links(path)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_link_checker_finds_broken_links(tmp_path: Path) -> None:
    (tmp_path / "there.md").write_text("# A heading, with `code`\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md) [ok](there.md#a-heading-with-code) [ok](there.md#twice-1) [ok](#mine)\n"
                    "[web](https://example.com/x) `[in code](missing.md)`\n\n```\n[in a block](missing.md)\n```\n\n"
                    "# Mine\n\n[gone](missing.md) ![gone too](img/none.png) [bad anchor](there.md#nowhere)\n")
    assert [p.split(": ", 1)[1] for p in broken_links(page, tmp_path)] == [
        "missing.md (no such file)", "img/none.png (no such file)",
        "there.md#nowhere (no heading with anchor #nowhere in there.md)"]


# ------------------------------------------------------------------------------ issue numbers
def _scoped_files() -> list[Path]:
    files = []
    for name in ISSUE_SCOPE:
        top = ROOT / name
        candidates = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        files += [p for p in candidates if p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts]
    return files


def issue_numbers(paths: list[Path]) -> list[str]:
    hits = []
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if ISSUE_NUMBER.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    return hits


def test_no_internal_issue_numbers_in_docs_code_or_comments() -> None:
    files = _scoped_files()
    assert any(p.suffix == ".py" for p in files) and any(p.suffix == ".md" for p in files)
    hits = issue_numbers(files)
    assert not hits, "name the feature instead of an internal issue number:\n" + "\n".join(hits)


@pytest.mark.parametrize("line, found", [
    ("# for 2+ threads (issue 9).", True),
    ("Evidence for Issue 10: students", True),
    ("see issues 11 and 12", True),
    ("reported as issue #12", True),
    ("Known issue: the penalties are not forwarded.", False),
    ("tissue 3 of the sample", False),
])
def test_the_issue_pattern(line: str, found: bool) -> None:
    assert bool(ISSUE_NUMBER.search(line)) is found
