"""Tiny DeepSeek-V4 checkpoints in the Hub layout, built locally (tests, the demo and benchmarks).

The checkpoint on disk uses the original DeepSeek key names (`layers.N.attn.wq_a.weight`, per-expert
`layers.N.ffn.experts.E.w1.weight`, `embed.weight`, `head.weight`, ...) that transformers' conversion mapping renames
and fuses while loading, so every test exercises the same loading path as the released checkpoints. Every parameter
and persistent buffer (`tid2eid`, `e_score_correction_bias`) is random, so a tensor that is lost or left at its
initial value is visible.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

from .tokenizer import tiny_tokenizer

logger = logging.getLogger(__name__)

# One layer of each attention type, hash and top-k routers: the smallest model that covers every code path.
TINY_CONFIG = dict(
    vocab_size=1024,
    hidden_size=64,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=32,
    q_lora_rank=32,
    num_experts_per_tok=2,
    n_routed_experts=4,
    n_shared_experts=1,
    layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
    mlp_layer_types=["hash_moe", "moe", "moe"],
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
    hc_mult=2,
    sliding_window=8,
    o_groups=2,
    o_lora_rank=16,
    index_n_heads=2,
    index_head_dim=16,
    index_topk=4,
    max_position_embeddings=256,
    num_nextn_predict_layers=0,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=2,
)

# transformers parameter name (without the `model.` prefix) -> Hub name; the inverse of transformers'
# `deepseek_v4` conversion mapping, applied in order. Experts are split separately (`_split_experts`).
_TO_HUB = [
    (r"^embed_tokens\.weight$", "embed.weight"),
    (r"^lm_head\.weight$", "head.weight"),
    (r"^hc_head\.hc_(fn|base|scale)$", r"hc_head_\1"),
    (r"\.input_layernorm\.", ".attn_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.(attn|ffn)_hc\.(fn|base|scale)$", r".hc_\1_\2"),
    (r"\.self_attn\.compressor\.indexer\.scorer\.weights_proj\.", ".attn.indexer.weights_proj."),
    (r"\.self_attn\.compressor\.indexer\.q_b_proj\.", ".attn.indexer.wq_b."),
    (r"\.self_attn\.compressor\.indexer\.", ".attn.indexer.compressor."),
    (r"\.self_attn\.", ".attn."),
    (r"\.mlp\.shared_experts\.gate_proj\.", ".ffn.shared_experts.w1."),
    (r"\.mlp\.shared_experts\.down_proj\.", ".ffn.shared_experts.w2."),
    (r"\.mlp\.shared_experts\.up_proj\.", ".ffn.shared_experts.w3."),
    (r"\.mlp\.gate\.e_score_correction_bias$", ".ffn.gate.bias"),
    (r"\.mlp\.", ".ffn."),
    (r"\.sinks$", ".attn_sink"),
    (r"\.kv_norm\.", ".norm."),
    (r"\.q_a_norm\.", ".q_norm."),
    (r"\.position_bias$", ".ape"),
    (r"\.q_a_proj\.", ".wq_a."),
    (r"\.q_b_proj\.", ".wq_b."),
    (r"\.kv_proj\.", ".wkv."),
    (r"\.gate_proj\.", ".wgate."),
    (r"\.o_a_proj\.", ".wo_a."),
    (r"\.o_b_proj\.", ".wo_b."),
]


def tiny_dsv4_config(**overrides) -> DeepseekV4Config:
    """The tiny DeepSeek-V4 config (every layer type, hash and top-k routers); `overrides` replace fields.

    Args:
        **overrides: fields of `TINY_CONFIG` to replace.

    Returns:
        The `DeepseekV4Config`.
    """
    return DeepseekV4Config(**{**TINY_CONFIG, **overrides})


def tiny_dsv4_model(
    layer_types: list[str], dtype: torch.dtype = torch.float32, seed: int = 0, **overrides
) -> DeepseekV4ForCausalLM:
    """The tiny DeepSeek-V4 in memory, for numerical tests: `layer_types` (its first layer hash-routed, the others
    top-k routed), random sinks and compressor position biases (their init leaves them at zero, which would hide
    mistakes), the eager experts loop (grouped_mm has no float64), in `dtype`; deterministic in `seed`.

    Args:
        layer_types: one attention type per layer ("sliding_attention", "compressed_sparse_attention",
            "heavily_compressed_attention").
        dtype: the model's dtype.
        seed: the random seed of the weights.
        **overrides: fields of `TINY_CONFIG` to replace (e.g. `index_topk`).

    Returns:
        The model, in training mode."""
    torch.manual_seed(seed)
    config = tiny_dsv4_config(
        layer_types=layer_types, num_hidden_layers=len(layer_types),
        mlp_layer_types=["hash_moe", *["moe"] * (len(layer_types) - 1)], **overrides,
    )  # fmt: skip
    model = DeepseekV4ForCausalLM(config)
    model.set_experts_implementation("eager")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("sinks", "position_bias")):
                param.normal_(0, 0.5)
    return model.to(dtype)


def hub_name(name: str) -> str:
    """The Hub checkpoint name of a non-expert transformers state-dict key (`model.layers.0.self_attn.q_a_proj.weight`
    -> `layers.0.attn.wq_a.weight`)."""
    name = name.removeprefix("model.")
    for pattern, replacement in _TO_HUB:
        name = re.sub(pattern, replacement, name)
    return name


def _split_experts(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-expert Hub tensors of a fused `experts.gate_up_proj [E, 2I, H]` or `experts.down_proj [E, H, I]`."""
    prefix = hub_name(name.rsplit(".", 1)[0] + ".x").removesuffix(".x")  # `layers.N.ffn.experts`
    out = {}
    for e in range(tensor.shape[0]):
        if name.endswith("gate_up_proj"):
            w1, w3 = tensor[e].chunk(2, dim=0)
            out[f"{prefix}.{e}.w1.weight"], out[f"{prefix}.{e}.w3.weight"] = w1, w3
        else:
            out[f"{prefix}.{e}.w2.weight"] = tensor[e]
    return out


