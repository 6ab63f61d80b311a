"""Sphinx configuration: the API reference from the docstrings, the long pages in Markdown.

Build with ``make docs`` (warnings are errors, as in CI).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an install
import pyro_ladder  # noqa: E402

project = "pyro_ladder"
author = "pyro_ladder developers"
copyright = "2026, pyro_ladder developers"
release = pyro_ladder.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # the numpy-style blocks some docstrings use
    "sphinx.ext.mathjax",
    "myst_parser",  # the long pages moved from the README stay Markdown
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "results"]  # results/ holds figures and JSON, not pages

autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_inherit_docstrings = False  # our overrides only, not Lightning's or Pyro's own text
autodoc_typehints = "description"  # signatures stay readable; types go in the field list
napoleon_google_docstring = False
myst_heading_anchors = 4  # README-style links to "page.md#a-heading"

html_theme = "furo"
html_title = f"pyro_ladder {release}"


def _one_paragraph_per_reference(app, what, name, obj, options, lines):
    """Make a References block read as one paragraph per entry.

    The docstrings list references as ``[n] authors, title`` with wrapped lines indented
    under the entry and no blank line between entries; reStructuredText reads such an
    indented line after a one-line entry as an unexpected block quote. Here each entry's
    lines are joined and entries are separated by blank lines. Runs after napoleon, which
    turns the numpy-style heading into ``.. rubric:: References``.
    """
    try:
        start = lines.index(".. rubric:: References") + 1
    except ValueError:
        return
    entries: list[str] = []
    end = start
    while end < len(lines):
        line = lines[end]
        if line.startswith("["):
            entries.append(line.strip())
        elif line.strip() and line[:1].isspace() and entries:
            entries[-1] += " " + line.strip()  # a wrapped line of the entry above
        elif line.strip():
            break  # the block is over: text that is not a reference
        end += 1
    if entries:
        lines[start:end] = [""] + [part for entry in entries for part in (entry, "")]


def setup(app):
    app.connect("autodoc-process-docstring", _one_paragraph_per_reference, priority=600)
