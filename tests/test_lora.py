"""LoRA presets on the tiny DeepSeek-V4: exactly which modules each preset adapts, and adapter dtypes."""

from __future__ import annotations

import math

import peft
import pytest
import torch
import transformers
from peft.tuners.lora.layer import LoraLayer, ParamWrapper

from hf_dsv4.sharding import align_parameter_adapter_dtypes
from hf_dsv4.testing import tiny_dsv4_config
from hf_dsv4.training.lora import (
    ATTENTION,
    LORA_TARGETS,
    ROUTED_EXPERTS,
    SHARED_EXPERTS,
    dsv4_lora_config,
    resolve_lora_targets,
)

LAYERS = range(3)  # sliding, CSA (compressor + indexer), HCA (compressor); hash router on layer 0
ATTENTION_NAMES = {
    f"model.layers.{i}.self_attn.{p}" for i in LAYERS for p in ("q_a_proj", "q_b_proj", "kv_proj", "o_b_proj")
}
SHARED_NAMES = {
    f"model.layers.{i}.mlp.shared_experts.{p}" for i in LAYERS for p in ("gate_proj", "up_proj", "down_proj")
}
EXPERT_PARAMS = {(f"model.layers.{i}.mlp.experts", p) for i in LAYERS for p in ("gate_up_proj", "down_proj")}
PREFIX = "base_model.model."
IDS = torch.tensor([[0, 17, 230, 5, 999, 42, 7, 64, 300, 12, 1, 3]])


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_model(dtype: torch.dtype | None = None) -> transformers.DeepseekV4ForCausalLM:
    torch.manual_seed(0)
    if dtype is None:
        return transformers.DeepseekV4ForCausalLM(tiny_dsv4_config()).eval()
    return transformers.DeepseekV4ForCausalLM._from_config(tiny_dsv4_config(), dtype=dtype).eval()


def adapted(model) -> tuple[set[str], set[tuple[str, str]]]:
    """(names of modules with a LoRA layer, {(module, parameter)} adapted through target_parameters)."""
    modules, parameters = set(), set()
    for name, module in model.named_modules():
        name = name.removeprefix(PREFIX)
        if isinstance(module, ParamWrapper):  # peft nests one wrapper per parameter: experts(.base_layer)*
            parameters.add((name.split(".base_layer")[0], module.parameter_name))
        elif isinstance(module, LoraLayer):
            modules.add(name)
    return modules, parameters


