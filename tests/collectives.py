"""`CollectiveRecorder`: what a process sends over torch.distributed, for tests that prove what a step moves (used by
`dist_worker.py` and `recipe_script.py`; `test_adapter_dist.py` checks that it sees Python-level and DTensor
collectives)."""

from __future__ import annotations

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


class CollectiveRecorder(TorchDispatchMode):
    """Records every collective op this process dispatches: the functional collectives that DTensor uses
    (`_c10d_functional.*`) and the `c10d.*` ops behind the `torch.distributed` Python API (`dist.broadcast`,
    `broadcast_object_list`, ...): op name, dtype, and the elements and bytes of the tensor it sends."""

    # c10d op -> index of its input (sent) tensor argument; the other ops send their first argument
    _INPUT_ARG = {"allgather_": 1, "_allgather_base_": 1, "allgather_into_tensor_coalesced_": 1,
                  "reduce_scatter_": 1, "_reduce_scatter_base_": 1, "reduce_scatter_tensor_coalesced_": 1,
                  "gather_": 1, "scatter_": 1, "alltoall_": 1, "alltoall_base_": 1}  # fmt: skip
    _NOT_COLLECTIVES = {"wait_tensor", "wait", "recv_", "recv_any_source_", "_wrap_tensor_autograd"}

    def __init__(self):
        super().__init__()
        self.calls: list[dict] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, name = func.namespace, func._schema.name.split("::")[-1]
        if namespace in ("_c10d_functional", "c10d", "_dtensor") and name not in self._NOT_COLLECTIVES:
            sent = args[self._INPUT_ARG.get(name, 0)] if args else None
            tensors = [t for t in pytree.tree_leaves(sent) if isinstance(t, torch.Tensor)]
            self.calls.append({
                "op": f"{namespace}.{name}",
                "dtypes": sorted({str(t.dtype) for t in tensors}),
                "elements": sum(t.numel() for t in tensors),
                "bytes": sum(t.numel() * t.element_size() for t in tensors),
            })  # fmt: skip
        return func(*args, **(kwargs or {}))

    def summary(self) -> dict:
        """op -> {calls, elements, bytes, elements_by_dtype}."""
        out = {}
        for call in self.calls:
            entry = out.setdefault(call["op"], {"calls": 0, "elements": 0, "bytes": 0, "elements_by_dtype": {}})
            entry["calls"] += 1
            entry["elements"] += call["elements"]
            entry["bytes"] += call["bytes"]
            by_dtype = entry["elements_by_dtype"]
            key = ",".join(call["dtypes"])
            by_dtype[key] = by_dtype.get(key, 0) + call["elements"]
        return out

    def floating_elements(self) -> int:
        """Elements of floating-point tensors sent (weights, gradients, optimizer moments; not pickled objects)."""
        return sum(call["elements"] for call in self.calls if any("float" in d for d in call["dtypes"]))
