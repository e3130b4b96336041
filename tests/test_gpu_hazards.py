"""The NCCL/CUDA hazards of the 8-GPU path whose logic runs on a CPU (issue 28): where each tensor goes under CPU
offload. The device choice under every backend string and the policy's reduce dtype are in test_distributed.py and
test_accelerate_plugin.py; what only a GPU can show is fenced with a clear error and listed in docs/limitations.md."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
from transformers import DeepseekV4ForCausalLM

from hf_dsv4.loading.units import decoder_layers, layer_units
from hf_dsv4.sharding.fill import (
    load_in_pieces,
    load_own_rows,
    materialize_buffers,
    own_rows,
    placement,
    state_dict_reader,
)
from hf_dsv4.testing.model import tiny_dsv4_config


@pytest.fixture
def one_rank(tmp_path):
    """A gloo group of one process (FSDP2 and the loaders need a process group; one rank keeps it in-process)."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_placement_puts_parameters_on_the_shard_device_and_buffers_on_the_compute_device():
    module = nn.Linear(2, 2)
    module.register_buffer("inv_freq", torch.ones(2))
    own = module.state_dict(keep_vars=True)
    assert placement(own, "cpu", "cuda:3") == {"weight": "cpu", "bias": "cpu", "inv_freq": "cuda:3"}
    assert placement(own, "cuda:3") == dict.fromkeys(own, "cuda:3")


def _sharded_on_meta(offload: bool) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The tiny model's weights, and the same model on meta sharded per decoder layer (parameters on meta)."""
    config = tiny_dsv4_config()
    torch.manual_seed(0)
    full = DeepseekV4ForCausalLM._from_config(config, dtype=torch.float32).state_dict()
    with torch.device("meta"):
        model = DeepseekV4ForCausalLM._from_config(config, dtype=torch.float32)
    policy = CPUOffloadPolicy(pin_memory=False) if offload else None
    for layer in decoder_layers(model):
        fully_shard(layer, offload_policy=policy)
    fully_shard(model, offload_policy=policy)
    return model, full


def _reader(model: nn.Module, full: dict[str, torch.Tensor]):
    """`read(prefix, rows, only)` over a full state dict, as `stream_reader` answers it."""
    return state_dict_reader(full, [prefix for prefix, _ in layer_units(model)])


@pytest.mark.parametrize("budget", [None, 4096])
def test_own_rows_put_offloaded_shards_on_the_cpu_and_buffers_on_the_compute_device(one_rank, budget):
    """Under CPU offload the shards go to the CPU, every buffer to the compute device (here "meta" stands in for the
    GPU: a CPU-only machine has one real device, and meta shows where each tensor was sent)."""
    model, full = _sharded_on_meta(offload=True)
    materialize_buffers(model, "meta")
    load_own_rows(model, _reader(model, full), "cpu", budget, buffers_on="meta")
    params = {n: p.to_local().device.type for n, p in model.named_parameters()}
    buffers = {n: b.device.type for n, b in model.named_buffers()}
    assert set(params.values()) == {"cpu"} and set(buffers.values()) == {"meta"}
    assert len(buffers) > 0 and any("tid2eid" in n for n in buffers) and any("inv_freq" in n for n in buffers)
    for name, param in model.named_parameters():
        assert own_rows(param) == (0, param.shape[0])
        assert torch.equal(param.to_local(), full[name]), name


def test_pieces_sent_by_rank_0_follow_the_same_placement(one_rank):
    model, full = _sharded_on_meta(offload=True)
    materialize_buffers(model, "meta")
    load_in_pieces(model, _reader(model, full), "cpu", 4096, comm_device="cpu", buffers_on="meta")
    assert {p.to_local().device.type for p in model.parameters()} == {"cpu"}
    assert {b.device.type for b in model.buffers()} == {"meta"}
    assert all(torch.equal(p.to_local(), full[n]) for n, p in model.named_parameters())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_hub_download_longer_than_the_process_group_timeout_is_waited_for_on_every_rank(
    tiny_ckpt, tmp_path, monkeypatch
):
    """Hazard 7: the download happens before any collective under the process group's timeout (4 s here, NCCL's
    10-30 minutes on a GPU node); the ranks wait in a gloo group of their own. The download (a stand-in that sleeps
    6 s, then resolves the id in a local Hugging Face cache: no network here) is done by rank 0 alone, or with
    readers="all" by the lowest rank of each machine (one here); a failure is raised on every rank."""
    from dist_launch import run_ranks

    from hf_dsv4.testing.layouts import HF_CACHE_REPO, as_hf_cache

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the Auto class would look for an adapter on the Hub first
    cache = tmp_path / "hub"
    as_hf_cache(tiny_ckpt, cache)
    ranks = run_ranks("hub_download", tmp_path / "run", str(cache), HF_CACHE_REPO, timeout=240)
    for rank, result in enumerate(ranks):
        downloads = [HF_CACHE_REPO] if rank == 0 else []
        assert result["rank0"] == {
            "downloads": downloads, "name_or_path": HF_CACHE_REPO, "on_meta": rank != 0, "reads": False,
        }  # fmt: skip
        assert result["stream_all"] == {
            "downloads": downloads, "name_or_path": HF_CACHE_REPO, "on_meta": True, "reads": True,
        }  # fmt: skip
        assert result["failed"].startswith(
            f"rank 0 could not load the checkpoint: OSError: could not reach the Hub for {HF_CACHE_REPO}"
        )


