"""The documentation keeps up with the code: every config field is documented,
the README stays short, and no relative link (file or heading) is broken in
README.md, docs/ or experiments/. Fast: reads files, the config schema and the
registries (nothing is compiled)."""

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from research.config import Config

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
README = REPO / "README.md"
README_MAX_LINES = 250


def schema_fields(cls=Config, prefix=""):
    """Dotted paths of every leaf field of the config schema (`model.d_model`, ...)."""
    hints = typing.get_type_hints(cls)
    paths = []
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        hint = hints[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            paths += schema_fields(hint, f"{path}.")
        else:
            paths.append(path)
    return paths


def test_schema_walk_finds_nested_fields():
    fields = schema_fields()
    assert "model.d_model" in fields and "train.steps" in fields
    assert not any(f in fields for f in ("model", "train"))  # sections are walked, not listed


def test_every_registered_name_is_documented():
    """Each name a config may use, from its registry (the CPU plugin's included), appears in
    docs/configuration.md as `name`."""
    from research import config, loggers, plugins

    text = (DOCS / "configuration.md").read_text()
    names = config.registered_names(["cpu"] if "cpu" in plugins.available_names() else [])
    names["logger backend"] = loggers.BACKENDS.names()
    missing = [f"{kind} {n}" for kind, ns in names.items() for n in ns if f"`{n}`" not in text]
    assert not missing, f"docs/configuration.md lacks these registered names: {', '.join(missing)}"


def test_every_config_field_is_documented():
    text = (DOCS / "configuration.md").read_text()
    missing = [f for f in schema_fields() if f"`{f}`" not in text]
    assert not missing, f"docs/configuration.md lacks these config fields: {', '.join(missing)}"


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; at most {README_MAX_LINES} (move detail to docs/)"


def _prose(text: str) -> str:
    """Markdown without fenced code blocks and inline code, where `](` is not a link."""
    text = re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in _prose_lines(path.read_text()):
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _prose_lines(text: str) -> list[str]:
    """Lines outside fenced code blocks, inline code kept (headings may hold code)."""
    return re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.M | re.S).splitlines()


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
PAGES = [README, *sorted(DOCS.glob("*.md")), *sorted((REPO / "experiments").glob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.relative_to(REPO)})")
    assert not broken, f"{page.relative_to(REPO)}: broken links: {'; '.join(broken)}"


def test_link_checker_sees_links():
    """Guards the checks above against a regex that silently matches nothing."""
    assert LINK.findall(_prose(README.read_text())), "no links found in README.md"
    assert _slug("Kernels: `model.attention` and `model.matmul`") == "kernels-modelattention-and-modelmatmul"
