"""MkDocs hook: the recipe's flags as tables, generated from the config dataclasses at build time, never by hand.

A page asks for a table with an HTML comment on a line of its own:

    <!-- flags: hf_dsv4 -->     the fields `DSV4SFTConfig` and the recipe's `DSV4ScriptArguments` / `DSV4ModelConfig`
                                 define or change (their `help` metadata, type, default, choices)
    <!-- flags: inherited -->   every other field of the three, grouped by the TRL / transformers class that defines it

`recipes/sft_dsv4.py` parses exactly these three dataclasses with TRL's `TrlParser`, so each row is a flag of the
recipe (`--name value`) and a key of its `--config` YAML. `tests/test_docs.py` checks that the tables cover every
`DSV4SFTConfig` field.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"^<!-- flags: (hf_dsv4|inherited) -->$", re.M)
# where the stack documents the classes hf_dsv4's configs extend
UPSTREAM_DOCS = {
    "SFTConfig": "https://huggingface.co/docs/trl/sft_trainer#trl.SFTConfig",
    "TrainingArguments": "https://huggingface.co/docs/transformers/main_classes/trainer#transformers.TrainingArguments",
    "ModelConfig": "https://huggingface.co/docs/trl/script_utils#trl.ModelConfig",
    "ScriptArguments": "https://huggingface.co/docs/trl/script_utils#trl.ScriptArguments",
}


def recipe_dataclasses() -> tuple[type, ...]:
    """The dataclasses `recipes/sft_dsv4.py` parses, in its order: script arguments, training config, model config."""
    name = "hf_dsv4_docs_recipe"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "recipes" / "sft_dsv4.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    recipe = sys.modules[name]
    return recipe.DSV4ScriptArguments, recipe.DSV4SFTConfig, recipe.DSV4ModelConfig


def _owner(cls: type, name: str) -> type:
    """The first class in `cls`'s MRO whose own body declares field `name` (the one that sets its default and help)."""
    return next(c for c in cls.__mro__ if name in c.__dict__.get("__annotations__", {}))


def _cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    return f"`{value!r}`"


def _type(f: dataclasses.Field) -> str:
    return _cell(f.type if isinstance(f.type, str) else getattr(f.type, "__name__", f.type))


def _row(f: dataclasses.Field, *first: str) -> str:
    help_text = f.metadata.get("help", "")
    if f.metadata.get("choices"):
        help_text += " Choices: " + ", ".join(f"`{c}`" for c in f.metadata["choices"]) + "."
    return "| " + " | ".join([f"`--{f.name}`", *first, f"`{_type(f)}`", _default(f), _cell(help_text)]) + " |"


def _header(*first: str) -> str:
    names = ["flag", *first, "type", "default", "what it does"]
    return "| " + " | ".join(names) + " |\n|" + " --- |" * len(names)


def own_fields(classes: tuple[type, ...]) -> list[tuple[type, dataclasses.Field]]:
    """(class, field) for every field one of hf_dsv4's classes declares in its own body (new or with a new default)."""
    return [(cls, f) for cls in classes for f in dataclasses.fields(cls) if _owner(cls, f.name) is cls]


def inherited_fields(classes: tuple[type, ...]) -> dict[type, list[dataclasses.Field]]:
    """upstream class -> the fields hf_dsv4's classes inherit from it unchanged (a field parsed twice is listed once)."""
    seen = {f.name for _, f in own_fields(classes)}
    groups: dict[type, list[dataclasses.Field]] = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            if f.name not in seen:
                seen.add(f.name)
                groups.setdefault(_owner(cls, f.name), []).append(f)
    return groups


def hf_dsv4_table(classes: tuple[type, ...]) -> str:
    """The table of the flags hf_dsv4 adds or changes, each row naming its class."""
    rows = [_row(f, f"`{cls.__name__}`") for cls, f in own_fields(classes)]
    return "\n".join([_header("class"), *rows])


def inherited_tables(classes: tuple[type, ...]) -> str:
    """One table per upstream class, with the link to its own documentation."""
    parts = []
    for owner, fields in inherited_fields(classes).items():
        link = UPSTREAM_DOCS.get(owner.__name__)
        title = f"`{owner.__module__.split('.')[0]}.{owner.__name__}`"
        parts.append(f"### {title}\n\n" + (f"Its documentation: <{link}>.\n\n" if link else ""))
        parts.append("\n".join([_header(), *(_row(f) for f in fields)]) + "\n\n")
    return "".join(parts)


def render(markdown: str) -> str:
    """`markdown` with each flags marker replaced by its generated table."""
    if not MARKER.search(markdown):
        return markdown
    classes = recipe_dataclasses()
    tables = {"hf_dsv4": hf_dsv4_table, "inherited": inherited_tables}
    return MARKER.sub(lambda m: tables[m.group(1)](classes), markdown)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    """MkDocs hook event: runs on every page's Markdown before it is converted."""
    return render(markdown)
