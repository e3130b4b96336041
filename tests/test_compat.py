"""`hf_dsv4.compat`: the fence around upstream internals checks every name it lists and says what broke."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers
import transformers.trainer
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType

from hf_dsv4 import compat
from hf_dsv4.loading.pretrained import HUB_KWARGS, LOAD_ONLY_KWARGS, MODEL_KWARGS
from hf_dsv4.training import DSV4Accelerator, dsv4_trainer_accelerator


@pytest.fixture
def unchecked(monkeypatch):
    """`compat.require` as if nothing had been checked in this process yet."""
    monkeypatch.setattr(compat, "_checked", set())


def test_every_fenced_internal_exists_in_the_installed_versions(unchecked):
    compat.require(*compat.FENCE)
    assert compat._checked == set(compat.FENCE)
    assert set(compat.FENCE) == {
        "torch", "torch.tools", "transformers", "transformers.attention", "transformers.trainer", "accelerate", "trl", "peft",
    }  # fmt: skip


def test_a_missing_internal_fails_naming_the_package_its_version_and_the_tested_range(unchecked, monkeypatch):
    tested, internals = compat.FENCE["trl"]
    gone = compat.Internal("trl:SFTTrainer._no_such_hook")
    monkeypatch.setitem(compat.FENCE, "trl", (tested, (*internals, gone)))
    monkeypatch.setattr(compat, "installed_version", lambda package: "1.99.0")
    with pytest.raises(compat.UpstreamCompatError) as excinfo:
        compat.require("trl")
    assert str(excinfo.value) == (
        "hf_dsv4 cannot use trl 1.99.0: trl:SFTTrainer._no_such_hook is missing. hf_dsv4 is tested with "
        "trl>=1.16,<1.17: pip install 'trl>=1.16,<1.17'"
    )
    assert isinstance(excinfo.value, ImportError) and "trl" not in compat._checked


def test_an_overridden_method_whose_parameters_changed_fails(unchecked, monkeypatch):
    from trl import SFTTrainer

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name, new_arg):
        pass

    monkeypatch.setattr(SFTTrainer, "_prepare_dataset", _prepare_dataset)
    monkeypatch.setattr(compat, "installed_version", lambda package: "1.17.0")
    compat.require("trl")  # an extra trailing parameter still accepts what hf_dsv4 passes
    compat._checked.clear()

    def _prepare_dataset(self, dataset, tokenizer, args, packing, formatting_func, dataset_name):  # noqa: F811
        pass

    monkeypatch.setattr(SFTTrainer, "_prepare_dataset", _prepare_dataset)
    with pytest.raises(compat.UpstreamCompatError, match=r"trl 1\.17\.0: trl:SFTTrainer\._prepare_dataset takes "):
        compat.require("trl")


def test_an_instance_attribute_no_longer_set_fails(unchecked, monkeypatch):
    monkeypatch.setitem(
        compat.FENCE,
        "accelerate",
        (">=1.15,<1.16", (compat.Internal("accelerate:Accelerator.__init__", assigned="_gone"),)),
    )
    with pytest.raises(compat.UpstreamCompatError, match=r"Accelerator\.__init__ no longer sets _gone"):
        compat.require("accelerate")


def test_a_decision_the_reader_reproduces_that_is_gone_fails(unchecked, monkeypatch):
    """The streamed reader assigns checkpoint keys as `convert_and_load_state_dict_in_model` does; if the lines it
    reproduces are no longer in that function, the fence says which."""
    where = "transformers.core_model_loading:convert_and_load_state_dict_in_model"
    kept = compat.Internal(where, decides=("if renamed_key not in meta_model_state_dict and original_key in",))
    gone = compat.Internal(where, decides=("renamed_key = original_key  # a rule that is not there",))
    monkeypatch.setitem(compat.FENCE, "transformers", (">=5.24,<5.26", (kept,)))
    compat.require("transformers")
    compat._checked.clear()
    monkeypatch.setitem(compat.FENCE, "transformers", (">=5.24,<5.26", (kept, gone)))
    with pytest.raises(
        compat.UpstreamCompatError, match=r"convert_and_load_state_dict_in_model no longer does `renamed_"
    ):
        compat.require("transformers")


def test_a_version_outside_the_tested_range_with_every_name_only_warns(unchecked, monkeypatch, caplog):
    monkeypatch.setattr(compat, "installed_version", lambda package: "0.22.0")
    with caplog.at_level(logging.WARNING, logger="hf_dsv4.compat"):
        compat.require("peft")
    internals = len(compat.FENCE["peft"][1])
    assert caplog.messages == [
        f"peft 0.22.0 is outside the versions hf_dsv4 is tested with (>=0.21,<0.22); the {internals} internals of "
        "fence 'peft' that hf_dsv4 relies on are unchanged"
    ]


def test_the_tested_ranges_are_the_upper_bounds_in_setup_cfg():
    from pathlib import Path

    requires = (Path(__file__).resolve().parents[1] / "setup.cfg").read_text()
    for name, (tested, _) in compat.FENCE.items():
        assert f"\n    {name.split('.')[0]}{tested}\n" in requires, name


def test_load_only_keywords_cover_every_keyword_from_pretrained_takes():
    """A new `from_pretrained` keyword must be sorted into one of loading's tables (or a meta build would pass it
    on to the model's constructor)."""
    from packaging.version import Version

    ours = {*LOAD_ONLY_KWARGS, *HUB_KWARGS, *MODEL_KWARGS, "config"}
    upstream = compat.from_pretrained_keywords()
    assert upstream - ours == set(), "from_pretrained takes keywords loading does not know"
    since = {"kernels_mode": "5.25"}  # keywords of a newer tested transformers that the older ones do not take
    newer = {k for k, v in since.items() if Version(transformers.__version__) < Version(v)}
    assert ours - upstream - newer == set(), "loading knows keywords from_pretrained no longer takes"


