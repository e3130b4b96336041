"""MkDocs hook: every public name of a module an API page documents (`::: module`) is rendered on that page.

mkdocstrings renders a module's `__all__`, but a name it cannot resolve statically is left out without a word: a
lazily exported name with no `TYPE_CHECKING` import, or a function named like a submodule of its package
(`hf_dsv4.template.chat_template`). Such a name must be documented on the page by its defining module
(`::: hf_dsv4.template.chat_template.chat_template`); otherwise this hook logs a warning, which fails
`mkdocs build --strict`.
"""

from __future__ import annotations

import importlib
import logging
import re
from typing import Any

log = logging.getLogger("mkdocs.hooks.api_check")
DIRECTIVE = re.compile(r"^::: ([\w.]+)$", re.M)
ANCHOR = re.compile(r'id="([\w.]+)"')


def missing_names(markdown: str, html: str) -> list[str]:
    """`module.name` for each name of a documented module's `__all__` with no anchor on the page (the name itself,
    or the name under another module: `anything.name`)."""
    anchors = set(ANCHOR.findall(html))
    missing = []
    for target in DIRECTIVE.findall(markdown):
        try:
            names = importlib.import_module(target).__all__
        except (ImportError, AttributeError):  # a single object, or a module without `__all__`
            continue
        missing += [
            f"{target}.{n}" for n in names if not any(a == f"{target}.{n}" or a.endswith(f".{n}") for a in anchors)
        ]
    return missing


def on_page_content(html: str, page: Any, **kwargs: Any) -> str:
    """MkDocs hook event: runs on every page's HTML, after mkdocstrings has rendered it."""
    for name in missing_names(page.markdown, html):
        log.warning("%s: public name %s is not rendered (document it by its defining module)", page.file.src_uri, name)
    return html
