"""Sphinx configuration for the Flask-EventStream documentation."""

from __future__ import annotations

import importlib.metadata
import os
import sys

# Autodoc documents the source tree that sits beside these pages, wherever
# the installed copy of the package happens to point.
sys.path.insert(0, os.path.abspath(".."))

# Project ------------------------------------------------------------------

project = "Flask-EventStream"
copyright = "Flask-EventStream contributors"
release = importlib.metadata.version("flask-eventstream")
version = ".".join(release.split(".")[:2])

# General ------------------------------------------------------------------

# The docs build without a network, so there is no intersphinx: references
# to Flask and Python objects are shown as code, not links.
extensions = [
    "sphinx.ext.autodoc",
    "pallets_sphinx_themes",
]

autodoc_member_order = "bysource"
# Signatures show names and defaults; the docstrings say what each argument
# takes. Type hints would also make autodoc show the typing overloads of
# stream_events, with the sentinel that stands for "from config", in place
# of the one signature users call.
autodoc_typehints = "none"

exclude_patterns = ["_build"]

# HTML ---------------------------------------------------------------------

html_theme = "flask"
html_title = f"Flask-EventStream Documentation ({version})"
html_theme_options = {"index_sidebar_logo": False}
html_sidebars = {"**": ["localtoc.html", "relations.html", "searchbox.html"]}
html_show_sourcelink = False
# The theme's version banner asks a package index for the newest release from
# the reader's browser; these pages make no requests of their own.
version_banner = False