def test_the_trainer_accelerator_is_swapped_for_a_dsv4_subclass_and_restored_also_on_error():
    with dsv4_trainer_accelerator({"reshard_after_forward": False}) as accelerator_class:
        assert transformers.trainer.Accelerator is accelerator_class
        assert issubclass(accelerator_class, DSV4Accelerator) and issubclass(accelerator_class, Accelerator)
        assert accelerator_class.fsdp_plugin_args == {"reshard_after_forward": False}
    assert transformers.trainer.Accelerator is Accelerator and DSV4Accelerator.fsdp_plugin_args is None
    with pytest.raises(OSError), dsv4_trainer_accelerator():
        raise OSError("disk full")
    assert transformers.trainer.Accelerator is Accelerator


def test_only_an_accelerator_subclass_may_replace_the_trainers():
    with pytest.raises(TypeError, match="must be a subclass of Accelerator"), compat.trainer_accelerator_class(dict):
        pass
    assert transformers.trainer.Accelerator is Accelerator


def test_accelerates_process_state_is_put_back_once(monkeypatch):
    shared = PartialState._shared_state
    monkeypatch.setitem(shared, "distributed_type", DistributedType.MULTI_CPU)
    restore = compat.set_process_distributed_type(DistributedType.FSDP)
    assert PartialState._shared_state["distributed_type"] == DistributedType.FSDP
    restore()
    assert shared["distributed_type"] == DistributedType.MULTI_CPU
    monkeypatch.delitem(shared, "distributed_type")
    restore = compat.set_process_distributed_type(DistributedType.FSDP)
    restore()
    assert "distributed_type" not in shared  # absent before, absent after


def test_a_later_change_by_accelerate_is_left_alone(monkeypatch):
    monkeypatch.setitem(PartialState._shared_state, "distributed_type", DistributedType.MULTI_CPU)
    restore = compat.set_process_distributed_type(DistributedType.FSDP)
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
    restore()
    assert PartialState._shared_state["distributed_type"] == DistributedType.MULTI_GPU


