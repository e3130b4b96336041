"""Hybrid sharding (HSDP) on 4 real gloo ranks: `shard_model` on a (dp_replicate=2, dp_shard=2) mesh.

Every parameter is replicated across the 2 replica groups and sharded on dim 0 within each; weights, buffers and
logits equal a single process bit for bit, and fp32 gradients equal the single-process mean over the 4 batches.
"""

from __future__ import annotations

import pytest
from dist_launch import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


@pytest.fixture(scope="module")
def ranks(tiny_ckpt, tmp_path_factory) -> list[dict]:
    return run_ranks("hsdp", tmp_path_factory.mktemp("hsdp"), str(tiny_ckpt), world_size=4, timeout=240)


def test_parameters_are_replicated_across_groups_and_sharded_within(ranks, tiny_counts):
    for rank, result in enumerate(ranks):
        assert result["placements"] == {"(Replicate(), Shard(dim=0))": tiny_counts["params"]}
        assert result["meshes"] == [[[2, 2], ["dp_replicate", "dp_shard"]]]
        replica, shard = result["coordinate"]
        assert (replica, shard) == divmod(rank, 2)
        # dp_shard rank s holds torch.chunk's s-th piece of dim 0 (the 3-element hyper-connection scales: 2 + 1)
        for local, full in result["local_shapes"].values():
            first = -(-full[0] // 2)
            assert local == [first if shard == 0 else full[0] - first, *full[1:]]
    digests = [result["local_shards_sha256"] for result in ranks]
    assert digests[0] == digests[2] != digests[1] == digests[3]  # replicas hold the same shards


def test_weights_buffers_and_logits_equal_single_process_bit_for_bit(ranks, tiny_counts):
    for rank, result in enumerate(ranks):
        assert result["bad_params"] == [] and result["bad_buffers"] == [], f"rank {rank}"
        assert result["num_tensors"] == tiny_counts["tensors"]
        assert result["logits_equal"], f"rank {rank}: max diff {result['logits_max_diff']}"


def test_fp32_gradients_equal_the_single_process_mean_over_the_four_batches(ranks, tiny_counts):
    for result in ranks:
        grads = result["grad_parity"]
        assert grads["none_mismatch"] == [] and grads["not_as_accurate"] == []  # against float64 (numerics)
        assert grads["with_grad"] == tiny_counts["with_grad"]
        assert all(".compressor.indexer." in n for n in grads["without_grad"])
    assert len({str(result["grad_parity"]) for result in ranks}) == 1  # every rank sees the same full gradients
