"""The README's code blocks run exactly as written (blocks marked ``<!-- readme-test: NAME -->``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = dict(re.findall(r"<!-- readme-test: (\w+) -->\s*```python\n(.*?)```", README.read_text(), re.S))


def test_readme_has_its_examples():
    assert "plain" in BLOCKS


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_readme_example_runs(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(BLOCKS[name], f"README:{name}", "exec"), namespace)
