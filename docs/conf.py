"""Sphinx configuration of batchnorm's documentation (built by tests/test_docs.py with warnings as
errors: `sphinx-build -W -b html docs docs/_build/html`)."""

from __future__ import annotations

import batchnorm

project = "batchnorm"
author = "the batchnorm authors"
release = version = batchnorm.__version__
copyright = "the batchnorm authors, Apache-2.0"

extensions = ["myst_parser", "sphinx.ext.autodoc"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3
html_theme = "alabaster"
html_title = f"batchnorm {release}"

# The API reference comes from the docstrings and signatures of the installed package.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": False}
