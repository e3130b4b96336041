"""`accelerate` integration: `Accelerator.prepare` shards DeepSeek-V4 with `shard_model`, on GPUs and on CPU processes.

Use `DSV4Accelerator` where a script would use `Accelerator`. Launched with an FSDP config
(`accelerate launch --config_file accelerate_configs/fsdp2_cpu_2proc.yaml script.py`), it builds a `DSV4FSDP2Plugin`
from the same `FSDP_*` environment variables accelerate's plugin reads, and `prepare(model, optimizer, ...)` then:

- shards the model with `hf_dsv4.shard_model` (rank 0's weights sent into every shard through DCP; the other ranks
  may hold a meta model from `memory_efficient_init`) instead of accelerate's `fsdp2_prepare_model`, which crashes on
  DeepSeek-V4's persistent buffers and never sends the non-persistent ones;
- points the optimizer at the sharded parameters by parameter identity. accelerate maps them by `data_ptr()`, which
  is 0 for every meta tensor, so on the ranks that built the model on meta every optimizer entry would become the same
  parameter;
- on CPU processes, where accelerate ignores FSDP (the state says MULTI_CPU and `prepare` wraps in DDP), sets the
  accelerator state to FSDP exactly as accelerate does for GPU processes, so `prepare`, `backward`,
  `clip_grad_norm_`, `no_sync` and checkpointing take the same FSDP2 code paths as on GPUs. Processes started by
  `accelerate launch` on a machine without an accelerator are joined into one gloo group (stock accelerate leaves
  each of them alone, `DistributedType.NO`).

Nothing in accelerate is replaced: the routing is a subclass override of `Accelerator._prepare_fsdp2` (the step
`prepare` runs for FSDP2), and the CPU state is set when the accelerator is built and put back by `end_training()`
or when the accelerator is garbage-collected. Every accelerate internal used here goes through `hf_dsv4.compat`.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, DynamoBackend, FullyShardedDataParallelPlugin
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

from .. import compat
from ..modeling import enable_context_parallel
from ..sharding import shard_model

logger = logging.getLogger(__name__)


@dataclass
class DSV4FSDP2Plugin(FullyShardedDataParallelPlugin):
    """accelerate's FSDP plugin, FSDP2 only, whose models `DSV4Accelerator.prepare` shards with `shard_model`.

    Fields and their `FSDP_*` environment fallbacks (what `accelerate launch` configs set) are accelerate's. Used:
    `reshard_after_forward`, `cpu_offload` (`fsdp_offload_params`), `mixed_precision_policy` (from the accelerator's
    `mixed_precision`; applied to bf16/fp32 groups, never to fp32-kept modules) and `state_dict_type`. The layout is
    fixed (one FSDP group per decoder layer and dtype), so `auto_wrap_policy`, `transformer_cls_names_to_wrap` and
    `min_num_params` are ignored, and weights always come from rank 0, whatever `cpu_ram_efficient_loading` says.

    Args:
        fsdp_version: must be 2; falls back to `FSDP_VERSION`, then 2. Other fields: accelerate's plugin's.

    Raises:
        ValueError: an `fsdp_version` other than 2, `activation_checkpointing` (use the model's gradient
            checkpointing) or `ignored_modules` (every parameter is sharded).
    """

    fsdp_version: int = field(
        default=None,
        metadata={"help": "Must be 2 (FSDP2). Falls back to FSDP_VERSION, then 2."},
    )

    def __post_init__(self) -> None:
        if self.fsdp_version is None:
            self.fsdp_version = int(os.environ.get("FSDP_VERSION", "2"))
        if self.fsdp_version != 2:
            raise ValueError(
                f"hf_dsv4 shards with FSDP2 only, got fsdp_version={self.fsdp_version}: set `fsdp_version: 2` in the "
                "accelerate config's fsdp_config (or FSDP_VERSION=2)"
            )
        super().__post_init__()
        if self.activation_checkpointing:
            raise ValueError(
                "activation_checkpointing is not applied by hf_dsv4's FSDP2 plugin: set `fsdp_activation_checkpointing:"
                " false` and call `model.gradient_checkpointing_enable()` (or `gradient_checkpointing=True` in "
                "TrainingArguments) instead"
            )
        if self.ignored_modules is not None:
            raise ValueError("ignored_modules is not supported by hf_dsv4's FSDP2 plugin: every parameter is sharded")


def _launched_without_accelerator() -> bool:
    """Several processes (WORLD_SIZE > 1) on a machine where torch sees no GPU-like accelerator."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available()


def _use_fsdp_on_cpu(accelerator: Accelerator, plugin: DSV4FSDP2Plugin) -> None:
    """Set a MULTI_CPU accelerator state to FSDP with `plugin`, as `AcceleratorState` does for GPU processes; the
    process-wide `PartialState` change is put back by `DSV4Accelerator.end_training` (or garbage collection)."""
    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        return
    state.distributed_type = DistributedType.FSDP
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    restore = compat.set_process_distributed_type(DistributedType.FSDP)
    accelerator._restore_partial_state = weakref.finalize(accelerator, restore)
    logger.info("FSDP2 enabled on %d CPU processes (gloo)", state.num_processes)


