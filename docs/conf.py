"""Sphinx configuration: Markdown pages (MyST-Parser), the furo theme, autodoc for the declared
public surface, and the configuration reference generated from configs/ at each build.

    pip install -e ".[docs]"
    sphinx-build -W --keep-going -b html docs docs/_build/html
"""

import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
REPO = DOCS.parent
sys.path.insert(0, str(REPO / "scripts"))  # config_reference
sys.path.insert(0, str(REPO))  # autodoc imports seg from this checkout

import config_reference  # noqa: E402

project = "seg"
# pyproject's version (no tomllib: Python 3.10 lacks it)
release = re.search(r'^version = "(.+)"', (REPO / "pyproject.toml").read_text(), re.M)[1]
copyright = "seg's authors"

extensions = ["myst_parser", "sphinx.ext.autodoc"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3  # [text](page.md#a-heading) links, the same slugs as GitHub's
myst_enable_extensions = ["colon_fence"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"  # the signatures stay short; types go beside the arguments
html_theme = "furo"
html_title = f"seg {release}"


def write_config_reference(app) -> None:
    """Regenerate reference/configs.md from configs/ before the pages are read (it is
    git-ignored, so it cannot drift from the configs)."""
    config_reference.write_page(DOCS / "reference" / "configs.md")


# A Markdown link with a relative target: ](target) or ](target#anchor).
RELATIVE_LINK = re.compile(r"\]\((?![a-z]+:)([^)\s#]+)(#[^)\s]*)?\)")


def link_files_outside_docs(app, docname, source) -> None:
    """Pages link to repository files outside docs/ (``../CHANGELOG.md``, ``../data/README.md``)
    and to folders (``results/default_run/``) by relative paths, which GitHub follows. MyST
    would take a ``.md`` target outside docs/ for a page of the site, and finds no page for a
    folder: ``path:`` makes the first a download link, and a folder link goes to the folder's
    README page. Targets that do not exist are left alone, so a broken link still fails."""
    folder = (DOCS / docname).parent

    def fix(match: re.Match) -> str:
        target = (folder / match[1]).resolve()
        if target.is_relative_to(DOCS):
            # A folder of docs/ (results/default_run/), as GitHub shows it: its README page.
            if target.is_dir() and (target / "README.md").is_file():
                return f"]({match[1].rstrip('/')}/README.md{match[2] or ''})"
            return match[0]
        if not target.is_file():
            return match[0]
        return f"](path:{match[1]}{match[2] or ''})"

    source[0] = RELATIVE_LINK.sub(fix, source[0])


def setup(app):
    app.connect("builder-inited", write_config_reference)
    app.connect("source-read", link_files_outside_docs)
