"""The documentation: the site builds without a warning, and every Python example of the README
and of docs/ runs on its own in a fresh namespace from the repository root, as a reader pasting
one of them would run it (so no example leans on another's names, and none can rot)."""

from __future__ import annotations

import importlib.util
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [
    pytest.param(page, block, id=f"{page.name}:{number}")
    for page in PAGES
    for number, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S))
]


def test_every_page_is_in_the_site_and_has_examples() -> None:
    index = (ROOT / "docs" / "index.md").read_text()
    for page in PAGES[1:]:
        if page.name != "index.md":
            assert f"\n{page.stem}\n" in index, f"{page.name} is not in the index's toctree"
            assert f"(docs/{page.name})" in PAGES[0].read_text(), f"the README omits {page.name}"
    assert len(BLOCKS) >= 15


def test_site_builds_without_warnings(tmp_path: pathlib.Path) -> None:
    build = pytest.importorskip("sphinx.cmd.build")
    pytest.importorskip("myst_parser")
    status = build.build_main(["-W", "-q", "-b", "html", str(ROOT / "docs"), str(tmp_path)])
    assert status == 0
    api = (tmp_path / "api.html").read_text()
    for name in ("batchnorm.BatchNormalization", "batchnorm.torch.batch_norm", "Options"):
        assert name in api, f"the API reference lacks {name}"


@pytest.mark.parametrize(("page", "block"), BLOCKS)
def test_example_runs_on_its_own(
    page: pathlib.Path, block: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in ("torch", "jax", "flax", "optax", "mpi4py", "h5py"):
        if re.search(rf"^\s*(import|from) {module}\b|batchnorm\.{module}\b", block, re.M):
            if importlib.util.find_spec(module) is None:
                pytest.skip(f"the example needs {module}, which is not installed")
    monkeypatch.chdir(ROOT)  # the examples name files of the repository
    exec(compile(block, str(page), "exec"), {"__name__": "__example__"})
