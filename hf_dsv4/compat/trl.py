"""trl's part of the fence: the one private name of trl that hf_dsv4 relies on, `SFTTrainer._prepare_dataset`, which
`hf_dsv4.training.DSV4SFTTrainer` overrides (the override lives there; its upstream signature is checked here).
"""

from __future__ import annotations

from . import Internal

# trl's part of `hf_dsv4.compat.FENCE`: fence name -> (tested versions, the internals hf_dsv4 relies on)
FENCE: dict[str, tuple[str, tuple[Internal, ...]]] = {
    "trl": (">=1.16,<1.17", (
        Internal(
            "trl:SFTTrainer._prepare_dataset",
            ("dataset", "processing_class", "args", "packing", "formatting_func", "dataset_name"),
            why="overridden: rows tokenized by hf_dsv4.training.data",
        ),
    )),
}  # fmt: skip
