"""The tiny DeepSeek-V4 in every checkpoint layout `from_pretrained` accepts, each built locally: what loading,
merging and exporting are tested against (`tests/conftest.py`'s `layout_ckpt` runs a test over all of them).

- "native": DeepSeek's names without the `model.` prefix, bf16, several shards + index (`build_tiny_dsv4`);
- "release": DeepSeek's release (FP8 / FP4 with block scales, native names, `mtp.*`; `build_release_dsv4`);
- "saved_from_config": transformers' `save_pretrained` of a model built from its config (its mixed layout:
  `model.layers.N.attn.norm.weight`, `model.norm.weight`, `model.embed_tokens.weight`, `head.weight`), one file;
- "saved_from_native" / "saved_from_release": `save_pretrained` of the model `from_pretrained` loaded from those;
- "saved_sharded": the same as "saved_from_native", in several files + index (`max_shard_size`);
- "hf_cache": "native" as the Hugging Face cache holds a download (`models--org--name/snapshots/<commit>/`, each
  file a link into `blobs/`); the snapshot folder is returned;

Our own outputs (`merge_adapter`, `save_pretrained_sharded`) are built by the tests (`tests/checkpoints.py`,
`tests/dist_worker.py`): this package imports only the chat format.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch

from .model import build_tiny_dsv4, randomize, tiny_dsv4_config
from .release import build_release_dsv4
from .tokenizer import tiny_tokenizer

LAYOUTS = (
    "native", "release", "saved_from_config", "saved_from_native", "saved_from_release", "saved_sharded", "hf_cache",
)  # fmt: skip
HF_CACHE_REPO = "hf-dsv4/tiny"


def _resave(source: Path, path: Path, **save_kwargs) -> Path:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16, use_kernels=False)
    model.save_pretrained(path, **save_kwargs)
    tiny_tokenizer().save_pretrained(path)
    return path


def _saved_from_config(path: Path, seed: int) -> Path:
    from transformers import DeepseekV4ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM._from_config(tiny_dsv4_config(), dtype=torch.bfloat16)
    randomize(model, seed)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def as_hf_cache(native: Path, path: Path) -> Path:
    """The checkpoint folder `native` laid out as huggingface_hub's cache keeps a download of `HF_CACHE_REPO` at one commit."""
    repo = path / f"models--{HF_CACHE_REPO.replace('/', '--')}"
    commit = hashlib.sha1(b"hf_dsv4 tiny").hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for file in sorted(native.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / file.name)
    return snapshot


def build_layout(layout: str, path: str | Path, seed: int = 0) -> Path:
    """Write the tiny DeepSeek-V4 in `layout` (one of `LAYOUTS`) under `path`; returns the folder to load from."""
    path = Path(path)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    if layout == "native":
        return build_tiny_dsv4(path, seed=seed)
    if layout == "release":
        return build_release_dsv4(path, seed=seed)
    if layout == "saved_from_config":
        return _saved_from_config(path, seed)
    if layout == "saved_from_release":
        return _resave(build_release_dsv4(path.parent / f"{path.name}_source", seed=seed), path)
    native = build_tiny_dsv4(path.parent / f"{path.name}_source", seed=seed)
    if layout == "saved_from_native":
        return _resave(native, path)
    if layout == "saved_sharded":
        return _resave(native, path, max_shard_size="64KB")
    return as_hf_cache(native, path)
