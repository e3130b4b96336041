"""A DeepSeek-V4-Flash slice in the release layout, written tensor by tensor (for `bench_load.py --layout flash`).

The real V4-Flash configuration (`bench_flash_slice.FLASH`: hidden 4096, 256 routed experts of 2048, 64 heads of 512,
vocab 129,280) with one decoder layer, a compressed-sparse-attention layer with top-k routing (the heaviest kind:
compressor and lightning indexer included), encoded as DeepSeek ships it: FP8 e4m3 + ue8m0 128 x 128 scales for
the attention, indexer `wq_b` and shared-expert projections, FP4 e2m1 routed experts with 1 x 32 scales, bf16
embeddings / head / norms / compressor / router, fp32 sinks / hyper-connections / router bias. Random values: the
benchmark measures memory and time of loading, not the model. No `mtp.*` block (the loader skips it by name; it would
add ~3 GB of disk). 5.4 GB on disk, 15.3 GB once dequantized to bf16.

Unlike `hf_dsv4.testing.build_release_dsv4` (which builds the model in memory to know its values), nothing here ever
holds more than one shard file of tensors (`--max-shard-gb`, default 1), so it runs on a 24 GiB machine.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_flash_slice import FIRST_CSA_TOPK, FLASH, flash_slice_config  # noqa: E402

from hf_dsv4.testing.model import hub_name  # noqa: E402
from hf_dsv4.testing.release import _FP4, _FP8, _FP32, _release_config_json, encode_fp4, encode_fp8  # noqa: E402


def _shapes(config) -> Iterator[tuple[str, torch.Size, torch.dtype]]:
    """(release name, shape, dtype) of every checkpoint tensor of `config`, in the model's order, experts split."""
    from transformers import DeepseekV4ForCausalLM

    with torch.device("meta"):
        model = DeepseekV4ForCausalLM(config)
    for name, tensor in model.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            prefix = hub_name(name.rsplit(".", 1)[0] + ".x").removesuffix(".x")
            experts, rows, cols = tensor.shape
            for e in range(experts):
                if name.endswith("gate_up_proj"):
                    yield f"{prefix}.{e}.w1.weight", torch.Size((rows // 2, cols)), tensor.dtype
                    yield f"{prefix}.{e}.w3.weight", torch.Size((rows // 2, cols)), tensor.dtype
                else:
                    yield f"{prefix}.{e}.w2.weight", torch.Size((rows, cols)), tensor.dtype
        else:
            yield hub_name(name), tensor.shape, tensor.dtype


def _encoded(config, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The release tensors, one at a time (weights with their `.scale`)."""
    gen = torch.Generator().manual_seed(seed)
    for name, shape, dtype in _shapes(config):
        if _FP8.search(name) or _FP4.search(name):
            weight, scale = (encode_fp8 if _FP8.search(name) else encode_fp4)(name, shape, gen)
            yield name, weight
            yield name.removesuffix(".weight") + ".scale", scale
        elif dtype == torch.int64:  # hash routes (hash layers only)
            yield name, torch.randint(0, config.n_routed_experts, shape, generator=gen)
        else:
            values = torch.randn(shape, generator=gen)
            values = 1 + 0.1 * values if name.endswith("norm.weight") else 0.05 * values
            yield name, values.to(torch.float32 if _FP32.search(name) else torch.bfloat16).contiguous()


def build_flash_release(path: Path, seed: int = 0, max_shard_bytes: int = 1 << 30, config=None) -> float:
    """Write the slice (`config`, default Flash's first CSA layer with top-k routing alone) to `path` (config.json,
    shards, index), one tensor encoded at a time; return its size in MB."""
    path.mkdir(parents=True, exist_ok=True)
    config = config or flash_slice_config(1, first=FIRST_CSA_TOPK)
    written, shard, size, total, weight_map = [], {}, 0, 0, {}

    def flush() -> None:
        nonlocal shard, size
        temporary = path / f"part-{len(written):05d}.safetensors"
        save_file(shard, str(temporary), metadata={"format": "pt"})
        written.append((temporary, list(shard)))
        shard, size = {}, 0

    for name, tensor in _encoded(config, seed):
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
        shard[name], size, total = tensor, size + nbytes, total + nbytes
    if shard:
        flush()
    for i, (temporary, names) in enumerate(written, start=1):
        filename = f"model-{i:05d}-of-{len(written):05d}.safetensors"
        temporary.rename(path / filename)
        weight_map.update(dict.fromkeys(names, filename))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config_json = _release_config_json(config)
    config_json["num_nextn_predict_layers"] = 0
    config_json["compress_ratios"] = config_json["compress_ratios"][:-1]  # no MTP layer
    config_json["rope_scaling"] = dict(FLASH["rope_parameters"])  # the release's yarn (compressed attention)
    (path / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
    return total / 2**20
