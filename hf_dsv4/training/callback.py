"""`DSV4Callback`: a `TrainerCallback` that saves PEFT adapters from FSDP2 shards and logs throughput, memory and
MoE routing load. Works with `transformers.Trainer`, TRL's `SFTTrainer` and `hf_dsv4.DSV4SFTTrainer`.

- On every checkpoint save it writes `adapter_model.safetensors` + `adapter_config.json` (the keys
  `PeftModel.save_pretrained` writes) into the checkpoint folder, gathered with only the trainable tensors crossing
  the wire (`hf_dsv4.training.adapter.save_adapter`; atomic). `DSV4SFTTrainer` saves the adapter itself and switches this off.
- At each logging step it adds to the logs (and to that step's entry in `state.log_history`): `tokens_per_second` (non-padding input tokens on all ranks per second of
  wall time since the previous log), `peak_memory_gb` (the largest peak on any rank: CUDA allocator peak on GPUs,
  process peak RSS on CPU), and for MoE models `moe_imbalance` (mean over MoE layers of max/mean tokens per expert;
  1.0 is perfectly balanced) and `moe_max_expert_share` (the largest fraction of a layer's routed slots that one
  expert took). Per-layer tokens per expert go to the `hf_dsv4.training.callback` logger at DEBUG level.

Routing is counted by forward hooks on the routers (every module with `num_experts` and `top_k` whose forward returns
`(logits, weights, indices)`), on all tokens of the batch, padding included. Counting a log is one small all-reduce,
so every rank must log at the same steps (the Trainer does).
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..distributed import is_distributed, local_device
from .adapter import peft_model_of, save_adapter

logger = logging.getLogger(__name__)


def _is_router(module: nn.Module) -> bool:
    return type(module).__name__.endswith("Router") and hasattr(module, "num_experts") and hasattr(module, "top_k")


def process_peak_memory_bytes() -> int:
    """Peak memory of this process: the CUDA allocator's peak on a GPU, else peak RSS (VmHWM)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class DSV4Callback(TrainerCallback):
    """Adapter saving on checkpoints and throughput / memory / routing-load logging for DeepSeek-V4 training.

    Args:
        save_adapter: write a PEFT adapter into every checkpoint folder (needs a PeftModel in the trained model).
        log_routing: count tokens per expert through router hooks and log the imbalance.
    """

    def __init__(self, save_adapter: bool = True, log_routing: bool = True):
        self.save_adapter = save_adapter
        self.log_routing = log_routing
        self._handles: list = []
        self._routers: list[nn.Module] = []
        self._counts: dict[nn.Module, torch.Tensor] = {}
        self._tokens = 0
        self._since = time.perf_counter()
        self.last_metrics: dict[str, float] = {}
        self._collected_at: int | None = None

    # ------------------------------------------------------------------------------------------------- hooks
    def _count_tokens(self, module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if mask is not None:
            self._tokens += int(mask.sum())
        elif ids is not None:
            self._tokens += ids.numel()

    def _count_routes(self, module, args, output) -> None:
        indices = output[2].detach().reshape(-1)
        counts = torch.bincount(indices, minlength=module.num_experts)[: module.num_experts]
        previous = self._counts.get(module)
        self._counts[module] = counts if previous is None else previous + counts

    def attach(self, model: nn.Module) -> None:
        """Start counting on `model` (called at `on_train_begin`; idempotent)."""
        self.detach()
        self._handles.append(model.register_forward_pre_hook(self._count_tokens, with_kwargs=True))
        if self.log_routing:
            self._routers = [m for m in model.modules() if _is_router(m)]
            self._handles += [router.register_forward_hook(self._count_routes) for router in self._routers]
        self._tokens, self._counts, self._since = 0, {}, time.perf_counter()

    @property
    def attached(self) -> bool:
        """Whether the callback is counting on a model (between `attach` and `detach`)."""
        return bool(self._handles)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ----------------------------------------------------------------------------------------------- metrics
    def collect(self, step: int) -> dict[str, float]:
        """The metrics since the previous call, reduced over ranks (a collective), and reset the counters."""
        if self._collected_at == step:
            return self.last_metrics
        device = local_device()  # where the collective runs: the GPU under NCCL
        n_experts = [r.num_experts for r in self._routers]
        counts = [
            self._counts.get(r, torch.zeros(n, dtype=torch.long, device=device)).to(device)
            for r, n in zip(self._routers, n_experts)
        ]
        flat = torch.cat([torch.tensor([self._tokens], dtype=torch.long, device=device), *counts])
        peak = torch.tensor([process_peak_memory_bytes()], dtype=torch.float64, device=device)
        if is_distributed():
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        flat = flat.cpu()
        elapsed = max(time.perf_counter() - self._since, 1e-9)
        metrics = {
            "tokens_per_second": round(float(flat[0]) / elapsed, 2),
            "peak_memory_gb": round(float(peak) / 2**30, 4),
        }
        imbalances, shares, offset = [], [], 1
        for index, n in enumerate(n_experts):
            layer = flat[offset : offset + n].double()
            offset += n
            total = float(layer.sum())
            if total > 0:
                imbalances.append(float(layer.max()) / (total / n))
                shares.append(float(layer.max()) / total)
                logger.debug("router %d tokens per expert: %s", index, layer.long().tolist())
        if imbalances:
            metrics["moe_imbalance"] = round(sum(imbalances) / len(imbalances), 4)
            metrics["moe_max_expert_share"] = round(max(shares), 4)
        self._tokens, self._counts, self._since = 0, {}, time.perf_counter()
        self.last_metrics, self._collected_at = metrics, step
        return metrics

    # ----------------------------------------------------------------------------------------------- events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.attach(model)

    def on_train_end(self, args, state, control, **kwargs):
        self.detach()

    def add_metrics(self, logs: dict[str, float], state) -> None:
        """The one place the metrics join a training log (`logs` with a "loss"): added to `logs` and to this step's
        entry of `state.log_history`, never over a value already there. A collective the first time per step
        (`collect`); `DSV4SFTTrainer.log` calls it before the loggers run, `on_log` for any other Trainer."""
        if "loss" not in logs or not self.attached:
            return
        first = self._collected_at != state.global_step
        metrics = self.collect(state.global_step)
        # `Trainer.log` appends its own copy of the logs to the history before the callbacks run: complete that
        # entry too, so that trainer_state.json has the metrics.
        entry = state.log_history[-1] if state.log_history else None
        for target in (logs, entry if entry and entry.get("step") == state.global_step and "loss" in entry else {}):
            target.update({key: value for key, value in metrics.items() if key not in target})
        if first and state.is_world_process_zero:
            logger.info("step %d: %s", state.global_step, metrics)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None:
            self.add_metrics(logs, state)

    def on_save(self, args, state, control, model=None, **kwargs):
        if not self.save_adapter or model is None or peft_model_of(model) is None:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        save_adapter(model, folder)
