"""Streamed loading (`memory_efficient_init(stream=True)`) on 2 real gloo ranks: every rank builds on meta, rank 0
reads the checkpoint one decoder layer at a time with transformers' own conversion while `shard_model` fills the
shards; the result equals a single-process stock `from_pretrained` bit for bit."""

from __future__ import annotations

import re

import pytest
from dist_launch import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


@pytest.fixture(scope="module")
def streamed(tiny_ckpt, blind_ckpt, release_ckpt, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("stream")
    return run_ranks("stream", out, str(tiny_ckpt), str(blind_ckpt), str(release_ckpt), timeout=300)


@pytest.mark.parametrize("layout", ["hub", "release"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streamed_shards_equal_stock_from_pretrained_bit_for_bit(streamed, layout, dtype, tiny_counts):
    """Hub layout (bf16 weights, DeepSeek names) and release layout (FP8 / FP4 dequantized while streaming)."""
    for rank, result in enumerate(streamed):
        result = result[f"{layout}_{dtype}"]
        assert result["all_meta"] and result["same_table"], f"rank {rank}"  # nothing read before shard_model
        assert result["same_config"], f"rank {rank}"
        assert result["bad_params"] == [] and result["bad_buffers"] == [], f"rank {rank}"
        if layout == "hub":
            assert result["num_tensors"] == tiny_counts["tensors"]
        assert result["logits_equal"], f"rank {rank}: max diff {result['logits_max_diff']}"
        assert result["stream_released"]
        # rank 0 read each unit (the decoder layers, then the rest) once, while the previous one was sent, and only
        # once every unit before that one was freed
        assert result["units_read"] == (len(tiny_counts["layers"]) + 1 if rank == 0 else 0)
        held = result["held_from_earlier_units"]
        assert not any(older for older, _ in held), held  # never more than two units
        if dtype == "bfloat16":  # read_ahead=False: the previous unit is gone before the next is read
            assert not any(previous for _, previous in held), held


def test_a_lora_adapter_added_after_the_streamed_load_starts_from_rank_0s_values(streamed, tiny_counts):
    for rank, result in enumerate(streamed):
        lora = result["lora"]
        assert lora["bad_base"] == [], f"rank {rank}"  # the base, read from the checkpoint under peft's names
        assert lora["lora_tensors"] == tiny_counts["lora_all"]["trainable"]
        assert lora["lora_a_drawn"] and lora["lora_b_zero"], f"rank {rank}"
        assert lora["logits_equal"], f"rank {rank}"  # B = 0: the adapted model is the base
    assert streamed[0]["lora"]["lora_digest"] == streamed[1]["lora"]["lora_digest"]


def test_a_shard_cut_short_mid_stream_fails_on_every_rank(streamed):
    """A read that fails on rank 0 in the middle of the stream (the file changed under the job) is raised on every
    rank, with rank 0's message, instead of leaving rank 1 waiting for the layer."""
    errors = [result["torn"] for result in streamed]
    assert errors[0] is not None and errors[0] == errors[1], errors
    # the unit and its files are named (the cut file also holds part of layer 0, read first)
    pattern = r"ValueError: reading 'model\.layers\.\d\.' from model-.+\.safetensors failed: SafetensorError: .*"
    assert re.fullmatch(pattern, errors[0]), errors[0]


def test_modules_to_save_under_a_streamed_model_are_refused_before_any_weight_moves(streamed):
    errors = [result["modules_to_save"] for result in streamed]
    assert errors[0] == errors[1] and errors[0].startswith("ShardingError: ")
    assert "neither in the checkpoint nor a new adapter's" in errors[0] and "modules_to_save" in errors[0]


def test_the_release_layout_without_streaming_loads_the_same_and_every_config_drops_its_quantization(streamed):
    """Rank 0 loads it dequantized (stock from_pretrained on CPU), the others build from config.json, whose
    quantization_config they drop as rank 0's config has none."""
    for rank, result in enumerate(streamed):
        result = result["release_not_streamed"]
        assert result["same_config"], f"rank {rank}"
        assert result["bad_params"] == [] and result["bad_buffers"] == [] and result["logits_equal"], f"rank {rank}"


# ------------------------------------------------------------------------------------- readers="all": no weight sent


@pytest.fixture(scope="module")
def every_rank_reads(tiny_ckpt, release_ckpt, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("stream_all")
    scratch = tmp_path_factory.mktemp("stream_all_scratch")
    return run_ranks("stream_all", out, str(tiny_ckpt), str(release_ckpt), str(scratch), timeout=300)


def assert_within_budget(result: dict) -> None:
    """Every read holds at most the budget (or one row of a tensor whose row is larger), in several pieces."""
    reads, budget = result["reads"], result["budget"]
    assert max(reads) <= max(budget, result["largest_row"]), (max(reads), budget)
    assert len(reads) > 3 * 4  # several pieces per unit


@pytest.mark.parametrize(
    "run", ["hub_float32", "hub_bfloat16", "release_float32", "release_bfloat16", "hub_bfloat16_budget",
            "release_float32_budget"],
)  # fmt: skip
def test_every_rank_reading_its_own_rows_gives_stock_shards_bit_for_bit(every_rank_reads, run, tiny_counts):
    """readers="all": each rank reads the rows of its shards (the experts it holds, an FP8 weight's rows widened to
    whole 128-row scale blocks: on 2 ranks the 128-row projections put both halves in one block), converted by
    transformers, whole or in pieces within a read budget; nothing floating-point is sent while the shards fill."""
    for rank, result in enumerate(every_rank_reads):
        result = result[run]
        assert result["all_meta"] and result["same_table"] and result["reads_here"], f"rank {rank}"
        assert result["bad_params"] == [] and result["bad_buffers"] == [], f"rank {rank}"
        if run.startswith("hub"):
            assert result["num_tensors"] == tiny_counts["tensors"]
        assert result["logits_equal"], f"rank {rank}: max diff {result['logits_max_diff']}"
        assert result["floating_sent"] == 0, f"rank {rank}"
        assert result["stream_released"]
        if run.endswith("budget"):
            assert_within_budget(result)
        else:
            assert len(result["reads"]) == len(tiny_counts["layers"]) + 1  # one read per unit


def assert_rank_0s_adapter_and_torn_shard(results: list[dict], tiny_counts: dict) -> None:
    """The LoRA case: the base read under peft's names, the adapter rank 0's draw (A drawn, B zero) on every rank;
    the torn case: a shard cut short after loading fails on every rank with rank 0's error naming unit and file."""
    for rank, result in enumerate(results):
        lora = result["lora"]
        assert lora["bad_base"] == [] and lora["logits_equal"], f"rank {rank}"
        assert lora["lora_tensors"] == tiny_counts["lora_all"]["trainable"]
        assert lora["lora_a_drawn"] and lora["lora_b_zero"], f"rank {rank}"
    assert results[0]["lora"]["lora_digest"] == results[1]["lora"]["lora_digest"]
    errors = [result["torn"] for result in results]
    assert errors[0] is not None and errors[0] == errors[1], errors
    pattern = r"ValueError: reading 'model\.layers\.\d\.' from model-.+\.safetensors failed: SafetensorError: .*"
    assert re.fullmatch(pattern, errors[0]), errors[0]


def test_every_rank_reading_starts_from_rank_0s_peft_draw_and_a_torn_shard_fails_everywhere(
    every_rank_reads, tiny_counts
):
    """peft draws each rank's A from its own RNG: with readers="all" rank 0's draw is broadcast."""
    assert_rank_0s_adapter_and_torn_shard(every_rank_reads, tiny_counts)


def test_every_rank_reading_a_hub_id_is_downloaded_by_the_machines_lowest_rank_first(every_rank_reads):
    """A Hub id (here from a local cache, offline): rank 0, the lowest rank of this machine, downloads it (once,
    before any collective under the process group's timeout), then every rank opens the downloaded snapshot; the
    shards equal stock's."""
    for rank, result in enumerate(every_rank_reads):
        hub = result["hub_id"]
        assert hub["bad_params"] == [] and hub["bad_buffers"] == [] and hub["logits_equal"], f"rank {rank}"
        (download, open_0), (open_1,) = hub["opened"]  # rank 0: download, open; rank 1: open
        assert [download[0], open_0[0], open_1[0]] == ["download", "open", "open"], hub["opened"]
        assert download[2] <= min(open_0[1], open_1[1]), hub["opened"]


# ------------------------------------------------------------------------- a byte budget: rank 0 never holds a unit


@pytest.fixture(scope="module")
def budgeted(tiny_ckpt, release_ckpt, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("stream_budget")
    scratch = tmp_path_factory.mktemp("stream_budget_scratch")
    return run_ranks("stream_budget", out, str(tiny_ckpt), str(release_ckpt), str(scratch), timeout=300)


@pytest.mark.parametrize("layout", ["hub", "release"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rank_0_reads_within_the_byte_budget_and_every_shard_equals_stock(budgeted, layout, dtype):
    """read_budget = a third of the largest tensor's shard: rank 0 reads each rank's rows in pieces within it (the
    largest tensors in row slices) and sends them; the shards are stock's."""
    for rank, result in enumerate(budgeted):
        result = result[f"{layout}_{dtype}"]
        assert result["bad_params"] == [] and result["bad_buffers"] == [], f"rank {rank}"
        assert result["logits_equal"], f"rank {rank}: max diff {result['logits_max_diff']}"
    assert_within_budget(budgeted[0][f"{layout}_{dtype}"])
    assert budgeted[1][f"{layout}_{dtype}"]["reads"] == []  # only rank 0 reads


def test_a_budgeted_stream_sends_rank_0s_adapter_draw_and_fails_on_every_rank(budgeted, tiny_counts):
    assert_rank_0s_adapter_and_torn_shard(budgeted, tiny_counts)


@pytest.fixture(scope="module")
def every_layout(tmp_path_factory, tiny_ckpt, release_ckpt) -> list[dict]:
    from checkpoints import ALL_LAYOUTS, build_checkpoint

    root = tmp_path_factory.mktemp("layouts_2_ranks")
    paths = {"native": tiny_ckpt, "release": release_ckpt}
    paths |= {name: build_checkpoint(name, root / name) for name in ALL_LAYOUTS if name not in paths}
    args = [f"{name}={path}" for name, path in paths.items()]
    return run_ranks("stream_layouts", root, str(root / "scratch"), *args, timeout=380)


def test_every_layout_and_our_own_export_stream_into_stock_shards_bit_for_bit(every_layout, tiny_counts):
    """DeepSeek's native names and release (FP8 / FP4), transformers' save_pretrained (of a config-built model, of
    the loaded native and release checkpoints, single file and sharded), a Hugging Face cache snapshot, our own merge
    and our own sharded export: on 2 ranks, readers rank0 and all (bf16: in pieces within a read budget), fp32 and
    bf16, every parameter, buffer and the logits equal stock from_pretrained's."""
    from checkpoints import ALL_LAYOUTS

    for rank, result in enumerate(every_layout):
        cases = {case.split("/")[0] for case in result}
        assert cases == {*ALL_LAYOUTS, "exported"}, cases
        assert len(result) == len(cases) * 4
        for case, got in result.items():
            assert got["same_table"], (rank, case)
            assert got["bad_params"] == [] and got["bad_buffers"] == [], (rank, case)
            assert got["num_tensors"] == tiny_counts["tensors"], (rank, case)
            assert got["logits_equal"], (rank, case, got["logits_max_diff"])