def test_streamed_reads_turn_the_read_pool_off_for_their_call_only(monkeypatch):
    """`convert_into` hands transformers a copy of the load plan whose device map adds one "disk" entry naming no
    module; the caller's plan and the process's environment are left as they were, also when the conversion fails."""
    import os
    from dataclasses import replace

    import transformers.core_model_loading as loading
    from transformers.modeling_utils import LoadStateDictConfig

    seen = []

    def convert(model, state_dict, load_config):
        seen.append(dict(load_config.device_map))
        if state_dict == "fail":
            raise RuntimeError("boom")
        return "info", None

    monkeypatch.setattr(loading, "convert_and_load_state_dict_in_model", convert)
    monkeypatch.delenv("HF_DEACTIVATE_ASYNC_LOAD", raising=False)
    plan = LoadStateDictConfig(dtype=torch.bfloat16)
    assert compat.convert_into(None, {}, plan) == "info"
    user_map = replace(plan, device_map={"model.layers.0": "cpu", "": "cpu"})
    with pytest.raises(RuntimeError, match="boom"):
        compat.convert_into(None, "fail", user_map)
    assert plan.device_map is None and user_map.device_map == {"model.layers.0": "cpu", "": "cpu"}
    assert seen == [
        {"": "cpu", compat.READ_IN_THE_CALLING_THREAD: "disk"},
        {"model.layers.0": "cpu", "": "cpu", compat.READ_IN_THE_CALLING_THREAD: "disk"},
    ]
    assert "HF_DEACTIVATE_ASYNC_LOAD" not in os.environ


def test_a_streamed_read_builds_no_read_pool_and_places_every_tensor_on_the_cpu(tiny_ckpt, monkeypatch):
    """transformers' own loop, not a stand-in: with the entry in the device map it builds no `ThreadPoolExecutor`
    (the pool's class is replaced by one that fails) and every tensor of the unit is read (stock's values, on CPU:
    the "disk" entry places none of them)."""
    import transformers.core_model_loading as loading
    from transformers import AutoModelForCausalLM

    from hf_dsv4.loading.pretrained import open_reader, plan_streamed

    class NoPool:
        def __init__(self, *args, **kwargs):
            raise AssertionError("transformers built its read pool")

    stock = AutoModelForCausalLM.from_pretrained(tiny_ckpt).state_dict()  # stock's own load uses the pool
    monkeypatch.setattr(loading, "ThreadPoolExecutor", NoPool)
    original = transformers.PreTrainedModel.__dict__["from_pretrained"]
    model, kwargs, fp8_block = plan_streamed(transformers.DeepseekV4ForCausalLM, tiny_ckpt, (), {})
    stream = open_reader(model, original, transformers.DeepseekV4ForCausalLM, tiny_ckpt, (), kwargs, fp8_block)
    for prefix in stream.prefixes:
        for name, tensor in stream.read(prefix).items():
            assert tensor.device.type == "cpu" and torch.equal(tensor, stock[prefix + name]), prefix + name


def test_accelerates_parallelism_check_is_recorded_in_scope_and_restored_also_on_error():
    from accelerate.parallelism_config import ParallelismConfig

    original = ParallelismConfig.__dict__["_validate_accelerator"]
    checks = []
    with pytest.raises(RuntimeError, match="boom"), compat.parallelism_check_deferred(checks):
        ParallelismConfig._validate_accelerator(ParallelismConfig(), "the accelerator")  # recorded, not run
        raise RuntimeError("boom")
    assert ParallelismConfig.__dict__["_validate_accelerator"] is original and len(checks) == 1


def test_memory_tracker_counts_the_model_optimizer_and_existing_tensors_from_entry():
    import torch

    model = torch.nn.Linear(8, 4, bias=False)  # 128 bytes
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # no state
    existing = [torch.zeros(1000), torch.zeros(10, dtype=torch.float64)]  # 4,000 + 80 bytes
    with compat.memory_tracker(model, optimizer, existing) as tracker:
        peak = compat.tracker_peak(tracker)["cpu"]
    assert peak["total"] == 128 + 4000 + 80 and peak["param"] == 128
