"""The README's Python examples run as written, each on its own in a fresh namespace from the
repository root, as a reader pasting one of them would run it: the documentation cannot rot, and
no example leans on names another one defined."""

from __future__ import annotations

import importlib.util
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_readme_has_examples() -> None:
    assert len(BLOCKS) >= 10


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs_on_its_own(block: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("torch", "jax"):
        if re.search(rf"^import {module}\b|^import batchnorm\.{module}\b", block, re.M):
            if importlib.util.find_spec(module) is None:
                pytest.skip(f"the example needs {module}, which is not installed")
    monkeypatch.chdir(README.parent)  # the examples name files of the repository
    exec(compile(block, str(README), "exec"), {"__name__": "__readme__"})
