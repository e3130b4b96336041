"""The streamed reader (`hf_dsv4.loading.stream`) in one process: what rank 0 does under
`memory_efficient_init(stream=True)`. Each unit it reads equals stock `from_pretrained`'s tensors bit for bit (Hub and
release layouts, fp32 and bf16, also with a GPU of compute capability 9.0 simulated, where transformers would build
FP8 modules); it holds one unit at a time; bad checkpoints fail before any weight is read, naming the file and
tensor. The 2-rank runs are in test_stream.py."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, DeepseekV4ForCausalLM, PreTrainedModel

from hf_dsv4.loading.pretrained import open_reader, plan_streamed
from hf_dsv4.loading.stream import StreamedCheckpoint

ORIGINAL = PreTrainedModel.__dict__["from_pretrained"]


def streamed(path: Path, dtype: torch.dtype = torch.float32):
    """(meta model, reader) as rank 0 gets them."""
    model, kwargs, fp8_block = plan_streamed(DeepseekV4ForCausalLM, path, (), {"dtype": dtype})
    return model, open_reader(model, ORIGINAL, DeepseekV4ForCausalLM, path, (), kwargs, fp8_block)


def read_all(stream: StreamedCheckpoint) -> dict[str, torch.Tensor]:
    """Every unit, read in turn; the twin must be back on meta after each read (one unit held at a time)."""
    out = {}
    for prefix in stream.prefixes:
        unit = stream.read(prefix)
        assert all(t.is_meta for t in stream.twin.state_dict().values()), prefix
        assert not out.keys() & {prefix + k for k in unit}
        out.update({prefix + k: v for k, v in unit.items()})
    return out


def assert_equal_to_stock(read: dict[str, torch.Tensor], path: Path, dtype: torch.dtype) -> None:
    stock = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).state_dict()
    assert sorted(read) == sorted(stock)
    for name, tensor in stock.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor), name


def quantized(path: Path) -> bool:
    """Whether the checkpoint at `path` stores FP8 / FP4 weights (DeepSeek's release)."""
    return "quantization_config" in json.loads((path / "config.json").read_text())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_every_unit_read_equals_stock_from_pretrained(layout_ckpt, dtype):
    """In every layout (transformers' own save_pretrained included), each tensor lands where stock puts it."""
    path = layout_ckpt
    model, stream = streamed(path, dtype)
    assert all(t.is_meta for t in model.state_dict().values())
    assert getattr(model.config, "quantization_config", None) is None  # read dequantized, as stock on CPU
    assert_equal_to_stock(read_all(stream), path, dtype)


def chunk_rows(rows: int, pieces: int, index: int) -> tuple[int, int]:
    """The rows FSDP2 gives shard `index` of `pieces` (torch.chunk: ceil(rows / pieces) each, the last ones shorter
    or empty)."""
    size = -(-rows // pieces)
    return min(index * size, rows), min((index + 1) * size, rows)


@pytest.mark.parametrize("pieces", [2, 3])
def test_a_rank_reads_only_its_rows_and_gets_exactly_the_rows_of_the_whole_read(layout_ckpt, pieces):
    """`read(prefix, rows)` (what every rank does with readers="all"): each piece of every parameter equals those rows
    of the whole read, bit for bit, dtype included; buffers come whole. Only the experts in the rows are read, and an
    FP8 weight's rows are widened to its 128-row scale blocks only (a block that straddles two shards is read by
    both)."""
    path = layout_ckpt
    _, stream = streamed(path, torch.bfloat16)
    params = {n for n, _ in stream.twin.named_parameters()}
    experts = stream.twin.config.n_routed_experts
    for prefix in stream.prefixes:
        unit = {prefix + k: t for k, t in stream.read(prefix).items()}
        for index in range(pieces):
            rows = {n: chunk_rows(t.shape[0], pieces, index) for n, t in unit.items() if n in params}
            plan = stream._row_plan(prefix, rows)
            expert_keys = [k for k in plan.tensors if re.search(r"\.experts\.\d+\.", k)]
            if prefix and quantized(path):
                start, stop = chunk_rows(experts, pieces, index)
                assert sorted({int(re.search(r"experts\.(\d+)\.", k)[1]) for k in expert_keys}) == [*range(start, stop)]
                assert all(plan.tensors[k].get_shape()[0] % 128 == 0 for k in plan.tensors if k.endswith("wq_b.weight"))
            part = stream.read(prefix, rows)
            assert all(t.is_meta for t in stream.twin.state_dict().values())
            assert {prefix + k for k in part} == set(unit), prefix
            for name, tensor in unit.items():
                start, stop = rows.get(name, (0, tensor.shape[0] if tensor.dim() else 0))
                expected = tensor[start:stop] if name in rows else tensor
                got = part[name[len(prefix) :]]
                assert got.dtype == tensor.dtype and torch.equal(got, expected), (name, index)
                if name in rows and rows[name] != (0, tensor.shape[0]):  # nothing else kept alive
                    assert got.untyped_storage().nbytes() == got.numel() * got.element_size(), name


def test_a_release_checkpoint_is_read_dequantized_on_a_gpu_machine_too(release_ckpt, monkeypatch):
    """Stock from_pretrained on a GPU of compute capability >= 8.9 builds FP8 modules (resident FP8); streamed loading
    reads the weights dequantized into the requested dtype there too, so every rank builds the same plain modules."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    # what stock from_pretrained builds there (its weights left unread: they would be loaded for a GPU)
    kinds = {type(m).__name__ for m in _fp8_model(DeepseekV4ForCausalLM.from_pretrained, release_ckpt).modules()}
    assert {"FP8Linear", "FP8Experts"} <= kinds
    model, stream = streamed(release_ckpt, torch.bfloat16)
    assert not any("FP8" in type(m).__name__ for m in [*model.modules(), *stream.twin.modules()])
    monkeypatch.undo()
    assert_equal_to_stock(read_all(stream), release_ckpt, torch.bfloat16)


def _fp8_model(from_pretrained, path):
    from hf_dsv4 import compat
    from hf_dsv4.loading.stream import without_hub_kernels

    with compat.weights_not_read({}):  # a model on meta: transformers >= 5.25 would kernelize it by default
        return from_pretrained(path, **without_hub_kernels({"dtype": torch.bfloat16}))


# ------------------------------------------------------------------------------------------------- bad input


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite(path: Path, key: str, change) -> Path:
    """Rewrite the shard holding `key` with `change(tensors)` applied; the index follows."""
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    file = path / index["weight_map"][key]
    with safe_open(file, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != file.name} | dict.fromkeys(
        tensors, file.name
    )
    index_path.write_text(json.dumps(index))
    return file


def test_a_missing_tensor_fails_before_any_weight_is_read(tiny_ckpt, tmp_path):
    path = _copy(tiny_ckpt, tmp_path / "ckpt")
    _rewrite(path, "layers.1.attn.wq_a.weight", lambda t: t.pop("layers.1.attn.wq_a.weight"))
    with pytest.raises(
        ValueError, match=r"the checkpoint lacks 1 tensor\(s\) of the model: .*layers\.1\.self_attn\.q_a_proj"
    ):
        streamed(path)


def test_an_unknown_tensor_fails_naming_its_file(tiny_ckpt, tmp_path):
    path = _copy(tiny_ckpt, tmp_path / "ckpt")
    file = _rewrite(path, "layers.0.attn.wq_a.weight", lambda t: t.update({"layers.0.attn.bogus": torch.ones(2)}))
    with pytest.raises(ValueError, match=rf"{file.name}: tensor 'layers.0.attn.bogus' is not part of the model"):
        streamed(path)


def test_a_checkpoint_mixing_two_layouts_of_one_tensor_is_refused_naming_both(tiny_ckpt, tmp_path):
    """`norm.weight` (DeepSeek's name) and `model.norm.weight` (save_pretrained's) both load into the model's final
    norm: stock keeps whichever it reads last, the reader refuses before reading any weight."""
    path = _copy(tiny_ckpt, tmp_path / "ckpt")
    _rewrite(path, "norm.weight", lambda t: t.update({"model.norm.weight": t["norm.weight"].clone()}))
    with pytest.raises(
        ValueError,
        match=r"checkpoint tensors 'model.norm.weight' and 'norm.weight' would both load into 'model.norm.weight'",
    ):
        streamed(path)


def test_an_order_dependent_renaming_in_the_conversion_plan_is_refused(tiny_ckpt, monkeypatch):
    """A renaming activated by the first key it sees (transformers' `GroupWeightRename`) gives answers that depend on
    the order keys are read in; a streamed read goes unit by unit, so it refuses such a plan up front."""
    from transformers import conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    class OrderDependent(WeightRenaming):
        pass

    original = conversion_mapping.get_checkpoint_conversion_mapping

    def mapping(model_type):
        found = original(model_type)
        return found if model_type != "deepseek_v4" else [*found, OrderDependent(r"\.zzz\.", ".yyy.")]

    monkeypatch.setattr(conversion_mapping, "get_checkpoint_conversion_mapping", mapping)
    with pytest.raises(ValueError, match=r"holds OrderDependent .* load it with stream_weights=False"):
        streamed(tiny_ckpt)


def test_a_truncated_shard_fails_naming_the_file(tiny_ckpt, tmp_path):
    path = _copy(tiny_ckpt, tmp_path / "ckpt")
    file = sorted(path.glob("model-*.safetensors"))[1]
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"{file}: not a readable safetensors file"):
        streamed(path)


def test_an_fp8_weight_that_is_not_whole_blocks_is_refused(release_ckpt, tmp_path):
    """192 rows with 2 row scales: DeepSeek's blocks are 128 + 64 rows, transformers would infer 96 + 96."""
    path = _copy(release_ckpt, tmp_path / "ckpt")

    def grow(tensors):
        weight = tensors["layers.0.attn.wq_a.weight"]  # [128, 256], scale [1, 2]
        tensors["layers.0.attn.wq_a.weight"] = torch.cat([weight, weight[:64]])
        tensors["layers.0.attn.wq_a.scale"] = torch.cat([tensors["layers.0.attn.wq_a.scale"]] * 2)

    file = _rewrite(path, "layers.0.attn.wq_a.weight", grow)
    with pytest.raises(ValueError, match=rf"{file.name}: 'layers.0.attn.wq_a.weight' \[192, 256\] .* 128 x 128 blocks"):
        streamed(path)


def test_a_quantization_config_cannot_be_passed(release_ckpt):
    from transformers import FineGrainedFP8Config

    kwargs = {"dtype": torch.bfloat16, "quantization_config": FineGrainedFP8Config()}
    with pytest.raises(ValueError, match="pass no quantization_config"):
        plan_streamed(DeepseekV4ForCausalLM, release_ckpt, (), kwargs)


# ------------------------------------------------------------------------------------------- the initial adapter


def _lora(model):
    from peft import get_peft_model

    from hf_dsv4.training.lora import dsv4_lora_config

    return get_peft_model(model, dsv4_lora_config(r=4, alpha=8, targets="all"))


def test_a_streamed_adapter_starts_from_the_same_draw_as_one_on_loaded_weights(tiny_ckpt):
    """`draw_lora_factors` (what DSV4SFTTrainer applies to the adapter it adds; `seeded_lora_init` at shard time) gives every LoRA pair from its own
    seeded generator, so rank 0 of a streamed load, which allocates the factors only when sharding, draws the same
    adapter as a process that loaded the weights."""
    from hf_dsv4.sharding.streamed import initial_adapter
    from hf_dsv4.training.lora import draw_lora_factors, seeded_lora_init

    loaded = _lora(AutoModelForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32))
    assert draw_lora_factors(loaded, 42) == len([n for n, _ in loaded.named_modules() if n.endswith(".lora_A")])
    expected = {k: v.clone() for k, v in loaded.state_dict().items() if ".lora_" in k}
    model, _ = streamed(tiny_ckpt)
    meta = _lora(model)
    assert draw_lora_factors(meta, 42) == 0  # factors on meta are left for the shard-time draw
    initial = initial_adapter(meta, seeded_lora_init(42))
    assert sorted(initial) == sorted(expected)
    assert all(torch.equal(initial[k], expected[k]) for k in expected)
    a = {k: v for k, v in expected.items() if ".lora_A." in k}
    assert all(v.count_nonzero() == v.numel() and v.abs().max() <= v.shape[1] ** -0.5 for v in a.values())
    assert all(v.count_nonzero() == 0 for k, v in expected.items() if ".lora_B." in k)
    draw_lora_factors(loaded, 43)
    assert not any(torch.equal(v, a[k]) for k, v in loaded.state_dict().items() if k in a)


def test_the_trainer_streams_safetensors_folders_and_hub_ids_and_loads_bin_folders_whole(tiny_ckpt, tmp_path):
    from hf_dsv4.training.trainer import streamable

    assert streamable(str(tiny_ckpt)) and streamable("deepseek-ai/DeepSeek-V4-Flash")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "pytorch_model.bin").write_bytes(b"")
    assert not streamable(str(tmp_path), "sub") and not streamable(str(tmp_path / "sub"))


def test_a_ranks_reads_are_cut_into_pieces_within_the_budget():
    """`read_pieces`: tensors in name order, filled into pieces of at most `budget` bytes, a tensor cut along its rows
    where it does not fit (one row at least, even when a row is larger than the budget), empty spans left out."""
    from hf_dsv4.sharding.fill import read_pieces

    spans = {"a": (0, 10), "b": (4, 8), "c": (3, 3), "d": (0, 1)}
    row_bytes = {"a": 10, "b": 30, "c": 5, "d": 500}
    assert read_pieces(spans, row_bytes, 60) == [
        {"a": (0, 6)}, {"a": (6, 10)}, {"b": (4, 6)}, {"b": (6, 8)}, {"d": (0, 1)}
    ]  # fmt: skip
    assert read_pieces(spans, row_bytes, 10**6) == [{"a": (0, 10), "b": (4, 8), "d": (0, 1)}]
    assert read_pieces({"c": (3, 3)}, row_bytes, 60) == []
