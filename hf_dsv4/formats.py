"""The quantized-resident base's names, shared by loading (which reads a weight's two parts from the checkpoint) and
sharding (which gives the model that shape): one home below both, importing nothing of hf_dsv4.

- `KINDS`: the release's encodings, FP8 e4m3 + ue8m0 128 x 128 block scales and FP4 e2m1 (two per byte) + ue8m0 1 x 32
  block scales;
- `DATA`, `SCALE`: the suffixes of a quantized weight `<leaf>`'s two parts in the checkpoint reader and the state dict
  (the codes' bytes, the scale bytes);
- `EXPERTS_MODES`: how quantized routed experts compute (one expert's weight at a time, or one dequantized stack).
"""

from __future__ import annotations

KINDS = ("fp8", "fp4")
DATA, SCALE = "_q", "_scale"
EXPERTS_MODES = ("per_expert", "stack")


def quantized_parts(weight: str) -> tuple[str, str]:
    """The names of the two parameters that stand for the quantized `weight`: (codes, scales)."""
    return weight + DATA, weight + SCALE