def test_the_flex_mask_captures_the_lengths_as_tensors_so_a_new_length_does_not_recompile():
    """Hazard 5: an int captured by `mask_mod` is a constant of the compiled graph (one recompile per length, then
    flex's dense fallback); the lengths must be tensors. Checked on the CSA, HCA and sliding selections' masks."""
    from hf_dsv4.modeling.sparse_attention import CausalEntries, TopKEntries, flex_mask_mod

    class Mask:  # what `compat.mask_function_with_padding` reads of a SparseMask: its mask function, no padding
        mask_function = staticmethod(lambda b, h, q, kv: kv <= q)
        attention_mask, kv_length, kv_offset = None, 3, 0

    picks = torch.tensor([[[0, 1], [1, 2], [0, 2]]])
    # query 1 sees keys 0-1 of 3, then: no entries; entries < threshold 2; its picks 1 and 2
    expected = [
        (None, [True, True, False, False, False, False]),
        (CausalEntries(threshold=torch.tensor([[1, 2, 3]])), [True, True, False, True, True, False]),
        (TopKEntries(indices=picks), [True, True, False, False, True, True]),
    ]
    zero = torch.zeros((), dtype=torch.long)
    for selection, allowed in expected:
        mask_mod = flex_mask_mod(Mask(), selection, 3, 3, "cpu")
        captured = [cell.cell_contents for cell in mask_mod.__closure__]
        assert not [c for c in captured if isinstance(c, int)], selection
        assert [bool(mask_mod(zero, zero, torch.tensor(1), torch.tensor(kv))) for kv in range(6)] == allowed


def test_flex_tiles_for_flash_head_dim_fit_the_shared_memory_of_an_h100():
    """Hazard 5: flex's default tiles at head_dim 512 exceed 228 KB of shared memory; ours hold q, k and v tiles in
    bf16 within it (forward: BLOCK_M x D + 2 x BLOCK_N x D; backward: the same for its two passes)."""
    from hf_dsv4.modeling.sparse_attention import flex_kernel_options

    assert flex_kernel_options(128) is None and flex_kernel_options(256) is None
    tiles = flex_kernel_options(512)
    for m, n in (("BLOCK_M", "BLOCK_N"), ("BLOCK_M1", "BLOCK_N1"), ("BLOCK_M2", "BLOCK_N2")):
        assert (tiles[m] + 2 * tiles[n]) * 512 * 2 <= 228 * 1024 // 2, m  # half of the SM's: room for the rest
    assert 128 % tiles["BLOCK_N"] == 0 and 128 % tiles["BLOCK_M"] == 0  # the block mask's 128-row blocks


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_failure_where_one_rank_works_alone_is_raised_on_every_rank_at_once(tiny_ckpt, release_ckpt, tmp_path):
    """The failure rule at each step of `shard_model` that one rank runs alone before a collective: the same error
    on every rank within seconds, not after the process group's 30 s timeout."""
    from dist_launch import run_ranks

    ranks = run_ranks("rank_failures", tmp_path, str(tiny_ckpt), str(release_ckpt), timeout=240)
    expected = {
        "quantized_plan": "OSError: the quantization config cannot be read",
        "rank0_part": "ShardingError: rank 0 cannot send 1 tensor(s): 'model.layers.0.",
        "own_rows": "RuntimeError: out of memory assigning the shards",
        "pieces": "RuntimeError: out of memory assigning the shards",
    }
    for name, text in expected.items():
        errors = [result[name]["error"] for result in ranks]
        assert errors[0] == errors[1] and errors[0].startswith(text), (name, errors)
        assert max(result[name]["seconds"] for result in ranks) < 15, name
