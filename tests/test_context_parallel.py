"""Context parallelism (`enable_context_parallel`): one sequence split across gloo ranks, each running the model on
its own contiguous chunk, gives the logits and every gradient (summed over the ranks) of the whole sequence in one
process — float64 throughout (`numerics.float64_throughout`) to 1e-10, for lengths that are and are not multiples
of the ranks x the compression ratios, chunks shorter than the halo, under FSDP2 and with decoder layers
recomputed in backward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hf_dsv4.modeling import SparseAttentionError
from hf_dsv4.modeling.context_parallel import chunk_bounds, chunk_inputs, enable_context_parallel
from hf_dsv4.testing.model import tiny_dsv4_model


def test_chunk_bounds_split_a_sequence_into_contiguous_near_equal_chunks():
    assert chunk_bounds(45, 4) == [(0, 12), (12, 23), (23, 34), (34, 45)]
    assert chunk_bounds(64, 2) == [(0, 32), (32, 64)]
    assert chunk_bounds(3, 4) == [(0, 1), (1, 2), (2, 3), (3, 3)]


def test_it_needs_torch_distributed_and_sparse_attention():
    model = tiny_dsv4_model(["sliding_attention"])
    with pytest.raises(SparseAttentionError, match="torch.distributed initialized"):
        enable_context_parallel(model)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "world,length", [(4, 45), (4, 20), (2, 64)], ids=["4x45", "4x20-short-chunks", "2x64-multiple"]
)
def test_split_across_ranks_the_logits_and_every_gradient_are_the_whole_sequences(world, length, tmp_path):
    """The tiny model, all three attention types twice (window 8, CSA every 4 tokens with the indexer keeping 3, HCA
    every 8; a halo of 7 tokens), full fine-tuning: 45 tokens on 4 ranks (a multiple of nothing), 20 on 4 ranks (chunks of 5,
    shorter than the halo: it comes from two ranks back), 64 (a multiple of 2 x 8 x 4). Plain, and FSDP2-sharded over
    the same ranks; sharded with decoder layers checkpointed, bit for bit the same as without. Unsharded, each layer
    all-gathers the ranks' bounds from their positions; sharded, the batch carries them (`chunk_inputs`)."""
    from dist_launch import run_ranks

    for result in run_ranks("context_parallel", tmp_path, str(length), world_size=world, timeout=280):
        assert result["same_grads"] and result["grads"] > 150, result
        assert result["logits"] < 1e-10 and result["worst_grad"][0] < 1e-10, result
        assert result["sharded_logits"] < 1e-10 and result["sharded_worst_grad"][0] < 1e-10, result
        assert result["checkpointed_equal"], result


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_packed_row_split_across_ranks_trains_each_sample_as_in_one_process(tmp_path):
    """Packing and context parallelism compose: seven samples (13, 32, 3, 21, 8, 40, 1 tokens) packed in one row and
    the row split over 4 ranks (chunks of 30, 30, 29, 29 tokens: boundaries inside samples, a sample shorter than a block, one of a single
    token): the logits and every gradient equal the packed row in one process (each sample as if alone), plain and
    FSDP2-sharded, float64 throughout."""
    from dist_launch import run_ranks

    for result in run_ranks("context_parallel_packed", tmp_path, world_size=4, timeout=280):
        assert result["samples"] == 7 and result["grads"] > 150, result
        for name in ("parallel", "sharded"):
            assert result[name]["logits"] < 1e-10 and result[name]["worst_grad"][0] < 1e-10, result
            assert result[name]["extra"] == [], result


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_batch_shorter_than_an_hca_block_still_gives_the_compressor_a_gradient_under_fsdp2(tmp_path):
    """Data parallelism, one rank's batch shorter than an HCA block: its HCA compressor makes no entry; sparse
    attention still computes that empty entry list from the compressor's projections, so its parameters get zero
    gradients there, and both ranks reduce the same tensors (with none on one rank, FSDP2 reduce-scatters different
    lists on the two ranks: a collective mismatch, or a hang on NCCL). The step gives the two batches' gradients."""
    from dist_launch import run_ranks

    for result in run_ranks("uneven_lengths", tmp_path, timeout=100):
        assert result["hca_params"] >= 3 and result["missing"] == [], result
        assert result["worst"][0] < 1e-10, result


def test_chunk_inputs_gives_each_rank_its_chunk_with_labels_shifted_before_the_split():
    ids = torch.arange(10, 21)[None]  # 11 tokens over 2 ranks: 6 + 5
    labels = ids.clone()
    labels[0, :3] = -100
    first = chunk_inputs({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}, 0, 2)
    second = chunk_inputs({"input_ids": ids, "labels": labels}, 1, 2)
    assert "attention_mask" not in first
    assert first["input_ids"].tolist() == [list(range(10, 16))] and second["input_ids"].tolist() == [
        list(range(16, 21))
    ]
    assert first["position_ids"].tolist() == [list(range(6))] and second["position_ids"].tolist() == [
        list(range(6, 11))
    ]
    # every rank's bounds, for the attention layers (no collective to learn them)
    assert first["context_parallel_bounds"] == second["context_parallel_bounds"] == ((0, 6), (6, 11))
    # rank 0's last token is trained on rank 1's first: the shift happened before the split
    assert first["shift_labels"].tolist() == [[-100, -100, 13, 14, 15, 16]]
    assert second["shift_labels"].tolist() == [[17, 18, 19, 20, -100]]
    padded = torch.ones_like(ids)
    padded[0, -1] = 0
    with pytest.raises(SparseAttentionError, match="whole sequences"):
        chunk_inputs({"input_ids": ids, "attention_mask": padded}, 0, 2)
    packed = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7]])  # two samples: 3 + 8 tokens
    row = chunk_inputs({"input_ids": ids, "position_ids": packed}, 1, 2)
    assert row["context_parallel_samples"] == ((0, 3), (3, 11)) and row["position_ids"].tolist() == [[3, 4, 5, 6, 7]]
    with pytest.raises(SparseAttentionError, match="one packed row at a time"):
        chunk_inputs({"input_ids": ids.expand(2, -1), "position_ids": packed.expand(2, -1)}, 0, 2)


