"""Shared pytest fixtures (the tiny checkpoints, built once per session; the tiny tokenizer; what an in-process
reference model counts) and the suite's two rules for tests that start processes:

- every test that starts a process (gloo ranks, `accelerate launch`, a script) is marked `slow`: a test that is not
  and starts one fails, so `pytest -m "not slow"` is the fast loop and never launches anything;
- every `slow` test has a `timeout` marker (pytest-timeout), so a hang fails the test instead of the suite.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def pytest_collection_modifyitems(config, items):
    untimed = [
        item.nodeid for item in items if item.get_closest_marker("slow") and not item.get_closest_marker("timeout")
    ]
    if untimed:
        raise pytest.UsageError(f"slow tests without a timeout marker: {untimed[:5]}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Outside `slow` tests, starting a process (setup included: module fixtures too) is an error."""
    if item.get_closest_marker("slow"):
        return (yield)
    original = subprocess.Popen._execute_child

    def refuse(self, args, *rest, **kwargs):
        raise AssertionError(f"{item.nodeid} starts a process ({args!r}) but is not marked slow")

    subprocess.Popen._execute_child = refuse
    try:
        return (yield)
    finally:
        subprocess.Popen._execute_child = original


def import_recipe(name: str):
    """A script of recipes/ imported as a module (its functions and dataclasses, without running it)."""
    import importlib

    folder = str(Path(__file__).resolve().parents[1] / "recipes")
    sys.path.insert(0, folder)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(folder)


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    """Run a numerical test under torch's intra-op thread counts 1 and 2: each sums in its own order, and a tolerance
    must hold for both (`numerics`)."""
    from numerics import num_threads

    with num_threads(request.param):
        yield request.param


@pytest.fixture(scope="session")
def tokenizer():
    from hf_dsv4.testing import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """The tiny DeepSeek-V4 checkpoint in the Hub layout (bf16 weights), built once. Tests must not modify it."""
    from hf_dsv4.testing import build_tiny_dsv4

    return build_tiny_dsv4(tmp_path_factory.mktemp("tiny_dsv4"))


@pytest.fixture(scope="session")
def release_ckpt(tmp_path_factory) -> Path:
    """A tiny checkpoint in DeepSeek's release layout (FP8 / FP4 with block scales, native names, `mtp.*`, several
    shards + index; `hf_dsv4.testing.build_release_dsv4`). Read-only."""
    from hf_dsv4.testing import build_release_dsv4

    return build_release_dsv4(tmp_path_factory.mktemp("release_dsv4"))


@pytest.fixture(scope="session", params=["native", "release", "saved_from_config", "saved_from_native",
                                         "saved_from_release", "saved_sharded", "hf_cache", "merged"])  # fmt: skip
def layout_ckpt(request, tmp_path_factory) -> Path:
    """The tiny DeepSeek-V4 in each checkpoint layout `from_pretrained` accepts (`checkpoints.ALL_LAYOUTS`: DeepSeek's
    native names and release, transformers' `save_pretrained` of a config-built and of a loaded model, single-file and
    sharded, a Hugging Face cache snapshot, our own merge); a test that takes it runs once per layout. Read-only."""
    from checkpoints import ALL_LAYOUTS, build_checkpoint

    assert request.param in ALL_LAYOUTS
    if request.param == "native":
        return request.getfixturevalue("tiny_ckpt")
    if request.param == "release":
        return request.getfixturevalue("release_ckpt")
    return build_checkpoint(request.param, tmp_path_factory.mktemp("layouts") / request.param)


@pytest.fixture(scope="session")
def blind_ckpt(tiny_ckpt, tmp_path_factory) -> Path:
    """`tiny_ckpt`'s config.json beside weight files that are garbage: for ranks that must read the config only."""
    import shutil

    blind = tmp_path_factory.mktemp("blind")
    shutil.copy(tiny_ckpt / "config.json", blind)
    for file in tiny_ckpt.glob("*.safetensors"):
        (blind / file.name).write_bytes(b"not a safetensors file")
    return blind


@pytest.fixture(scope="session")
def tiny_ckpt_fp32(tmp_path_factory) -> Path:
    """The tiny checkpoint with fp32 weights (seed 0), as the trainer and recipe tests train it. Read-only."""
    import torch

    from hf_dsv4.testing import build_tiny_dsv4

    return build_tiny_dsv4(tmp_path_factory.mktemp("tiny_dsv4_fp32"), dtype=torch.float32, seed=0)


@pytest.fixture(scope="module")
def single_thread():
    """The tiny model's ops are too small for intra-op threads, which only spin on a busy machine (a forward took
    1.5 s with 2 threads and 0.03 s with 1 on the shared 2-core box). Restores the setting afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_counts(tiny_ckpt) -> dict:
    """What the tiny model holds, counted in this process: the numbers the multi-process tests expect (so they follow
    transformers' module layout instead of hard-coding it).

    - tensors: parameters + buffers; params: parameters; with_grad: parameters that get a gradient from the LM loss
      (the lightning indexer gets none); layers: the FSDP class name of each decoder layer;
    - lora_attention: trainable / with-gradient adapter tensors of a r=4 LoRA on q_a, q_b, o_b, kv projections;
    - lora_all: for `dsv4_lora_config(r=4, alpha=8, targets="all")`: trainable tensors and elements, frozen
      elements, buffer elements.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from hf_dsv4.sharding import decoder_layers
    from hf_dsv4.training.lora import dsv4_lora_config

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ids = torch.arange(3, 27).reshape(1, 24)

    def load():
        return AutoModelForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32).train()

    def with_grad(model) -> int:
        model(ids, labels=ids).loss.backward()
        return sum(p.grad is not None for p in model.parameters() if p.requires_grad)

    model = load()
    counts = {
        "tensors": len(list(model.parameters())) + len(list(model.buffers())),
        "params": len(list(model.parameters())),
        "layers": [f"FSDP{type(layer).__name__}" for layer in decoder_layers(model)],
        "with_grad": with_grad(model),
    }
    lora = get_peft_model(
        load(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_a_proj", "q_b_proj", "o_b_proj", "kv_proj"])
    )
    trainable = [p for p in lora.parameters() if p.requires_grad]
    counts["lora_attention"] = {"trainable": len(trainable), "with_grad": with_grad(lora)}
    every = get_peft_model(load(), dsv4_lora_config(r=4, alpha=8, targets="all"))
    params = list(every.parameters())
    counts["lora_all"] = {
        "trainable": sum(p.requires_grad for p in params),
        "trainable_elements": sum(p.numel() for p in params if p.requires_grad),
        "frozen_elements": sum(p.numel() for p in params if not p.requires_grad),
        "buffer_elements": sum(b.numel() for b in every.buffers()),
    }
    torch.set_num_threads(threads)
    return counts
