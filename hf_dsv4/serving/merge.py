"""A LoRA adapter merged into its base, streamed: one decoder layer in memory at a time, never the model.

`merge_adapter(base, adapter_dir, out_dir)` (or `python -m hf_dsv4.merge BASE ADAPTER_DIR OUT_DIR`) writes a
Hub-loadable checkpoint: the base read one unit at a time (each decoder layer, then the rest) by the streamed
checkpoint reader — a Hub-layout or a release-layout base (FP8 / FP4, dequantized to `dtype` on the way, as
`from_pretrained` would) — each unit merged by peft itself (the unit's base and adapter tensors put into a PeftModel
built on meta, then peft's `merge` of its LoRA layers: what `merge_and_unload` does), written under the names
`save_pretrained` uses (transformers' reverse conversion: routed experts split per expert again), with
`model.safetensors.index.json`, the config, the tokenizer and the chat template of the base's effort profile.

The merge stays in `dtype` (bf16 by default): re-quantizing to the release FP8 / FP4 encodings would round most of
a LoRA delta away.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoTokenizer, PreTrainedModel
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME

from .. import compat
from ..loading.pretrained import plan_streamed, resolve_dtype
from ..loading.stream import StreamedCheckpoint, open_streamed
from ..loading.units import layer_units, unit_entries
from ..sharding.export import SHARD_FILE
from ..sharding.streamed import reader_names
from ..training.adapter import adapter_folder

if TYPE_CHECKING:
    from peft import LoraConfig

logger = logging.getLogger(__name__)


def _adapter_state(adapter_dir: Path, peft_model, adapter: str) -> dict[str, torch.Tensor]:
    """The adapter file's tensors under `peft_model`'s state-dict names (peft saves them without the adapter name)."""
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    names = {}
    for key in peft_model.state_dict(keep_vars=True):
        if ".lora_" in key:
            names[key.replace(f".{adapter}.", ".")] = key
    unknown = sorted(set(saved) - set(names))
    if unknown:
        raise ValueError(f"{adapter_dir}: adapter tensors the base does not have: {unknown[:4]}")
    missing = sorted(set(names) - set(saved))
    if missing:
        raise ValueError(f"{adapter_dir}: the adapter lacks tensors of its own config: {missing[:4]}")
    expected = peft_model.state_dict(keep_vars=True)
    for key, tensor in saved.items():
        if tuple(tensor.shape) != tuple(expected[names[key]].shape):
            raise ValueError(
                f"{adapter_dir}: '{key}' is {tuple(tensor.shape)} but this base needs "
                f"{tuple(expected[names[key]].shape)}: the adapter was trained on another model"
            )
    return {names[key]: tensor for key, tensor in saved.items()}


def _write_merged_units(
    model: PreTrainedModel, reader: StreamedCheckpoint, config: LoraConfig, adapter_dir: Path, out: Path
) -> tuple[dict[str, str], int, int]:
    """Merge the adapter into `model` (on meta) one unit at a time, the base read by `reader`, and write each unit's
    merged tensors to its own file in `out`; returns (weight map, total bytes, number of files)."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, config)  # on meta: the unit's tensors are put in, merged and taken out
    adapter = peft_model.active_adapter
    adapter_state = _adapter_state(adapter_dir, peft_model, adapter)
    with torch.device("meta"):  # names are written as save_pretrained writes a model of this config (no load's ops)
        namer = compat.from_config(type(model), model.config)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), out / SAFE_WEIGHTS_INDEX_NAME]:
        stale.unlink(missing_ok=True)
    name_of = reader_names(peft_model)  # the reader's (the base model's) name of a name of the PeftModel
    units = layer_units(peft_model)
    prefixes = [p for p, _ in units]
    weight_map: dict[str, str] = {}
    size = 0
    for index, (prefix, unit) in enumerate(tqdm(units, desc="merging", unit="layer", disable=None)):
        own = unit_entries(prefix, unit, prefixes)
        unit_prefix = name_of(prefix) if prefix else ""
        base_part = reader.read(unit_prefix)
        values = {}
        for key in own:
            if ".lora_" in key:
                values[key] = adapter_state[prefix + key].to(own[key].dtype)
            else:
                values[key] = base_part.pop(name_of(prefix + key)[len(unit_prefix) :])
        unit.load_state_dict(values, strict=False, assign=True)
        for module in unit.modules():
            if hasattr(module, "merge") and hasattr(module, "lora_A") and adapter in module.lora_A:
                module.merge(adapter_names=[adapter])
        merged = {
            name_of(prefix + key): tensor.detach().contiguous()
            for key, tensor in unit.state_dict().items()
            if ".lora_" not in key and key in own
        }
        tensors = compat.revert_weight_conversion(namer, merged)
        name = SHARD_FILE.format(index=index + 1, total=len(units))
        save_file(tensors, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        size += sum(t.numel() * t.element_size() for t in tensors.values())
        del values, merged, tensors, base_part
        unit.to("meta")
    return weight_map, size, len(units)


def merge_adapter(
    base: str | Path,
    adapter_dir: str | Path,
    out_dir: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    effort_profile: str | None = None,
) -> Path:
    """Merge a PEFT adapter into its base and write the merged model, one decoder layer at a time (see the module
    docstring): the base is read one layer at a time, never held whole.

    Args:
        base: the base model, a local folder or Hub id, in the Hub or the release (FP8 / FP4) layout.
        adapter_dir: the adapter, a folder or Hub id, as peft / `DSV4SFTTrainer` saved it.
        out_dir: where the merged model (config, safetensors files, index, tokenizer) is written.
        dtype: the merged weights' dtype.
        effort_profile: the chat template's effort profile written with the tokenizer (default: read from the base,
            `detect_effort_profile`).

    Returns:
        `out_dir`, as a Path.

    Raises:
        ValueError: the base has no causal-LM class, or the adapter was trained on another model (its shapes say so).
    """
    from peft import LoraConfig

    from ..template import detect_effort_profile, install_chat_template

    compat.require("peft", "transformers")
    adapter_dir, out = adapter_folder(adapter_dir), Path(out_dir)
    config = LoraConfig.from_pretrained(adapter_dir)
    base_config = AutoConfig.from_pretrained(base)
    if type(base_config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(f"{base}: {type(base_config).__name__} has no causal LM class in transformers")
    cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(base_config)]
    model, kwargs, fp8_block = plan_streamed(cls, base, (), {"dtype": dtype})
    reader = open_streamed(cls, PreTrainedModel.__dict__["from_pretrained"], base, (), kwargs, fp8_block)
    try:
        weight_map, size, count = _write_merged_units(model, reader, config, adapter_dir, out)
    finally:
        reader.close()
    merged_config = model.config  # as the base's, without the release's quantization_config: the merge is dequantized
    merged_config.dtype = str(dtype).removeprefix("torch.")
    merged_config.architectures = [cls.__name__]
    merged_config.save_pretrained(out)
    if reader.twin.can_generate():
        reader.twin.generation_config.save_pretrained(out)
    index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
    (out / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(base)
    install_chat_template(tokenizer, effort_profile or detect_effort_profile(base))
    tokenizer.save_pretrained(out)
    logger.info("merged %s into %s: %d files, %.1f MB, in %s", adapter_dir, base, count, size / 2**20, out)
    return out


def main(argv: list[str] | None = None) -> None:
    """The command line `python -m hf_dsv4.merge BASE ADAPTER_DIR OUT_DIR [--dtype ...] [--effort_profile ...]`.

    Args:
        argv: the arguments (None: `sys.argv[1:]`).
    """
    parser = argparse.ArgumentParser(prog="python -m hf_dsv4.merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help="the base model: a local folder or hub id, Hub or release (FP8 / FP4) layout")
    parser.add_argument("adapter_dir", help="a PEFT adapter saved by the recipe / DSV4SFTTrainer")
    parser.add_argument("out_dir", help="where to write the merged model")
    parser.add_argument(
        "--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="the merged weights' dtype"
    )
    parser.add_argument("--effort_profile", default=None, choices=["0424", "0731"],
                        help="the chat template's effort profile (default: read from the base)")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    merge_adapter(args.base, args.adapter_dir, args.out_dir, resolve_dtype(args.dtype), args.effort_profile)
