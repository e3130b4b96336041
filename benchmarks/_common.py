"""What several benchmarks share, in one module that imports no other benchmark: the machine line of every table,
DeepSeek-V4-Flash's configuration (`FLASH`, its layer schedule, `flash_slice_config`), and the checkpoints the
benchmarks load (`build_checkpoint`: ~1 GB in the Hub or release layout; `build_flash_release`: a full-width Flash
slice in the release layout, written tensor by tensor).

`build_flash_release` writes the real V4-Flash configuration with one decoder layer (default: Flash's first
compressed-sparse-attention layer with top-k routing, the heaviest kind: compressor and lightning indexer included),
encoded as DeepSeek ships it: FP8 e4m3 + ue8m0 128 x 128 scales for the attention, indexer `wq_b` and shared-expert
projections, FP4 e2m1 routed experts with 1 x 32 scales, bf16 embeddings / head / norms / compressor / router, fp32
sinks / hyper-connections / router bias. Random values: the benchmarks measure memory and time of loading, not the
model. No `mtp.*` block (the loader skips it by name; it would add ~3 GB of disk). 5.4 GB on disk, 15.3 GB once
dequantized to bf16. Unlike `hf_dsv4.testing.build_release_dsv4` (which builds the model in memory to know its
values), nothing here ever holds more than one shard file of tensors (`max_shard_bytes`, default 1 GiB), so it runs
on a 24 GiB machine.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# torch, transformers and hf_dsv4 are imported where they are used: a benchmark that takes its memory baseline after
# its own imports gets none of them from here
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without `pip install -e .`

SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"

# DeepSeek-V4-Flash (config.json of deepseek-ai/DeepSeek-V4-Flash), all but the layer count and schedule.
FLASH = dict(
    vocab_size=129280,
    hidden_size=4096,
    moe_intermediate_size=2048,
    num_attention_heads=64,
    num_key_value_heads=1,
    head_dim=512,
    q_lora_rank=1024,
    qk_rope_head_dim=64,
    num_experts_per_tok=6,
    n_routed_experts=256,
    n_shared_experts=1,
    scoring_func="sqrtsoftplus",
    norm_topk_prob=True,
    routed_scaling_factor=1.5,
    max_position_embeddings=1048576,
    rope_theta=10000,
    compress_rope_theta=160000,
    rope_parameters={"rope_type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                     "beta_fast": 32, "beta_slow": 1},
    compress_rates={CSA: 4, HCA: 128},
    hc_mult=4,
    hc_sinkhorn_iters=20,
    hc_eps=1e-6,
    swiglu_limit=10.0,
    sliding_window=128,
    o_groups=8,
    o_lora_rank=1024,
    index_n_heads=64,
    index_head_dim=128,
    index_topk=512,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=1,
)  # fmt: skip
FLASH_LAYERS = 43  # V4-Flash: 2 x sliding, then CSA/HCA alternating; the first 3 MoE layers hash-routed
FLASH_SCHEDULE = dict(
    layer_types=[SLIDING] * 2 + [CSA, HCA] * 20 + [CSA], mlp_layer_types=["hash_moe"] * 3 + ["moe"] * 40
)
# V4-Flash's first CSA layer with top-k routing (layer 4): the heaviest kind (compressor, lightning indexer, routed
# experts chosen by score)
FIRST_CSA_TOPK = next(i for i, kinds in enumerate(zip(*FLASH_SCHEDULE.values())) if kinds == (CSA, "moe"))


def flash_slice_config(layers: int, first: int = 0):
    """V4-Flash at full width with `layers` decoder layers: Flash's own layers `first` to `first + layers - 1`, their
    attention and router kinds included (`FLASH_SCHEDULE`)."""
    from transformers import DeepseekV4Config

    schedule = {key: values[first : first + layers] for key, values in FLASH_SCHEDULE.items()}
    return DeepseekV4Config(**FLASH, num_hidden_layers=layers, **schedule)


def machine() -> str:
    """The machine line printed above every benchmark's table: CPU, cores, memory, OS, torch."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import torch

    return f"{cpu}, {os.cpu_count()} cores, {mem_gb:.0f} GiB RAM, {platform.system()}, torch {torch.__version__}"


