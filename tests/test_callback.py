"""DSV4Callback in one process: routing counts against independent computations, token counts, metrics, hooks,
logging and adapter saving on checkpoints."""

from __future__ import annotations

import logging
import re
from types import SimpleNamespace

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import TrainerControl, TrainerState, TrainingArguments

import hf_dsv4.training.callback
from hf_dsv4.testing import tiny_dsv4_config
from hf_dsv4.training.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, gather_adapter
from hf_dsv4.training.callback import DSV4Callback, process_peak_memory_bytes
from hf_dsv4.training.lora import dsv4_lora_config

pytestmark = pytest.mark.usefixtures("single_thread")

N_EXPERTS = tiny_dsv4_config().n_routed_experts
IDS = torch.tensor([[2, 2, 17, 230, 5, 999], [0, 42, 7, 64, 300, 12]])
MASK = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # left padding: 10 real tokens of 12
IDS_2 = torch.tensor([[0, 1, 3, 4, 5, 6, 8, 9]])


class Clock:
    """A fake `time.perf_counter` that moves only when told to."""

    def __init__(self):
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(hf_dsv4.training.callback, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    return clock


@pytest.fixture(scope="module")
def model() -> transformers.DeepseekV4ForCausalLM:
    torch.manual_seed(0)
    model = transformers.DeepseekV4ForCausalLM(tiny_dsv4_config()).eval()
    hash_layers = [layer for layer in model.model.layers if layer.mlp.is_hash]
    assert len(hash_layers) == 1 and not all(layer.mlp.is_hash for layer in model.model.layers)
    router = hash_layers[0].mlp.gate
    generator = torch.Generator().manual_seed(3)
    router.tid2eid.copy_(torch.randint(0, N_EXPERTS, router.tid2eid.shape, generator=generator))
    return model


def routers(model) -> list:
    return [layer.mlp.gate for layer in model.model.layers]


def expected_counts(model, *batches: dict) -> list[torch.Tensor]:
    """Tokens per expert of every router over `batches`, padding included, computed without the callback: hash
    layers from `tid2eid[input_ids]`, top-k layers by calling the router again on the input it received."""
    totals = [torch.zeros(N_EXPERTS, dtype=torch.long) for _ in model.model.layers]
    for batch in batches:
        inputs = {}
        handles = [
            layer.mlp.gate.register_forward_pre_hook(
                lambda m, args, i=i, seen=inputs: seen.__setitem__(i, args[0].clone())
            )
            for i, layer in enumerate(model.model.layers)
            if not layer.mlp.is_hash
        ]
        try:
            with torch.no_grad():
                model(**batch)
        finally:
            for handle in handles:
                handle.remove()
        for i, layer in enumerate(model.model.layers):
            if layer.mlp.is_hash:
                chosen = layer.mlp.gate.tid2eid[batch["input_ids"]]
            else:
                with torch.no_grad():
                    chosen = layer.mlp.gate(inputs[i])[2]
            totals[i] += torch.bincount(chosen.flatten(), minlength=N_EXPERTS)
    return totals


def logged_counts(caplog) -> list[list[int]]:
    """The per-router counts `collect` logs at DEBUG level, in router order."""
    found = [re.fullmatch(r"router (\d+) tokens per expert: (\[.*\])", r.getMessage()) for r in caplog.records]
    found = [m for m in found if m]
    assert [int(m.group(1)) for m in found] == list(range(len(found)))
    return [eval(m.group(2)) for m in found]  # a list of ints written by the logger


def routing_metrics(counts: list[torch.Tensor]) -> dict[str, float]:
    ratios = [c.max().item() / (c.sum().item() / len(c)) for c in counts]
    shares = [c.max().item() / c.sum().item() for c in counts]
    return {"moe_imbalance": round(sum(ratios) / len(ratios), 4), "moe_max_expert_share": round(max(shares), 4)}


def forward(model, **batch) -> None:
    with torch.no_grad():
        model(**batch)


def train_begin(callback: DSV4Callback, model) -> None:
    callback.on_train_begin(None, TrainerState(), TrainerControl(), model=model)


# ------------------------------------------------------------------------------------------------ counting
def test_collect_counts_routing_and_real_tokens_exactly(model, clock, caplog):
    batch = {"input_ids": IDS, "attention_mask": MASK}
    expected = expected_counts(model, batch)
    hash_router = next(layer.mlp.gate for layer in model.model.layers if layer.mlp.is_hash)
    hash_index = routers(model).index(hash_router)
    assert torch.equal(expected[hash_index], torch.bincount(hash_router.tid2eid[IDS].flatten(), minlength=N_EXPERTS))
    assert all(int(c.sum()) == IDS.numel() * 2 for c in expected)  # every token, padding included, top-2

    callback = DSV4Callback()
    train_begin(callback, model)
    forward(model, **batch)
    clock.now += 2.0
    caplog.set_level(logging.DEBUG, logger="hf_dsv4.training.callback")
    low = round(process_peak_memory_bytes() / 2**30, 4)
    metrics = callback.collect(step=5)
    high = round(process_peak_memory_bytes() / 2**30, 4)  # the peak only grows: collect's reading lies between

    assert logged_counts(caplog) == [c.tolist() for c in expected]
    assert low <= metrics["peak_memory_gb"] <= high
    assert metrics == {
        "tokens_per_second": MASK.sum().item() / 2.0,
        "peak_memory_gb": metrics["peak_memory_gb"],
        **routing_metrics(expected),
    }
    assert metrics["moe_imbalance"] > 1.0  # not a trivially balanced toy
    callback.detach()


def test_counts_accumulate_over_forwards_until_collect_and_then_reset(model, clock, caplog):
    first, second = {"input_ids": IDS, "attention_mask": MASK}, {"input_ids": IDS_2}
    both, second_only = expected_counts(model, first, second), expected_counts(model, second)  # before attaching
    callback = DSV4Callback()
    train_begin(callback, model)
    forward(model, **first)
    forward(model, **second)  # no attention mask: every input id counts
    clock.now += 4.0
    caplog.set_level(logging.DEBUG, logger="hf_dsv4.training.callback")
    metrics = callback.collect(step=1)
    assert logged_counts(caplog) == [c.tolist() for c in both]
    assert metrics["tokens_per_second"] == (MASK.sum().item() + IDS_2.numel()) / 4.0
    assert metrics["moe_imbalance"] == routing_metrics(both)["moe_imbalance"]

    caplog.clear()
    clock.now += 1.0
    reset = callback.collect(step=2)  # nothing ran since the last collect
    assert reset["tokens_per_second"] == 0.0 and "moe_imbalance" not in reset and "moe_max_expert_share" not in reset
    assert logged_counts(caplog) == []

    forward(model, **second)
    clock.now += 1.0
    assert callback.collect(step=3)["tokens_per_second"] == IDS_2.numel()
    assert logged_counts(caplog) == [c.tolist() for c in second_only]
    callback.detach()


def test_a_second_collect_at_the_same_step_returns_the_cached_metrics(model, clock):
    callback = DSV4Callback()
    train_begin(callback, model)
    forward(model, input_ids=IDS, attention_mask=MASK)
    clock.now += 1.0
    metrics = callback.collect(step=7)
    forward(model, input_ids=IDS_2)
    clock.now += 1.0
    assert callback.collect(step=7) is metrics
    assert metrics["tokens_per_second"] == MASK.sum().item()
    # the cached call neither reset the counters nor restarted the clock: 1 s since the collect at step 7
    assert callback.collect(step=8)["tokens_per_second"] == IDS_2.numel() / 1.0
    callback.detach()


def test_attach_twice_does_not_double_count(model, clock):
    callback = DSV4Callback()
    callback.attach(model)
    callback.attach(model)
    forward(model, input_ids=IDS_2)
    clock.now += 1.0
    assert callback.collect(step=1)["tokens_per_second"] == IDS_2.numel()
    callback.detach()


def test_detach_removes_every_hook(model, clock):
    hooks_before = [len(model._forward_pre_hooks)] + [len(r._forward_hooks) for r in routers(model)]
    callback = DSV4Callback()
    train_begin(callback, model)
    assert [len(model._forward_pre_hooks)] + [len(r._forward_hooks) for r in routers(model)] == [
        h + 1 for h in hooks_before
    ]
    callback.on_train_end(None, TrainerState(), TrainerControl())
    assert [len(model._forward_pre_hooks)] + [len(r._forward_hooks) for r in routers(model)] == hooks_before
    forward(model, input_ids=IDS, attention_mask=MASK)
    clock.now += 1.0
    assert callback.collect(step=1) == {
        "tokens_per_second": 0.0,
        "peak_memory_gb": callback.last_metrics["peak_memory_gb"],
    }


def test_log_routing_false_counts_tokens_only(model, clock):
    hooks_before = [len(r._forward_hooks) for r in routers(model)]
    callback = DSV4Callback(log_routing=False)
    train_begin(callback, model)
    assert [len(r._forward_hooks) for r in routers(model)] == hooks_before
    forward(model, input_ids=IDS, attention_mask=MASK)
    clock.now += 1.0
    assert set(callback.collect(step=1)) == {"tokens_per_second", "peak_memory_gb"}
    callback.detach()


def test_process_peak_memory_is_the_peak_rss_of_this_process():
    def rss() -> int:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))

    before = rss()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert rss() >= before + 60 * 2**20
    del block  # a large block goes back to the system: the current RSS drops, the peak does not
    peak = process_peak_memory_bytes()
    assert peak >= before + 60 * 2**20
    assert rss() <= peak - 32 * 2**20