class DSV4Accelerator(Accelerator):
    """`Accelerator` whose `prepare` shards models with `hf_dsv4.shard_model` when its FSDP plugin is a
    `DSV4FSDP2Plugin`, on GPU and CPU processes alike.

    `fsdp_plugin` defaults to `DSV4FSDP2Plugin()` when the script runs under an FSDP launch config
    (`ACCELERATE_USE_FSDP=true`); a plain `FullyShardedDataParallelPlugin` keeps accelerate's own behaviour. With
    several processes and no GPU-like accelerator, `cpu` is forced on so that the processes form one gloo group.
    Other arguments are `Accelerator`'s.

    `prepare(model, optimizer, ...)`: every rank must call it; rank 0 must hold real weights, the others may hold
    the model on meta. The model is sharded in place and the optimizer's parameter groups are switched to the sharded
    parameters (create the optimizer before `prepare`, without state). Activation checkpointing and
    `torch.compile` are not applied on this path.

    `fsdp_plugin_args` and `adapter_initializer` (class attributes): keyword arguments for a `DSV4FSDP2Plugin` built
    in place of any `fsdp_plugin` passed in, and the default `init_adapter`; set on the subclass that
    `dsv4_trainer_accelerator` hands to the Trainer.

    Args:
        fsdp_plugin: the FSDP plugin; a `DSV4FSDP2Plugin` selects `shard_model`.
        init_adapter: how `prepare` draws a new LoRA adapter's factors on a streamed base (`shard_model`'s
            `init_adapter`, e.g. `hf_dsv4.training.lora.seeded_lora_init(seed)`); default peft's own initialisation.
        *args, **kwargs: `Accelerator`'s.
    """

    fsdp_plugin_args: ClassVar[dict[str, Any] | None] = None
    adapter_initializer: ClassVar[Callable[[nn.Module], object] | None] = None

    def __init__(
        self,
        *args,
        fsdp_plugin: FullyShardedDataParallelPlugin | None = None,
        init_adapter: Callable[[nn.Module], object] | None = None,
        **kwargs,
    ) -> None:
        self._restore_partial_state: weakref.finalize | None = None
        self.init_adapter = init_adapter or self.adapter_initializer
        if self.fsdp_plugin_args is not None:
            fsdp_plugin = DSV4FSDP2Plugin(**self.fsdp_plugin_args)
        elif fsdp_plugin is None and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            fsdp_plugin = DSV4FSDP2Plugin()
        if _launched_without_accelerator() and not kwargs.get("cpu"):
            logger.info("no GPU-like accelerator: running the %s processes on CPU", os.environ["WORLD_SIZE"])
            kwargs["cpu"] = True
        # accelerate checks a parallelism config (HSDP: dp_replicate x dp_shard) against the distributed type before
        # CPU processes are switched to FSDP below, and refuses MULTI_CPU: the check runs after the switch instead
        checks: list = []
        with compat.parallelism_check_deferred(checks):
            super().__init__(*args, fsdp_plugin=fsdp_plugin, **kwargs)
        if isinstance(fsdp_plugin, DSV4FSDP2Plugin):
            _use_fsdp_on_cpu(self, fsdp_plugin)
        for check in checks:
            check()

    def end_training(self) -> None:
        """accelerate's end of a run (trackers finished), then accelerate's process-wide state put back as it was
        before this accelerator switched CPU processes to FSDP."""
        super().end_training()
        if self._restore_partial_state is not None:
            self._restore_partial_state()

    def _prepare_fsdp2(self, *args):
        """`prepare`'s FSDP2 step: optimizers, schedulers and data loaders as accelerate prepares them, the model with
        `shard_model`, then the optimizers switched to the sharded parameters."""
        plugin = self.state.fsdp_plugin
        if not isinstance(plugin, DSV4FSDP2Plugin):
            return super()._prepare_fsdp2(*args)
        if self.state.dynamo_plugin.backend != DynamoBackend.NO:
            raise ValueError("torch.compile (dynamo_backend) is not applied by hf_dsv4's FSDP2 plugin: set it to 'no'")
        # Optimizers before schedulers (a scheduler wraps the prepared optimizer), as accelerate does.
        result = [obj if isinstance(obj, nn.Module) else compat.prepare_one(self, obj, first_pass=True) for obj in args]
        result = [obj if isinstance(obj, nn.Module) else compat.prepare_one(self, obj) for obj in result]
        optimizers = [obj for obj in result if isinstance(obj, torch.optim.Optimizer)]
        for model in (obj for obj in result if isinstance(obj, nn.Module)):
            self._shard(model, plugin, optimizers)
        return tuple(result)

    def _prepare_cp(self, *args):
        """`prepare`'s context-parallel step (accelerate's `parallelism_config_cp_size` > 1): hf_dsv4's
        `enable_context_parallel` over the mesh's "cp" ranks instead of torch's ring attention, which can express
        full causal attention only (accelerate refuses DeepSeek-V4's sliding / compressed layers for it). The
        trainer gives each rank its contiguous chunk (`DSV4SFTTrainer._prepare_context_parallel_inputs`)."""
        group = self.torch_device_mesh["cp"].get_group()
        for model in (obj for obj in args if isinstance(obj, nn.Module)):
            enable_context_parallel(model, group=group)
        return args

    def _shard(self, model: nn.Module, plugin: DSV4FSDP2Plugin, optimizers: list[torch.optim.Optimizer]) -> None:
        """`shard_model` with the plugin's settings; the optimizers' parameters replaced by the sharded ones."""
        names: dict[nn.Parameter, str] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            names.setdefault(param, name)
        mesh = self.torch_device_mesh
        if mesh is not None:
            mesh = mesh[tuple(self.parallelism_config.fsdp_dim_names)]
        shard_model(
            model,
            mesh=mesh,
            reshard_after_forward=plugin.reshard_after_forward,
            mixed_precision=fp32_reduction(plugin.mixed_precision_policy),
            cpu_offload=isinstance(plugin.cpu_offload, CPUOffloadPolicy),
            init_adapter=self.init_adapter,
        )
        for optimizer in optimizers:
            _switch_to_sharded(optimizer, model, names)
        compat.register_prepared_model(self, model)


