"""The package's shape: imports run one way (template <- modeling <- loading <- sharding <- training <- serving), the chat format imports
none of trl/accelerate/peft, and every public name of `hf_dsv4` still imports from the top."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import hf_dsv4

PACKAGE = Path(hf_dsv4.__file__).parent
# layer -> the hf_dsv4 modules it may import (besides its own)
ALLOWED = {
    "template": set(),
    "distributed": set(),
    "formats": set(),
    "compat": {"formats"},
    "modeling": {"compat"},
    "loading": {"compat", "distributed", "template", "formats"},
    "sharding": {"compat", "distributed", "template", "loading", "formats"},
    "training": {"compat", "distributed", "template", "modeling", "loading", "sharding", "formats"},
    "testing": {"template"},
    "demo": {"template", "testing"},
    "serving": {"compat", "distributed", "template", "modeling", "loading", "sharding", "formats", "training"},
    "export": {"serving"},
    "merge": {"serving"},
}
# every name `from hf_dsv4 import ...` gave before the package was layered
PUBLIC = [
    "LORA_TARGETS", "ChatFormatError", "CheckpointLoadError", "DSV4Accelerator", "DSV4Callback", "DSV4FSDP2Plugin",
    "DSV4SFTConfig", "DSV4SFTTrainer", "ShardingError", "detect_effort_profile", "dsv4_lora_config",
    "dsv4_trainer_accelerator", "enable_sparse_attention", "encode_messages", "export_adapter", "gather_adapter", "install_chat_template", "load_adapter", "memory_efficient_init",
    "merge_adapter", "save_adapter", "save_pretrained_sharded", "shard_model", "tokenize_conversation",
]  # fmt: skip


def layer_of(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def imported_layers(path: Path) -> set[str]:
    """The hf_dsv4 layers a module imports (absolute `hf_dsv4.x` or relative `..x` / `.x` from the package root)."""
    tree = ast.parse(path.read_text())
    package_depth = len(path.relative_to(PACKAGE).parts) - 1  # 0 for hf_dsv4/x.py, 1 for hf_dsv4/layer/x.py
    layers = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and (node.module or "").startswith("hf_dsv4."):
                layers.add(node.module.split(".")[1])
            elif node.level > package_depth:  # climbs to the package root
                if node.module:
                    layers.add(node.module.split(".")[0])
                else:
                    layers.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            layers.update(a.name.split(".")[1] for a in node.names if a.name.startswith("hf_dsv4."))
    return layers


@pytest.mark.parametrize(
    "path", sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE), ids=str
)
def test_imports_run_one_way(path):
    layer = layer_of(path)
    assert imported_layers(path) - {layer} <= ALLOWED[layer]


def test_every_public_name_still_imports_from_the_top():
    assert set(hf_dsv4.__all__) == set(PUBLIC)
    for name in PUBLIC:
        assert getattr(hf_dsv4, name) is not None
    assert set(PUBLIC) <= set(dir(hf_dsv4))
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        hf_dsv4.nope  # noqa: B018


def modules_after(statement: str) -> set[str]:
    """The modules loaded by `statement` in a fresh interpreter."""
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(out.stdout.split())


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("statement", "absent"),
    [
        ("import hf_dsv4", {"trl", "accelerate", "peft", "torch", "transformers"}),
        ("import hf_dsv4.template", {"trl", "accelerate", "peft", "torch", "transformers"}),
        ("from hf_dsv4 import encode_messages", {"trl", "accelerate", "peft", "torch", "transformers"}),
        # transformers itself imports accelerate and peft when they are installed
        ("import hf_dsv4.loading", {"trl", "transformers.trainer"}),
        ("from hf_dsv4 import shard_model", {"trl", "transformers.trainer"}),
    ],
)
def test_a_layer_imports_none_of_the_packages_it_does_not_need(statement, absent):
    assert modules_after(statement) & absent == set()