# --------------------------------------------------------------------------------------------------- on_log
def test_on_log_adds_the_metrics_to_loss_logs_without_overwriting(model, clock):
    callback = DSV4Callback()
    train_begin(callback, model)
    forward(model, input_ids=IDS, attention_mask=MASK)
    clock.now += 1.0
    state = TrainerState(global_step=4)

    no_loss = {"eval_loss": 0.5}
    callback.on_log(None, state, TrainerControl(), logs=no_loss)
    assert no_loss == {"eval_loss": 0.5}
    assert callback.last_metrics == {}  # nothing collected: the counters still hold the forward

    logs = {"loss": 1.25, "peak_memory_gb": -1.0}
    callback.on_log(None, state, TrainerControl(), logs=logs)
    metrics = callback.collect(step=4)  # the cached metrics of this step
    assert metrics["tokens_per_second"] == MASK.sum().item()
    assert logs == {**metrics, "loss": 1.25, "peak_memory_gb": -1.0}
    assert "moe_imbalance" in logs
    callback.detach()

    detached = {"loss": 1.0}
    callback.on_log(None, TrainerState(global_step=5), TrainerControl(), logs=detached)
    assert detached == {"loss": 1.0}


# -------------------------------------------------------------------------------------------------- on_save
@pytest.fixture(scope="module")
def lora_model():
    torch.manual_seed(0)
    base = transformers.DeepseekV4ForCausalLM(tiny_dsv4_config())
    return peft.get_peft_model(base, dsv4_lora_config(r=2, targets="attention"))


def save_args(tmp_path) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), report_to=[])


def test_on_save_writes_the_adapter_into_the_checkpoint_folder(lora_model, tmp_path):
    DSV4Callback().on_save(save_args(tmp_path), TrainerState(global_step=3), TrainerControl(), model=lora_model)
    folder = tmp_path / "checkpoint-3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]
    assert sorted(p.name for p in folder.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    stored, expected = load_file(folder / ADAPTER_WEIGHTS), gather_adapter(lora_model)
    assert set(stored) == set(expected) and all(torch.equal(stored[k], expected[k]) for k in expected)


@pytest.mark.parametrize("case", ["save_adapter=False", "no PEFT", "no model"])
def test_on_save_does_nothing_without_an_adapter_to_save(lora_model, model, tmp_path, case):
    callback = DSV4Callback(save_adapter=case != "save_adapter=False")
    chosen = {"save_adapter=False": lora_model, "no PEFT": model, "no model": None}[case]
    callback.on_save(save_args(tmp_path), TrainerState(global_step=3), TrainerControl(), model=chosen)
    assert list(tmp_path.iterdir()) == []
