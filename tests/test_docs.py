"""Every ```python block of the documentation runs (outputs are refreshed with docs/examples.py fill)."""

import importlib.util
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(p for p in DOCS.glob("*.md") if "```python" in p.read_text())


def _tool():
    spec = importlib.util.spec_from_file_location("doc_examples", DOCS / "examples.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_documentation_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    results = _tool().run(str(page))
    assert results, f"{page.name} has no runnable examples"
