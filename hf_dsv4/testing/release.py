"""Tiny DeepSeek-V4 checkpoints in the release layout (deepseek-ai/DeepSeek-V4-Flash as downloaded), built locally.

The release stores most projections quantized, with DeepSeek-native names and no `model.` prefix:

- FP8 e4m3 `<name>.weight` with a ue8m0 (`float8_e8m0fnu`) 128x128 block scale `<name>.scale`
  [ceil(out/128), ceil(in/128)]: attention `wq_a, wq_b, wkv, wo_a, wo_b`, the indexer's `wq_b`, the shared experts and
  the MTP block's `e_proj, h_proj`. W = q * 2^(s-127) per block.
- FP4 e2m1 routed experts: `.weight` int8 [out, in/2], two codes per byte, the low nibble is the even column;
  `.scale` ue8m0 [out, in/32]. W = FP4_TABLE[code] * 2^(s-127).
- bf16 embeddings, head, norms, router and compressor/indexer projections; fp32 `attn_sink`, `ape`, `gate.bias`
  and hyper-connections; int64 `tid2eid` on hash layers; an `mtp.0.*` block that transformers ignores.

`config.json` uses the release's field names (`compress_ratios` with one entry per layer plus the MTP layer's,
`num_hash_layers`, `qk_rope_head_dim`, `quantization_config`, `expert_dtype`), which transformers folds into its own.
Every value is generated as codes and power-of-two scales, so the dequantized weights are exact in bf16.
`release_reference_state_dict` decodes the files with DeepSeek's `inference/convert.py` arithmetic (written here, not
transformers') into the state dict that `DeepseekV4ForCausalLM.from_pretrained` must produce.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

from .model import TINY_CONFIG, hub_name, randomize, to_hub_state_dict, write_safetensors
from .tokenizer import tiny_tokenizer

logger = logging.getLogger(__name__)

FP8_BLOCK = 128  # FP8 weights: one scale per 128x128 block
FP4_BLOCK = 32  # FP4 experts: one scale per 1x32 block
# DeepSeek's e2m1 table (`inference/convert.py`): code 8 is +0.0 here, -0.0 in transformers.
FP4_TABLE = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])

# What deepseek-ai/DeepSeek-V4-Flash's config.json carries; `expert_dtype` is top level (V4-Pro and later Flash
# revisions; transformers moves it into the quantization config).
QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "scale_fmt": "ue8m0",
    "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
}

# `TINY_CONFIG` widened so that every FP8 weight has dims that are multiples of 128 and every FP4 expert an inner dim
# that is a multiple of 32 (transformers infers the block size from the shapes), with the release's compression
# rates (its `compress_ratios` only know 0, 4 and 128).
RELEASE_OVERRIDES = dict(
    hidden_size=256,
    q_lora_rank=128,
    num_attention_heads=2,
    head_dim=128,
    o_groups=2,
    o_lora_rank=128,
    index_n_heads=2,
    index_head_dim=64,
    moe_intermediate_size=128,
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
)

_COMPRESS_RATIO = {"sliding_attention": 0, "compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
# release tensor names by how DeepSeek stores them: FP8 e4m3 (+ 128 x 128 block scales), FP4 e2m1 routed experts
# (+ 1 x 32 scales), float32
FP8_WEIGHTS = re.compile(
    r"(\.attn\.(wq_a|wq_b|wkv|wo_a|wo_b|indexer\.wq_b)|\.shared_experts\.w[123]|^mtp\.\d+\.[eh]_proj)\.weight$"
)
FP4_WEIGHTS = re.compile(r"\.ffn\.experts\.\d+\.w[123]\.weight$")
FP32_WEIGHTS = re.compile(r"(\.attn_sink|\.ape|\.gate\.bias|(^|\.)hc_(attn|ffn|head)_(fn|base|scale))$")
# Scale exponents (2^(s-127)): small weights, so a forward pass stays finite.
_FP8_EXPONENTS = (127 - 14, 127 - 10)
_FP4_EXPONENTS = (127 - 8, 127 - 5)


def release_dsv4_config(num_hidden_layers: int | None = None, **overrides) -> DeepseekV4Config:
    """The tiny config widened for the release layout (`RELEASE_OVERRIDES`); `overrides` replace fields.

    `num_hidden_layers` repeats the tiny model's schedule (sliding, compressed-sparse, heavily-compressed attention;
    one hash-routed layer first) to that depth, unless `overrides` set `layer_types` / `mlp_layer_types` themselves.
    """
    fields = {**TINY_CONFIG, **RELEASE_OVERRIDES}
    if num_hidden_layers is not None:
        pattern, n_hash = fields["layer_types"], fields["mlp_layer_types"].count("hash_moe")
        fields["num_hidden_layers"] = num_hidden_layers
        fields["layer_types"] = [pattern[i % len(pattern)] for i in range(num_hidden_layers)]
        fields["mlp_layer_types"] = ["hash_moe" if i < n_hash else "moe" for i in range(num_hidden_layers)]
    return DeepseekV4Config(**{**fields, **overrides})


def release_config_json(config: DeepseekV4Config) -> dict:
    """`config` written with the release's field names (what transformers folds in `DeepseekV4Config.__post_init__`)."""
    if config.compress_rates != {k: v for k, v in _COMPRESS_RATIO.items() if v}:
        raise ValueError(f"the release config can only express compress rates 4 and 128, got {config.compress_rates}")
    n_hash = config.mlp_layer_types.count("hash_moe")
    if config.mlp_layer_types != ["hash_moe"] * n_hash + ["moe"] * (config.num_hidden_layers - n_hash):
        raise ValueError(f"the release config needs the hash-routed layers first, got {config.mlp_layer_types}")
    derived = ("layer_types", "mlp_layer_types", "compress_rates", "rope_parameters", "partial_rotary_factor")
    out = {key: value for key, value in config.to_dict().items() if key not in derived}
    out.pop("_name_or_path", None)
    out.update(
        architectures=["DeepseekV4ForCausalLM"],
        compress_ratios=[_COMPRESS_RATIO[t] for t in config.layer_types] + [0],  # the MTP layer slides
        num_hash_layers=n_hash,
        qk_rope_head_dim=config.qk_rope_head_dim,
        num_nextn_predict_layers=1,
        expert_dtype="fp4",
        quantization_config=QUANTIZATION_CONFIG,
        torch_dtype="bfloat16",
    )
    out.pop("dtype", None)
    return out