def fp32_reduction(policy: MixedPrecisionPolicy | None) -> MixedPrecisionPolicy | None:
    """The policy FSDP2 gets from accelerate's `mixed_precision` ("bf16": parameters, gradient reduction and every
    group's output in bf16), with gradients reduced in fp32 and outputs left in the dtype they are computed in, as
    the launch configs say: LoRA gradients are small and summed over ranks, and the loss is not rounded to bf16. A
    policy whose reduction dtype differs from its parameters' was chosen on purpose and is kept."""
    if policy is None or policy.param_dtype is None or policy.reduce_dtype != policy.param_dtype:
        return policy
    return MixedPrecisionPolicy(
        param_dtype=policy.param_dtype, reduce_dtype=torch.float32, output_dtype=None,
        cast_forward_inputs=policy.cast_forward_inputs,
    )  # fmt: skip


def _switch_to_sharded(optimizer: torch.optim.Optimizer, model: nn.Module, names: dict[nn.Parameter, str]) -> None:
    """Replace every parameter in `optimizer`'s groups by the model parameter of the same name after sharding."""
    if optimizer.state:
        raise ValueError("the optimizer already has state: create it before `prepare` and step it only after")
    for index, group in enumerate(optimizer.param_groups):
        unknown = sum(param not in names for param in group["params"])
        if unknown:
            raise ValueError(
                f"optimizer param group {index} holds {unknown} tensor(s) that are not parameters of the prepared "
                "model: build the optimizer from `model.parameters()` of the model passed to `prepare`"
            )
        group["params"] = [model.get_parameter(names[param]) for param in group["params"]]


@contextmanager
def dsv4_trainer_accelerator(
    fsdp_plugin_args: dict[str, Any] | None = None, init_adapter: Callable[[nn.Module], object] | None = None
) -> Iterator[type[DSV4Accelerator]]:
    """Scope under which a `transformers.Trainer` (or any subclass, e.g. TRL's `SFTTrainer`) built inside it uses
    `DSV4Accelerator` instead of `Accelerator`, so that under an FSDP launch config its model is sharded with
    `hf_dsv4.shard_model`, on GPU and CPU processes alike:

        with dsv4_trainer_accelerator():
            trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[DSV4Callback()])

    `fsdp_plugin_args` (what `TrainingArguments(fsdp=..., fsdp_config=...)` produces, `args.fsdp_plugin_args`)
    builds the `DSV4FSDP2Plugin` when given; otherwise the plugin comes from the launch config's environment.
    `init_adapter` is the accelerator's (`DSV4Accelerator`): how a new adapter on a streamed base is drawn.
    The Trainer module's `Accelerator` is swapped for a `DSV4Accelerator` subclass and restored on exit, also on
    error.

    Args:
        fsdp_plugin_args: keyword arguments of the `DSV4FSDP2Plugin` to build; None: from the launch environment.
        init_adapter: the accelerator's `init_adapter`.

    Yields:
        The `DSV4Accelerator` subclass the Trainer builds.
    """
    initializer = staticmethod(init_adapter) if init_adapter else None  # a plain function would become a method
    settings = {"fsdp_plugin_args": fsdp_plugin_args, "adapter_initializer": initializer}
    accelerator_class = type("DSV4TrainerAccelerator", (DSV4Accelerator,), settings)
    with compat.trainer_accelerator_class(accelerator_class):
        yield accelerator_class
