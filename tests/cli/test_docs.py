"""The documentation stays true: docs/configuration.md's generated reference equals what
the options' own metadata gives now, the README's links (and the docs/ files they lead to)
exist, and the README stays short.

No MPI and no writes: plain reads, valid in-process at any world size (every rank checks
the same files) and under plain pytest.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from pathlib import Path

import pytest

from mpitrain import docs
from mpitrain.options import opt

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
CONFIGURATION = ROOT / "docs" / "configuration.md"
MAX_README_LINES = 300

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)


def _prose(text: str) -> str:
    """Markdown without fenced code blocks and inline code (no links there)."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors of a Markdown file."""
    out, counts = set(), {}
    for line in FENCE.sub("", text).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _broken_links(path: Path) -> list[str]:
    text = path.read_text()
    bad = []
    for target in LINK.findall(_prose(text)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path.resolve()
        shown = dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest
        if not dest.exists():
            bad.append(f"{target}: no such file {shown}")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text()):
            bad.append(f"{target}: no heading #{anchor} in {shown}")
    return bad


@dataclasses.dataclass(frozen=True)
class Inner:
    ratio: float = opt(0.5, gt=0.0, max=1.0, help="a | b")


@dataclasses.dataclass(frozen=True)
class Outer:
    period: int = opt(4, gt=0, help="steps")
    inner: Inner = dataclasses.field(default_factory=Inner)


def test_configuration_reference_matches_the_code():
    text = CONFIGURATION.read_text()
    start, end = docs.generated_block(text, str(CONFIGURATION))
    have, want = text[start:end].strip("\n"), docs.reference().strip("\n")
    if have != want:
        diff = list(difflib.unified_diff(have.splitlines(), want.splitlines(), "docs/configuration.md", "the code",
                                         lineterm="", n=0))
        pytest.fail("docs/configuration.md's generated configuration reference disagrees with the options in "
                    f"the code; regenerate it with `{docs.REGENERATE}` (after `. .venv/bin/activate`) and "
                    "commit the result:\n" + "\n".join(diff[:40]), pytrace=False)


def test_reference_covers_every_key_and_nested_tables():
    import typing

    from mpitrain import config
    from mpitrain.sync import REGISTRY

    ref = docs.reference()
    hints = typing.get_type_hints(config.Config)
    for section in ("model", "data", "optim", "train", "output"):
        for f in dataclasses.fields(hints[section]):
            assert f"| `{f.name}` |" in ref.split(f"### `[{section}]`")[1].split("###")[0], (section, f.name)
    for name, cls in REGISTRY.items():
        assert f"### `[sync.{name}]`" in ref
        for f in dataclasses.fields(cls.Options):
            nested = dataclasses.is_dataclass(getattr(cls.Options(), f.name))
            row = f"### `[sync.{name}.{f.name}]`" if nested else f"| `{f.name}` |"
            assert row in ref.split(f"### `[sync.{name}]`")[1], (name, f.name)
    try:  # the compressors' own keys, where there is a registry of them
        from mpitrain.sync.compress import REGISTRY as COMPRESSORS
    except ImportError:
        COMPRESSORS = {}
    for name in COMPRESSORS:
        assert f'with `kind = "{name}"`' in ref, name

    # an options table nested in a field renders as [parent.field]
    lines = docs._table(Outer, "sync.x", set())
    assert "### `[sync.x.inner]`" in lines
    assert "| `ratio` | float | `0.5` | > 0.0; ≤ 1.0 | a \\| b |" in lines


def test_readme_links_resolve_and_docs_are_reachable():
    bad = [f"README.md: {b}" for b in _broken_links(README)]
    for md in sorted((ROOT / "docs").glob("*.md")):
        bad += [f"docs/{md.name}: {b}" for b in _broken_links(md)]
    assert not bad, "broken links:\n" + "\n".join(bad)
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in LINK.findall(_prose(README.read_text()))}
    orphans = [md.name for md in sorted((ROOT / "docs").glob("*.md")) if md.resolve() not in linked]
    assert not orphans, f"docs/ files the README does not link: {orphans}"


def test_readme_is_short_and_starts_with_the_two_commands():
    text = README.read_text()
    n = len(text.splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}): move detail into docs/"
    first = FENCE.search(text).group(0).splitlines()[1:3]
    assert [line.split("#")[0].strip() for line in first] == ["bash scripts/demo.sh", "bash scripts/test.sh"], first
