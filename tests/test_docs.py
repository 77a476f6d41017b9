"""The README and the pages under docs/: every relative link resolves to a file in the repository, and every
#anchor to a heading of its target, by GitHub's rules; and the README links every page."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)


def unfenced(text: str) -> str:
    """The text outside fenced code blocks."""
    return re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)


def prose(text: str) -> str:
    """The text outside code blocks and inline code, where a link is a link."""
    return re.sub(r"`[^`\n]*`", "", unfenced(text))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation dropped except - and _, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings; a repeated heading gets -1, -2... as on GitHub."""
    found = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", unfenced(page.read_text()), flags=re.MULTILINE):
        base, n = slug(heading), 0
        while (anchor := base if n == 0 else f"{base}-{n}") in found:
            n += 1
        found.add(anchor)
    return found


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """The relative links of a page that name no file of the repository, or no heading of their target."""
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:: outside the repository
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.is_file() or not file.is_relative_to(root):
            broken.append(f"{target} (no such file)")
        elif anchor and (file.suffix != ".md" or anchor not in anchors(file)):
            broken.append(f"{target} (no such heading)")
    return broken


def test_the_slug_follows_githubs_rules():
    assert slug("A real model: the paper's recipe on one GPU") == "a-real-model-the-papers-recipe-on-one-gpu"
    assert slug("Measured: `benchmarks/real_shape.py`") == "measured-benchmarksreal_shapepy"
    assert slug("OPSD against SFT and GRPO, in miniature") == "opsd-against-sft-and-grpo-in-miniature"


def test_the_checker_finds_broken_links_and_headings(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (tmp_path / "outside.md").write_text("# Outside\n")
    (repo / "a.md").write_text("# Top\n## Same\n## Same\n## With `code.py`\n```\n# Fenced\n[x](nowhere.md)\n```\n")
    (repo / "b.md").write_text(
        "[ok](a.md#top) [ok](a.md#same-1) [ok](#local) [ok](a.md#with-codepy) `[code](nowhere.md)`\n"
        "[web](https://example.com/x)\n## Local\n[bad](missing.md) [bad](a.md#fenced) [bad](a.md#same-2)\n"
        "![bad](missing.png) [bad](../outside.md)\n")
    assert broken_links(repo / "a.md", repo) == []
    assert broken_links(repo / "b.md", repo) == [
        "missing.md (no such file)", "a.md#fenced (no such heading)", "a.md#same-2 (no such heading)",
        "missing.png (no such file)", "../outside.md (no such file)"]


def test_every_link_in_the_readme_and_docs_resolves():
    assert len(PAGES) > 5  # the pages are really found
    links = sum(len(LINK.findall(prose(page.read_text()))) for page in PAGES)
    assert links > 30  # and their links really read
    broken = {page.relative_to(ROOT).as_posix(): broken_links(page) for page in PAGES}
    assert not {page: links for page, links in broken.items() if links}


def test_the_readme_links_every_page_of_the_docs():
    targets = LINK.findall(prose((ROOT / "README.md").read_text()))
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in targets}
    assert [page.name for page in PAGES[1:] if page not in linked] == []
