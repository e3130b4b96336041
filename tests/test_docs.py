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
import inspect
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


def _modules() -> list[str]:
    """`hf_dsv4` and every module under it, by name."""
    return sorted({"hf_dsv4"} | {m.name for m in pkgutil.walk_packages(hf_dsv4.__path__, "hf_dsv4.")})


def test_every_public_name_is_in_the_api_reference():
    """mkdocstrings renders a documented module's `__all__`: each name of a module's `__all__` is on an API page, with
    its module, with the package that re-exports it, or on its own (`::: module.name`)."""
    declared = [name for name in _modules() if "__all__" in Path(importlib.util.find_spec(name).origin).read_text()]
    documented = set(re.findall(r"^::: ([\w.]+)$", "\n".join(p.read_text() for p in DOCS.glob("api/*.md")), re.M))
    assert {"hf_dsv4", "hf_dsv4.template", "hf_dsv4.training"} <= documented
    for module in declared:
        parent = module.rsplit(".", 1)[0]
        exported = set(importlib.import_module(parent).__all__) if parent in documented else set()
        for name in importlib.import_module(module).__all__:
            assert module in documented or name in exported or f"{module}.{name}" in documented, f"{module}.{name}"


ARGS_SECTION = re.compile(r"^(?:Args|Attributes):[ \t]*\n((?:[ \t]*\n|[ \t]+\S.*\n)*)", re.M)


def documented_names(doc: str) -> set[str] | None:
    """The names the `Args:` / `Attributes:` sections of a (cleaned) docstring document, None without one. An entry
    is a line at the section's first indentation: `name: ...`, `name (type): ...`, or names that go together,
    `a, b: ...` and `*args, **kwargs: ...` (stars dropped); more indented lines continue it."""
    bodies = ARGS_SECTION.findall(doc + "\n")
    if not bodies:
        return None
    names: set[str] = set()
    for body in bodies:
        indent = min((len(line) - len(line.lstrip()) for line in body.splitlines() if line.strip()), default=0)
        entry = re.compile(rf"^[ \t]{{{indent}}}(\**\w+(?:, \**\w+)*)(?: \([^)]*\))?:(?:\s|$)", re.M)
        names |= {name.lstrip("*") for group in entry.findall(body) for name in group.split(", ")}
    return names


def _public_objects() -> dict[str, object]:
    """Every function and class named in an `__all__` of `hf_dsv4` or a module under it (re-exports once), by the
    qualified name of its definition."""
    found = {}
    for module in map(importlib.import_module, _modules()):
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


def _parameters(obj) -> list[str]:
    """The names a call of `obj` takes (a class: its constructor's, without `self`); none for a class whose
    constructor is a builtin's (an exception class without `__init__`)."""
    try:
        return list(inspect.signature(obj).parameters)
    except ValueError:
        return []


def _docstring(obj) -> str:
    """`obj`'s own docstring (not one inherited), with its class's `__init__` docstring (the API pages merge them)."""
    parts = [obj.__doc__]
    if inspect.isclass(obj) and "__init__" in vars(obj):
        parts.append(vars(obj)["__init__"].__doc__)
    return "\n\n".join(inspect.cleandoc(part) for part in parts if part)


def test_the_args_reader_reads_single_grouped_typed_and_starred_entries():
    doc = inspect.cleandoc(
        """Summary.

        Args:
            a: one.
                b: a continuation line, not an entry.
            c, d: two together.
            e (int): typed.
            *args, **kwargs: passed on.

        Returns:
            f: not an argument.
        """
    )
    assert documented_names(doc) == {"a", "c", "d", "e", "args", "kwargs"}
    assert documented_names("Summary.\n\nReturns:\n    x: y.") is None


def test_every_public_function_and_class_documents_its_arguments():
    """Each public function and class that takes arguments has an `Args:` (or, for fields, `Attributes:`) section that
    names every parameter. A dataclass whose every field has `help` metadata needs none: its fields are documented
    by their help (and, for the configs, by the generated flags tables of the docs)."""
    problems = []
    for qualname, obj in sorted(_public_objects().items()):
        parameters = _parameters(obj)
        helped = dataclasses.is_dataclass(obj) and all("help" in f.metadata for f in dataclasses.fields(obj))
        if not parameters or helped:
            continue
        documented = documented_names(_docstring(obj))
        if documented is None:
            problems.append(f"{qualname}: no Args section")
        elif missing := [name for name in parameters if name not in documented]:
            problems.append(f"{qualname}: Args does not name {', '.join(missing)}")
    assert not problems, "\n".join(problems)


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
