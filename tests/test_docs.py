"""The documentation site (`docs/`, `mkdocs.yml`): its runnable examples run, its generated flags table covers the
config, every public name has an API page, and the README's relative links lead somewhere.

A fenced ```python block in `docs/*.md` that runs on a CPU is marked by the line `<!-- runs on CPU -->` right before
its fence; the marked blocks of a page run in order, in one namespace (a later block may use an earlier one's names),
in an empty working folder, as a reader would paste them.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import pkgutil
import re
from pathlib import Path

import pytest

import hf_dsv4

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
RUNNABLE = re.compile(r"^<!-- runs on CPU -->\n```python\n(.*?)^```$", re.M | re.S)


def runnable_blocks(page: Path) -> list[str]:
    """The code of every block of `page` marked as runnable on CPU, in page order."""
    return RUNNABLE.findall(page.read_text())


PAGES = sorted(p for p in DOCS.glob("*.md") if runnable_blocks(p))


def test_the_runnable_marker_is_found_only_before_a_python_fence():
    """A marker before anything else (a typo, a bash block) would silently skip a block: every marker is matched."""
    for page in DOCS.glob("*.md"):
        text = page.read_text()
        assert text.count("<!-- runs on CPU -->") == len(runnable_blocks(page)), page.name
    assert {p.name for p in PAGES} >= {"index.md", "chat_format.md", "long_context.md", "training.md"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_the_runnable_code_blocks_of_a_docs_page_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__main__"}
    for index, code in enumerate(runnable_blocks(page)):
        exec(compile(code, f"{page.name} block {index}", "exec"), namespace)  # noqa: S102 - the docs' own code


def _hook(name: str):
    """A MkDocs hook of `docs/hooks/` imported as a module."""
    spec = importlib.util.spec_from_file_location(f"docs_hooks_{name}", DOCS / "hooks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_generated_flags_tables_cover_every_field_of_the_config_once():
    flags = _hook("flags")
    page = flags.render((DOCS / "training.md").read_text())
    assert "<!-- flags:" not in page
    listed = re.findall(r"^\| `--(\w+)` \|", page, re.M)
    fields = [f.name for cls in flags.recipe_dataclasses() for f in dataclasses.fields(cls)]
    assert len(listed) == len(set(listed)) == len(set(fields))
    assert set(listed) == set(fields) >= {f.name for f in dataclasses.fields(hf_dsv4.DSV4SFTConfig)}
    # a field hf_dsv4 declares is in the first table, with its help text, its class and its default
    help_text = " ".join(hf_dsv4.DSV4SFTConfig.__dataclass_fields__["stream_readers"].metadata["help"].split())
    assert (
        f"| `--stream_readers` | `DSV4SFTConfig` | `str` | `'rank0'` | {help_text} Choices: `rank0`, `all`. |" in page
    )


def test_every_public_name_is_in_the_api_reference():
    """mkdocstrings renders a documented module's `__all__`: each name of a module's `__all__` is on an API page, with
    its module, with the package that re-exports it, or on its own (`::: module.name`)."""
    modules = {"hf_dsv4"} | {m.name for m in pkgutil.walk_packages(hf_dsv4.__path__, "hf_dsv4.")}
    declared = [
        name for name in sorted(modules) if "__all__" in Path(importlib.util.find_spec(name).origin).read_text()
    ]
    documented = set(re.findall(r"^::: ([\w.]+)$", "\n".join(p.read_text() for p in DOCS.glob("api/*.md")), re.M))
    assert {"hf_dsv4", "hf_dsv4.template", "hf_dsv4.training"} <= documented
    for module in declared:
        parent = module.rsplit(".", 1)[0]
        exported = set(importlib.import_module(parent).__all__) if parent in documented else set()
        for name in importlib.import_module(module).__all__:
            assert module in documented or name in exported or f"{module}.{name}" in documented, f"{module}.{name}"


def test_the_api_check_names_each_public_name_a_page_does_not_render():
    """The build-time check (`docs/hooks/api_check.py`, a warning that fails `mkdocs build --strict`)."""
    api_check = _hook("api_check")
    markdown = "# loading\n\n::: hf_dsv4.loading\n\n::: hf_dsv4.loading.pretrained.resolve_dtype\n"
    rendered = "".join(f'<h2 id="hf_dsv4.loading.{n}">' for n in ("CheckpointLoadError", "memory_efficient_init"))
    assert api_check.missing_names(markdown, rendered) == [
        "hf_dsv4.loading.build_on_meta",
        "hf_dsv4.loading.resolve_dtype",
    ]
    by_module = rendered + '<h2 id="hf_dsv4.loading.pretrained.resolve_dtype"><h2 id="hf_dsv4.loading.build_on_meta">'
    assert api_check.missing_names(markdown, by_module) == []


def test_the_readmes_relative_links_lead_to_files_and_headings_that_exist():
    text = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(((?!https?://)[^)#\s]+)(#[^)\s]*)?\)", text)
    assert links
    for target, anchor in links:
        path = REPO / target
        assert path.exists(), target
        if anchor and path.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", path.read_text(), re.M)
            assert anchor[1:] in {_github_anchor(h) for h in headings}, target + anchor


def _github_anchor(heading: str) -> str:
    """GitHub's (and the site's, `pymdownx.slugs.slugify(case="lower")`) anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