@pytest.mark.parametrize("name", ["fsdp2_cpu_2proc_cp2.yaml", "fsdp2_1node_8gpu_cp8.yaml"])
def test_the_context_parallel_launch_configs_multiply_to_their_processes(name):
    """accelerate checks at launch that the parallelism sizes multiply to the processes; the cp configs keep FSDP2."""
    from pathlib import Path

    import yaml

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "accelerate_configs" / name).read_text())
    sizes = config["parallelism_config"]
    assert sizes["parallelism_config_dp_shard_size"] * sizes["parallelism_config_cp_size"] == config["num_processes"]
    assert sizes["parallelism_config_cp_size"] > 1 and config["fsdp_config"]["fsdp_version"] == 2


def test_the_load_balance_table_splits_the_whole_sequences_work_and_later_chunks_cost_more():
    """`benchmarks/bench_context_parallel.py --balance`: the per-rank FLOPs of 4 chunks add up to one rank's of the
    whole sequence (splitting moves no work), everything but attention costs the same per chunk, and each later
    chunk's indexer and attention cost more (causal: more earlier entries)."""
    import importlib.util
    import sys
    from pathlib import Path

    from hf_dsv4.testing.model import tiny_dsv4_config

    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(benchmarks))
    spec = importlib.util.spec_from_file_location("bench_context_parallel", benchmarks / "bench_context_parallel.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    config = tiny_dsv4_config()
    (whole,) = bench.rank_flops(config, 4096, 1)
    parts = bench.rank_flops(config, 4096, 4)
    for key in ("indexer", "attention", "rest"):
        assert sum(p[key] for p in parts) == pytest.approx(whole[key], rel=1e-12), key
    assert len({p["rest"] for p in parts}) == 1
    for key in ("indexer", "attention"):
        assert all(a[key] < b[key] for a, b in zip(parts, parts[1:])), key


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_lora_over_a_quantized_base_split_over_two_ranks_trains_like_one_process(release_ckpt, tmp_path):
    """The main job on DeepSeek's release layout (FP8 / FP4), `fsdp2_cpu_2proc_cp2.yaml`: LoRA 'all' over the
    quantized-resident base (experts per expert), decoder layers checkpointed, FSDP2, each sequence split over the two
    ranks, vs one process over the dequantized base without checkpointing: the same loss and gradient norm at every
    step within the per-expert rounding (tests/test_quantized.py; measured: 1e-6 relative)."""
    import json

    from dist_launch import AccelerateRun

    repo = Path(__file__).resolve().parents[1]
    args = ["--model_name_or_path", str(release_ckpt), "--dataset_name", str(repo / "recipes/data/dsv4_demo.jsonl"),
            "--dtype", "float32", "--max_length", "192", "--max_steps", "3", "--logging_steps", "1",
            "--per_device_train_batch_size", "1", "--learning_rate", "0.01", "--lora_target_modules", "all",
            "--report_to", "none", "--seed", "7", "--save_strategy", "no"]  # fmt: skip
    cp2 = ["--config_file", str(repo / "accelerate_configs" / "fsdp2_cpu_2proc_cp2.yaml")]
    one = ["--num_processes", "1", "--num_cpu_threads_per_process", "1", "--cpu"]
    variants = {"cp2_quantized": (cp2, ["--keep_quantized", "true", "--activation_checkpointing", "true"]),
                "single": (one, [])}  # fmt: skip
    runs = {name: AccelerateRun(name, launcher, str(repo / "tests/recipe_script.py"),
                                [*args, *extra, "--output_dir", str(tmp_path / name)], tmp_path)
            for name, (launcher, extra) in variants.items()}  # fmt: skip
    losses = {}
    for name, run in runs.items():
        if run.wait(800) != 0 or not (tmp_path / name / "test_result.json").is_file():
            raise run.failure("no result")
        result = json.loads((tmp_path / name / "test_result.json").read_text())
        losses[name] = [(e["step"], e["loss"], e["grad_norm"]) for e in result["log_history"] if "loss" in e]
    assert "kept quantized" in (tmp_path / "cp2_quantized.log").read_text()
    assert [e[0] for e in losses["cp2_quantized"]] == [e[0] for e in losses["single"]] == [1, 2, 3]
    for got, want in zip(losses["cp2_quantized"], losses["single"], strict=True):
        assert all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(got[1:], want[1:], strict=True)), losses
