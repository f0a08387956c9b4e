"""Sphinx configuration of the numbarope documentation.

Build (from the repository root, after ``pip install ".[docs]"``)::

    python -m sphinx -b html -W --keep-going docs docs/_build/html

API pages come from the numpydoc docstrings (autodoc); the pages of the guide
include sections of README.md (one source of the text); the notebooks in
``notebooks/`` (``docs/notebooks`` is a link to that folder) are executed by
myst-nb at their default (small) sizes while the site is built, so the pages show
every figure; results are cached (``docs/_build/.jupyter_cache`` by default, keyed on
the notebook's code), so a rebuild re-runs only the notebooks that changed.
"""

import os
import sys

# document the package of this source tree (also when another copy is installed)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numbarope  # noqa: E402

project = "numbarope"
author = "numbarope developers"
copyright = "2026, numbarope developers"
release = numbarope.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "myst_nb",                      # Markdown pages (myst-parser) and .ipynb notebooks
]

exclude_patterns = ["_build", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store", "examples"]

# autodoc / autosummary: summary tables link to the entries on the API page; no stub
# files are generated into the source tree
autosummary_generate = False
autodoc_member_order = "bysource"
autodoc_typehints = "none"          # the numpydoc Parameters sections carry the types
# numbarope.integrations needs torch and transformers; document it without them
autodoc_mock_imports = ["torch", "transformers"]

# numpydoc: members are listed by autodoc's :members:, not again by numpydoc
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False

# myst-nb: the notebooks are stored without outputs; execute them while building
# (cached per notebook), fail the build on an error, at most 10 minutes per cell
nb_execution_mode = "cache"
nb_execution_raise_on_error = True
nb_execution_timeout = 600
nb_execution_show_tb = True
myst_enable_extensions = ["dollarmath"]
# README.md's sections are included into pages under their own titles, so their
# heading levels start at ### in places
suppress_warnings = ["myst.header"]

html_theme = "alabaster"
html_title = f"numbarope {release}"
html_theme_options = {
    "description": "Exact and certified fast RoPE attention on CPUs",
    "fixed_sidebar": True,
}
