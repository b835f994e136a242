"""The reading guide in docs/ runs: every `>>>` example passes, each page has examples, every link resolves.

Each page is a doctest file (`doctest.testfile`), run on the packaged self-check model and on config
arithmetic over the published shapes, so a guide that drifts from the code fails here.
"""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
# The fewest examples each page must run: a page whose examples were lost (a broken fence, a deleted
# block) fails here instead of passing with nothing checked. A new page needs its own entry.
MIN_EXAMPLES = {"README.md": 4, "forward_pass.md": 60, "numerics.md": 35, "kernels.md": 15, "oracle.md": 25}
_LINK = re.compile(r"\]\(([^)\s]+)\)")  # the target of a Markdown link
_TEST_NAME = re.compile(r"`(test_\w+)`")


def test_every_page_has_a_minimum_number_of_examples():
    assert sorted(p.name for p in DOCS.glob("*.md")) == sorted(MIN_EXAMPLES)


@pytest.mark.parametrize("page", sorted(MIN_EXAMPLES))
def test_every_example_of_the_page_passes(page):
    result = doctest.testfile(str(DOCS / page), module_relative=False, report=True,
                              optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of docs/{page} failed (output above)"
    assert result.attempted >= MIN_EXAMPLES[page], f"docs/{page} ran {result.attempted} examples"


@pytest.mark.parametrize("page", sorted(MIN_EXAMPLES))
def test_every_relative_link_and_cited_test_of_the_page_exists(page):
    text = (DOCS / page).read_text(encoding="utf-8")
    links = [t.split("#")[0] for t in _LINK.findall(text) if not t.startswith(("http://", "https://", "#"))]
    assert [t for t in links if not (DOCS / t).exists()] == []
    defined = set(re.findall(r"^def (test_\w+)", "".join(
        p.read_text(encoding="utf-8") for p in (REPO / "tests").glob("test_*.py")), re.MULTILINE))
    assert [name for name in _TEST_NAME.findall(text) if name not in defined] == []