def _check_divisible(name: str, shape: torch.Size, block: tuple[int, int]) -> None:
    if shape[0] % block[0] or shape[1] % block[1]:
        raise ValueError(
            f"{name} {tuple(shape)} is not a multiple of the {block[0]}x{block[1]} quantization block: transformers "
            "infers the block size from the shapes and would dequantize it wrong; choose config dims that divide"
        )


def _ue8m0(exponents: torch.Tensor) -> torch.Tensor:
    """ue8m0 scales with the given biased exponents (the byte s means 2^(s-127))."""
    return exponents.to(torch.uint8).view(torch.float8_e8m0fnu)


def encode_fp8(name: str, shape: torch.Size, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random FP8 e4m3 codes and ue8m0 128x128 block scales (`weight`, `scale`) for a weight of `shape`."""
    _check_divisible(name, shape, (FP8_BLOCK, FP8_BLOCK))
    codes = (32 * torch.randn(shape, generator=gen)).clamp(-448, 448).to(torch.float8_e4m3fn)
    grid = (shape[0] // FP8_BLOCK, shape[1] // FP8_BLOCK)
    return codes, _ue8m0(torch.randint(*_FP8_EXPONENTS, grid, generator=gen))


def encode_fp4(name: str, shape: torch.Size, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random e2m1 codes packed two per int8 byte (low nibble = even column) and ue8m0 1x32 block scales."""
    _check_divisible(name, shape, (1, FP4_BLOCK))
    codes = torch.randint(0, 16, shape, generator=gen, dtype=torch.uint8)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).view(torch.int8)
    return packed, _ue8m0(torch.randint(*_FP4_EXPONENTS, (shape[0], shape[1] // FP4_BLOCK), generator=gen))


def _scale_factors(scale: torch.Tensor) -> torch.Tensor:
    """2^(s-127) for the ue8m0 bytes of `scale`, computed from the raw bytes (not torch's e8m0 conversion)."""
    return torch.ldexp(torch.ones(scale.shape), scale.view(torch.uint8).to(torch.int32) - 127)


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """DeepSeek's FP8 decode: every 128x128 block of `weight` times its 2^(s-127) (float32, exact)."""
    rows, cols = weight.shape
    factors = _scale_factors(scale).repeat_interleave(FP8_BLOCK, 0)[:rows].repeat_interleave(FP8_BLOCK, 1)[:, :cols]
    return weight.float() * factors


def dequantize_fp4(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """DeepSeek's FP4 decode (`cast_e2m1fn_to_e4m3fn` before the FP8 rescale): `FP4_TABLE` of the low then high
    nibble of each byte, times 2^(s-127) per 32 columns (float32, exact)."""
    packed = weight.view(torch.uint8)
    codes = torch.stack([packed & 0x0F, (packed >> 4) & 0x0F], dim=-1).flatten(-2)
    return FP4_TABLE[codes.long()] * _scale_factors(scale).repeat_interleave(FP4_BLOCK, 1)


def _mtp_extras(config: DeepseekV4Config, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The MTP block's own tensors (besides a decoder layer's): input projections, norms, head hyper-connection."""
    hidden, hc = config.hidden_size, config.hc_mult
    extras = {f"mtp.0.{n}.weight": torch.randn(hidden, hidden, generator=gen) for n in ("e_proj", "h_proj")}
    extras |= {f"mtp.0.{n}.weight": 1 + 0.1 * torch.randn(hidden, generator=gen) for n in ("enorm", "hnorm", "norm")}
    extras["mtp.0.hc_head_fn"] = 0.05 * torch.randn(hc, hc * hidden, generator=gen)
    extras["mtp.0.hc_head_base"] = 0.05 * torch.randn(hc, generator=gen)
    extras["mtp.0.hc_head_scale"] = 1 + 0.1 * torch.randn(1, generator=gen)
    return extras


def _release_tensors(config: DeepseekV4Config, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random release-layout tensors: the model plus one MTP layer (built as an extra sliding, top-k decoder layer)."""
    n = config.num_hidden_layers
    with_mtp = DeepseekV4Config(
        **{
            **config.to_dict(),
            "num_hidden_layers": n + 1,
            "layer_types": [*config.layer_types, "sliding_attention"],
            "mlp_layer_types": [*config.mlp_layer_types, "moe"],
        }
    )
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM._from_config(with_mtp, dtype=torch.float32)
    randomize(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    plain = {re.sub(rf"^layers\.{n}\.", "mtp.0.", k): v for k, v in to_hub_state_dict(model.state_dict()).items()}
    plain |= _mtp_extras(config, gen)
    out = {}
    for name, tensor in plain.items():
        if FP8_WEIGHTS.search(name) or FP4_WEIGHTS.search(name):
            encode = encode_fp8 if FP8_WEIGHTS.search(name) else encode_fp4
            out[name], out[name.removesuffix(".weight") + ".scale"] = encode(name, tensor.shape, gen)
        elif tensor.dtype == torch.int64:
            out[name] = tensor.contiguous()
        else:
            out[name] = tensor.to(torch.float32 if FP32_WEIGHTS.search(name) else dtype).contiguous()
    return out


def build_release_dsv4(
    path: str | Path,
    *,
    dtype_of_unquantized: torch.dtype = torch.bfloat16,
    seed: int = 0,
    num_hidden_layers: int | None = None,
    max_shard_bytes: int = 1 << 20,
    **config_overrides,
) -> Path:
    """Write a random DeepSeek-V4 checkpoint in the release layout to `path` and return `path`.

    The directory gets a release-style `config.json`, sharded `model-XXXXX-of-YYYYY.safetensors` with FP8 / FP4
    weights and ue8m0 scales under DeepSeek-native names (see the module docstring), `mtp.0.*` tensors,
    `model.safetensors.index.json` and the tiny tokenizer. Tensors the release keeps in bf16 are stored in
    `dtype_of_unquantized`. `num_hidden_layers` and `config_overrides` go to `release_dsv4_config`. Deterministic in
    `seed`. `release_reference_state_dict(path)` gives the weights transformers must load from it.

    Args:
        path: the directory to write (created if missing).
        dtype_of_unquantized: the dtype of the tensors the release keeps unquantized.
        seed: the random seed of the weights.
        num_hidden_layers: the depth (None: the tiny model's), as in `release_dsv4_config`.
        max_shard_bytes: the most bytes of tensors per safetensors file.
        **config_overrides: config fields to replace, as in `release_dsv4_config`.

    Returns:
        `path`, as a `Path`.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = release_dsv4_config(num_hidden_layers, **config_overrides)
    config_json = release_config_json(config)
    tensors = _release_tensors(config, seed, dtype_of_unquantized)
    write_safetensors(path, tensors, max_shard_bytes)
    (path / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
    tiny_tokenizer().save_pretrained(path)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    logger.info("wrote a %.1f MB release-layout DeepSeek-V4 checkpoint to %s", size / 2**20, path)
    return path


def _read_release(path: Path) -> dict[str, torch.Tensor]:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    tensors = {}
    for filename in sorted(set(index["weight_map"].values())):
        with safe_open(str(path / filename), framework="pt") as f:
            tensors |= {name: f.get_tensor(name) for name in f.keys()}
    return tensors


def _decode(name: str, release: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float32 (or int64) value of the release tensor `name`, dequantized when it has a `.scale`."""
    tensor, scale = release[name], release.get(name.removesuffix(".weight") + ".scale")
    if scale is None:
        return tensor if tensor.dtype == torch.int64 else tensor.float()
    return dequantize_fp4(tensor, scale) if tensor.dtype == torch.int8 else dequantize_fp8(tensor, scale)


def release_reference_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict (transformers names, float32 / int64) that the release checkpoint at `path` decodes to.

    Independent of transformers' loading: DeepSeek's dequantization, `hub_name` for the names and the experts fused
    here (`gate_up_proj[e] = cat(w1, w3)`, `down_proj[e] = w2`). Raises if a non-MTP tensor of the checkpoint is not
    used, so a stray or misnamed tensor is visible.

    Args:
        path: a checkpoint folder that `build_release_dsv4` wrote.

    Returns:
        Transformers state-dict name -> tensor, for every key of the model's state dict.

    Raises:
        ValueError: the checkpoint has a tensor (outside `mtp.*`) the model does not use.
    """
    path = Path(path)
    release = _read_release(path)
    with torch.device("meta"):
        model = DeepseekV4ForCausalLM(DeepseekV4Config.from_pretrained(path))
    used, reference = set(), {}
    for key in model.state_dict():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            prefix = hub_name(key.rsplit(".", 1)[0] + ".x").removesuffix(".x")  # `layers.N.ffn.experts`
            parts = ("w1", "w3") if key.endswith("gate_up_proj") else ("w2",)
            names = [[f"{prefix}.{e}.{w}.weight" for w in parts] for e in range(model.config.n_routed_experts)]
            reference[key] = torch.stack([torch.cat([_decode(n, release) for n in per_expert]) for per_expert in names])
            used.update(n for per_expert in names for n in per_expert)
        else:
            name = hub_name(key)
            reference[key] = _decode(name, release)
            used.add(name)
    scales = {n.removesuffix(".weight") + ".scale" for n in used}
    stray = sorted(n for n in release if n not in used | scales and not n.startswith("mtp."))
    if stray:
        raise ValueError(f"release checkpoint {path} has tensors the model does not use: {stray[:5]}")
    return reference
