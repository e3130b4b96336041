"""`shard_model` on 2 real gloo ranks: bit-exact weights, buffers and logits, training, and clear errors."""

from __future__ import annotations

import pytest
from dist_launch import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


@pytest.fixture(scope="module")
def parity(tiny_ckpt, blind_ckpt, tmp_path_factory) -> list[dict]:
    # rank 1 reads config.json only; its weight files are garbage
    return run_ranks("parity", tmp_path_factory.mktemp("parity"), str(tiny_ckpt), str(blind_ckpt), timeout=150)


@pytest.fixture(scope="module")
def train(tiny_ckpt, tmp_path_factory) -> list[dict]:
    return run_ranks("train", tmp_path_factory.mktemp("train"), str(tiny_ckpt), timeout=150)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sharded_weights_buffers_and_logits_equal_single_process_bit_for_bit(parity, dtype, tiny_counts):
    for rank, result in enumerate(parity):
        result = result[dtype]
        assert result["bad_params"] == [] and result["bad_buffers"] == [], f"rank {rank}"
        assert result["num_tensors"] == tiny_counts["tensors"]
        assert result["logits_equal"], f"rank {rank}: max diff {result['logits_max_diff']}"
    assert parity[1][dtype]["all_meta"] and not parity[0][dtype]["all_meta"]


def test_cpu_offload_on_cpu_only_machine_is_bit_exact(parity):
    for result in parity:
        assert result["offload"]["bad_params"] == [] and result["offload"]["logits_equal"]


def test_mismatched_model_raises_the_same_error_on_every_rank(parity):
    source, other = parity
    assert source["mismatch"] == other["mismatch"] is not None
    assert "rank 1: 'model.layers.0.mlp.experts.gate_up_proj' is ((8, 64, 64)" in source["mismatch"]


def test_fp32_data_parallel_gradients_equal_single_process_mean(train, tiny_counts):
    for result in train:
        grads = result["grad_parity"]
        assert grads["none_mismatch"] == [] and grads["not_as_accurate"] == []  # judged against float64 (numerics)
        assert grads["with_grad"] == tiny_counts["with_grad"]
        # the lightning indexer gets no gradient from the LM loss, with or without FSDP
        assert all(".compressor.indexer." in n for n in grads["without_grad"])


def test_bf16_training_step_updates_every_parameter_with_a_gradient(train, tiny_counts):
    for result in train:
        step = result["bf16"]
        assert step["changed"] == tiny_counts["with_grad"] and step["trainable"] == tiny_counts["params"]
        assert step["dtypes"] == ["torch.bfloat16", "torch.float32"]  # fp32-kept modules stay fp32
    assert train[0]["bf16"]["loss"] != train[1]["bf16"]["loss"]  # each rank trained on its own batch


def test_bf16_mixed_precision_computes_fp32_kept_modules_in_fp32(train, tiny_counts):
    for result in train:
        assert result["mixed"]["compute_dtypes"] == {
            "model.layers.0.attn_hc.fn": "torch.float32",
            "model.layers.1.self_attn.sinks": "torch.float32",
            "model.norm.weight": "torch.float32",
            "model.layers.0.self_attn.q_a_proj.weight": "torch.bfloat16",
            "model.layers.1.mlp.experts.gate_up_proj": "torch.bfloat16",
        }
        assert result["mixed"]["changed"] == tiny_counts["with_grad"]


def test_lora_on_a_peft_model_trains_adapters_only(train, tiny_counts):
    lora = tiny_counts["lora_attention"]
    assert lora["with_grad"] < lora["trainable"]  # some adapters sit on the gradient-free indexer's projections
    for result in train:
        assert result["lora"]["frozen_changed"] == []
        assert result["lora"]["changed"] == lora["with_grad"] and result["lora"]["trainable"] == lora["trainable"]