def to_hub_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers DeepSeek-V4 state dict renamed and split into the Hub layout (contiguous tensors)."""
    out = {}
    for name, tensor in state_dict.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            out.update(_split_experts(name, tensor))
        else:
            out[hub_name(name)] = tensor
    return {name: tensor.contiguous() for name, tensor in out.items()}


@torch.no_grad()
def randomize(model: DeepseekV4ForCausalLM, seed: int) -> None:
    """Give every parameter and persistent buffer random values (norm weights around 1, valid hash routes)."""
    gen = torch.Generator().manual_seed(seed)
    config = model.config
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        if name.endswith("norm.weight") or name.endswith("_hc.scale") or name.endswith("hc_scale"):
            param.copy_(1.0 + 0.1 * noise)
        else:
            param.copy_(0.05 * noise)
    for name, buffer in model.named_buffers():
        if name.endswith("tid2eid"):
            order = torch.rand(buffer.shape[0], config.n_routed_experts, generator=gen).argsort(dim=-1)
            buffer.copy_(order[:, : buffer.shape[1]])
        elif name.endswith("e_score_correction_bias"):
            buffer.copy_(0.1 * torch.randn(buffer.shape, generator=gen))


def _shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Split `tensors` (in order) into consecutive groups of at most `max_shard_bytes` (one tensor at least)."""
    shards, current, size = [], {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    return [*shards, current] if current else shards


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    """Sharded safetensors files and `model.safetensors.index.json`, as on the Hub."""
    shards = _shards(tensors, max_shard_bytes)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / filename), metadata={"format": "pt"})
        for name, tensor in shard.items():
            weight_map[name] = filename
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def build_tiny_dsv4(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    max_shard_bytes: int = 64 * 1024,
    tokenizer: bool = True,
    **config_overrides,
) -> Path:
    """Write a random DeepSeek-V4 checkpoint in the Hub layout to `path` and return `path`.

    The directory gets `config.json`, sharded `model-XXXXX-of-YYYYY.safetensors` with the original DeepSeek key
    names, `model.safetensors.index.json` and (unless `tokenizer=False`) the tiny tokenizer. Weights are stored in
    `dtype` except the modules DeepSeek-V4 keeps in fp32. `config_overrides` replace fields of `TINY_CONFIG` (the
    benchmark uses them to build a larger model). Deterministic in `seed`.

    Args:
        path: the directory to write (created if missing).
        dtype: the dtype of the weights not kept in fp32.
        seed: the random seed of the weights.
        max_shard_bytes: the most bytes of tensors per safetensors file.
        tokenizer: whether to save the tiny tokenizer too.
        **config_overrides: fields of `TINY_CONFIG` to replace.

    Returns:
        `path`, as a `Path`.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = tiny_dsv4_config(**config_overrides)
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM._from_config(config, dtype=dtype)
    randomize(model, seed)
    write_safetensors(path, to_hub_state_dict(model.state_dict()), max_shard_bytes)
    model.config.save_pretrained(path)
    if tokenizer:
        tiny_tokenizer().save_pretrained(path)
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    logger.info("wrote a %.1f MB DeepSeek-V4 checkpoint to %s", size / 2**20, path)
    return path