def randomize_lora_b(model, only: type | None = None) -> None:
    """Make every (or only `only`-typed) LoRA update non-zero, so that it changes the output."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer) and (only is None or isinstance(module, only)):
                for lora_b in module.lora_B.values():
                    weight = lora_b.weight
                    weight.copy_(torch.randn(weight.shape, generator=generator).to(weight.dtype) * 0.5)


EXPECTED = {
    "attention": (ATTENTION_NAMES, set()),
    "attention+shared": (ATTENTION_NAMES | SHARED_NAMES, set()),
    "all": (ATTENTION_NAMES | SHARED_NAMES, EXPERT_PARAMS),
}


def test_presets_are_the_documented_three():
    assert list(LORA_TARGETS) == ["attention", "attention+shared", "all"]
    assert LORA_TARGETS["all"] == (
        f"{ATTENTION}|{SHARED_EXPERTS}",
        ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )


@pytest.mark.parametrize("preset", list(EXPECTED))
def test_preset_adapts_exactly_its_modules_and_changes_the_forward(preset):
    base = tiny_model()
    with torch.no_grad():
        reference = base(IDS).logits
    model = peft.get_peft_model(base, dsv4_lora_config(r=2, targets=preset))
    modules, parameters = adapted(model)

    assert (modules, parameters) == EXPECTED[preset]
    assert not any("compressor" in name or "indexer" in name or "o_a_proj" in name for name in modules)
    assert sum(isinstance(m, ParamWrapper) for m in model.modules()) == len(EXPECTED[preset][1])
    trainable = {n.removeprefix(PREFIX) for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)

    with torch.no_grad():
        assert torch.equal(model(IDS).logits, reference)  # LoRA B starts at zero: the base output
        randomize_lora_b(model)
        logits = model(IDS).logits
    assert logits.shape == (1, IDS.shape[1], 1024)
    assert torch.isfinite(logits).all()
    assert not torch.allclose(logits, reference)


def test_routed_expert_lora_is_one_rank_r_update_per_expert_and_reaches_the_output():
    base = tiny_model()
    with torch.no_grad():
        reference = base(IDS).logits
    model = peft.get_peft_model(base, dsv4_lora_config(r=2, targets="all"))
    wrappers = [m for m in model.modules() if isinstance(m, ParamWrapper)]
    n_experts = tiny_dsv4_config().n_routed_experts
    assert {m.lora_A["default"].weight.shape[0] for m in wrappers} == {2 * n_experts}
    randomize_lora_b(model, only=ParamWrapper)  # only the routed experts' adapter is non-zero
    with torch.no_grad():
        assert not torch.allclose(model(IDS).logits, reference)


@pytest.mark.parametrize("preset", list(LORA_TARGETS))
def test_one_element_list_holding_a_preset_name_is_that_preset(preset):
    assert resolve_lora_targets([preset]) == resolve_lora_targets(preset)
    assert resolve_lora_targets((preset,)) == resolve_lora_targets(preset)
    as_list, as_name = dsv4_lora_config(targets=[preset]), dsv4_lora_config(targets=preset)
    assert as_list.target_modules == as_name.target_modules
    assert as_list.target_parameters == as_name.target_parameters


def test_resolve_gives_regex_and_parameters_and_none_means_attention():
    assert resolve_lora_targets(None) == (ATTENTION, None)
    assert resolve_lora_targets("attention") == (ATTENTION, None)
    assert resolve_lora_targets("attention+shared") == (f"{ATTENTION}|{SHARED_EXPERTS}", None)
    modules, parameters = resolve_lora_targets("all")
    assert (modules, parameters) == (f"{ATTENTION}|{SHARED_EXPERTS}", ROUTED_EXPERTS)
    parameters.append("mutated")  # a copy: the preset table is not changed by callers
    assert LORA_TARGETS["all"][1] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def test_explicit_module_names_are_kept_as_given():
    assert resolve_lora_targets(("q_a_proj", "kv_proj")) == (["q_a_proj", "kv_proj"], None)
    assert resolve_lora_targets(["mlp"]) == (["mlp"], None)  # one name that is no preset: a module name
    config = dsv4_lora_config(r=2, targets=["model.layers.1.self_attn.q_b_proj"])
    modules, parameters = adapted(peft.get_peft_model(tiny_model(), config))
    assert (modules, parameters) == ({"model.layers.1.self_attn.q_b_proj"}, set())


def test_unknown_preset_raises_naming_it_and_the_presets():
    with pytest.raises(ValueError) as excinfo:
        dsv4_lora_config(targets="mlp")
    assert str(excinfo.value) == (
        "unknown LoRA target preset 'mlp': use one of ['all', 'attention', 'attention+shared'] or a list of module names"
    )


@pytest.mark.parametrize(
    "targets", [["q_a_proj", "o_a_proj"], ["self_attn.o_a_proj"], ["model.layers.0.self_attn.o_a_proj"]]
)
def test_explicit_o_a_proj_raises(targets):
    # peft matches a listed name against module-name suffixes, so a dotted path to o_a_proj would adapt it too
    with pytest.raises(ValueError, match=r"o_a_proj is a grouped \(block-diagonal\) projection that LoRA cannot adapt"):
        dsv4_lora_config(targets=targets)


def test_extra_kwargs_pass_through_and_target_parameters_add_to_the_preset():
    config = dsv4_lora_config(r=4, alpha=8, dropout=0.1, targets="all", use_rslora=True, target_parameters=["x.w"])
    assert (config.r, config.lora_alpha, config.lora_dropout, config.use_rslora) == (4, 8, 0.1, True)
    assert config.task_type == "CAUSAL_LM"
    assert config.target_parameters == [*ROUTED_EXPERTS, "x.w"]
    assert dsv4_lora_config(targets="attention", target_parameters=["x.w"]).target_parameters == ["x.w"]
    assert dsv4_lora_config(targets="attention").target_parameters is None

    model = peft.get_peft_model(tiny_model(), dsv4_lora_config(r=4, alpha=8, targets="attention", use_rslora=True))
    q_a = model.base_model.model.model.layers[0].self_attn.q_a_proj
    assert q_a.scaling["default"] == 8 / math.sqrt(4)  # rsLoRA: alpha / sqrt(r), not alpha / r


def test_align_casts_exactly_the_routed_expert_factors_of_a_bf16_base():
    model = peft.get_peft_model(tiny_model(torch.bfloat16), dsv4_lora_config(r=2, targets="all"))
    wrappers = [m for m in model.modules() if isinstance(m, ParamWrapper)]
    assert {m.get_param().dtype for m in wrappers} == {torch.bfloat16}
    assert {p.dtype for m in wrappers for p in m.lora_A.parameters()} == {torch.float32}  # peft's autocast

    assert align_parameter_adapter_dtypes(model) == 2 * len(wrappers)  # lora_A and lora_B of each wrapper
    dtypes = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            dtypes[name.removeprefix(PREFIX).split(".lora_")[0]] = param.dtype
    experts = {name for name in dtypes if ".mlp.experts" in name}
    assert {name.split(".base_layer")[0] for name in experts} == {f"model.layers.{i}.mlp.experts" for i in LAYERS}
    assert {dtypes[name] for name in experts} == {torch.bfloat16}
    assert set(dtypes) - experts == ATTENTION_NAMES | SHARED_NAMES
    assert {dtypes[name] for name in set(dtypes) - experts} == {torch.float32}

    assert align_parameter_adapter_dtypes(model) == 0  # already aligned
    randomize_lora_b(model)
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits.float()).all()


def test_align_casts_nothing_without_routed_expert_lora():
    model = peft.get_peft_model(tiny_model(torch.bfloat16), dsv4_lora_config(r=2, targets="attention+shared"))
    assert align_parameter_adapter_dtypes(model) == 0
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
