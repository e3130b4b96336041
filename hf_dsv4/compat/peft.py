"""peft's part of the fence: the private names of peft that hf_dsv4 relies on (LoRA over routed experts, applied
through `target_parameters`) and the function that reaches them.
"""

from __future__ import annotations

from . import Internal

# peft's part of `hf_dsv4.compat.FENCE`: fence name -> (tested versions, the internals hf_dsv4 relies on)
FENCE: dict[str, tuple[str, tuple[Internal, ...]]] = {
    "peft": (">=0.21,<0.22", (
        Internal("peft.tuners.lora.layer:ParamWrapper.get_param", (), why="routed-expert adapter dtype alignment"),
        Internal(
            "peft.tuners.lora.layer:_LoraFactorsProxy.forward",
            ("W",),
            why="over quantized routed experts peft's fold reaches the quantized weight as this `baddbmm`, which it "
            "makes lazily (per expert: `QuantizedWeight.__torch_function__`)",
            decides=("return torch.baddbmm(W, self.lhs, self.rhs, alpha=self.scaling)",),
        ),
    )),
}  # fmt: skip


def param_wrapper_class() -> type:
    """peft's LoRA wrapper for adapters applied through `target_parameters` (routed experts)."""
    from peft.tuners.lora.layer import ParamWrapper

    return ParamWrapper