# ~1 GB in bf16: 8 layers of every attention type, 16 experts of 1024x1024, vocab 32k.
BENCH_CONFIG = dict(
    vocab_size=32768,
    hidden_size=1024,
    moe_intermediate_size=1024,
    num_hidden_layers=8,
    num_attention_heads=16,
    head_dim=128,
    q_lora_rank=512,
    n_routed_experts=16,
    num_experts_per_tok=2,
    layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"] * 2
    + ["compressed_sparse_attention", "heavily_compressed_attention"],
    mlp_layer_types=["hash_moe"] * 2 + ["moe"] * 6,
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
    hc_mult=4,
    sliding_window=128,
    o_groups=4,
    o_lora_rank=256,
    index_n_heads=8,
    index_head_dim=64,
    index_topk=64,
    max_position_embeddings=4096,
)


def build_checkpoint(path: Path, layout: str = "hub") -> float:
    """Build (once) the benchmark checkpoint: ~1 GB bf16 in the Hub layout, or the same model in DeepSeek's release
    layout (FP8 / FP4 with block scales, ~0.5 GB; ~1 GB once dequantized), or (`flash`) a full-width
    DeepSeek-V4-Flash slice of one decoder layer in the release layout (`build_flash_release`: 5.4 GB, 15.3 GB in bf16);
    return its size in MB."""
    from hf_dsv4.testing import build_release_dsv4, build_tiny_dsv4

    if not (path / "model.safetensors.index.json").exists():
        if layout == "flash":
            build_flash_release(path)
        elif layout == "release":
            build_release_dsv4(path, max_shard_bytes=256 * 2**20, **BENCH_CONFIG)
        else:
            build_tiny_dsv4(path, max_shard_bytes=256 * 2**20, **BENCH_CONFIG)
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20


def _shapes(config) -> Iterator[tuple[str, torch.Size, torch.dtype]]:
    """(release name, shape, dtype) of every checkpoint tensor of `config`, in the model's order, experts split."""
    import torch
    from transformers import DeepseekV4ForCausalLM

    from hf_dsv4.testing.model import hub_name

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
    import torch

    from hf_dsv4.testing.release import FP4_WEIGHTS, FP8_WEIGHTS, FP32_WEIGHTS, encode_fp4, encode_fp8

    gen = torch.Generator().manual_seed(seed)
    for name, shape, dtype in _shapes(config):
        if FP8_WEIGHTS.search(name) or FP4_WEIGHTS.search(name):
            weight, scale = (encode_fp8 if FP8_WEIGHTS.search(name) else encode_fp4)(name, shape, gen)
            yield name, weight
            yield name.removesuffix(".weight") + ".scale", scale
        elif dtype == torch.int64:  # hash routes (hash layers only)
            yield name, torch.randint(0, config.n_routed_experts, shape, generator=gen)
        else:
            values = torch.randn(shape, generator=gen)
            values = 1 + 0.1 * values if name.endswith("norm.weight") else 0.05 * values
            yield name, values.to(torch.float32 if FP32_WEIGHTS.search(name) else torch.bfloat16).contiguous()


def build_flash_release(path: Path, seed: int = 0, max_shard_bytes: int = 1 << 30, config=None) -> float:
    """Write the slice (`config`, default Flash's first CSA layer with top-k routing alone) to `path` (config.json,
    shards, index), one tensor encoded at a time; return its size in MB."""
    from safetensors.torch import save_file

    from hf_dsv4.testing.release import release_config_json

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
    config_json = release_config_json(config)
    config_json["num_nextn_predict_layers"] = 0
    config_json["compress_ratios"] = config_json["compress_ratios"][:-1]  # no MTP layer
    config_json["rope_scaling"] = dict(FLASH["rope_parameters"])  # the release's yarn (compressed attention)
    (path / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
    return total / 2**20
