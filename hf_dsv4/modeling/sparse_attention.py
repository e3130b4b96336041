"""DeepSeek-V4 attention whose memory grows linearly with the sequence: exactly what transformers computes, read
sparsely.

transformers' DeepSeek-V4 attention (`eager_attention_forward`, the only one it has) scores every query against
every key: a sliding-window layer masks an `L x L` matrix to keep `sliding_window` keys per query, and CSA / HCA
layers append the compressed entries with a dense `[B, 1, L, T]` block bias; the model builds an `L x L` mask once
and the lightning indexer scores `[B, L, H_idx, T]` in fp32. What a query reads is small: `sliding_window` keys,
the indexer's top `index_topk` compressed entries (CSA) or the `L / m` compressed entries before it (HCA), and the
sink. `enable_sparse_attention(model)` makes every DeepSeek-V4 attention layer compute exactly that:

- the mask: transformers' mask interface (`AttentionMaskInterface`, registered under `hf_dsv4_sparse`) returns a
  `SparseMask` that keeps the mask *function* transformers composed (sliding window, causal, padding, packed
  sequences) and evaluates it one block of queries at a time (never `L x L`);
- the compressors (the one fenced replacement: each compressor's `forward`, an instance attribute, `_csa_forward` /
  `_hca_forward`, checked against the installed transformers by `hf_dsv4.compat.require("transformers.attention")`):
  the compressed entries are computed as stock computes them, the indexer scores queries in chunks (no gradient
  flows through its top-k in stock either), and instead of a dense block bias the layer keeps its selection (the
  top-k indices, or the per-query count of visible HCA entries) in its `SparseLayer`, the one object its compressor
  and attention share;
- the attention (`AttentionInterface`, registered under `hf_dsv4_sparse`): queries in chunks of `chunk_size`; a
  chunk reads the `chunk + window - 1` keys around it, its gathered compressed entries and the sinks, and softmaxes
  them as stock does (same dtypes, same max subtraction); each chunk is recomputed in backward
  (`torch.utils.checkpoint`), so what stays for backward is linear in L.

With a cache (generation), a prebuilt 4-D mask or an offset query, the layer falls back to the dense stock
computation. The module forwards of the attention itself (projections, rope, output projection) stay the stock
ones, so LoRA, a quantized base and FSDP2 work unchanged.
"""

from __future__ import annotations

import logging
import types
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .. import compat

logger = logging.getLogger(__name__)

IMPLEMENTATION = "hf_dsv4_sparse"
DEFAULT_CHUNK_SIZE = 256
# the one attribute hf_dsv4 sets here: a layer's `SparseLayer` on its attention and compressor; on `DeepseekV4Model`
# True once its pre-hook (`_no_implicit_cache`) is registered
SPARSE = "_hf_dsv4_sparse"
_GATHER_ABOVE = 2  # CSA reads the gathered picks once there are more than this many entries per pick


class SparseAttentionError(ValueError):
    """A model or input that sparse attention cannot serve."""


@dataclass
class SparseMask:
    """What transformers' mask interface was asked to build, kept as a function of (batch, query, key) indices.

    `block(q_start, q_stop, kv_start, kv_len)` is the boolean mask of a block of queries against `kv_len` keys from
    `kv_start` (keys outside `[0, kv_length)` are masked), evaluated by transformers' own `sdpa_mask` with the same
    mask function, padding mask and offsets; `dense(dtype)` is the `[B, 1, L, kv_length]` mask stock eager gets.

    The fields are what transformers' mask interface was called with (`sdpa_mask`'s arguments), `extra` its other
    keyword arguments, passed on to `sdpa_mask`.

    Args:
        batch_size: the batch size.
        q_length, kv_length: the number of queries and of keys.
        q_offset, kv_offset: the positions of the first query and of the first key.
        mask_function: transformers' mask function of (batch, head, query, key) indices.
        attention_mask: the 2-D padding mask (`[B, seen + q_length]`), or None.
        local_size: the size of the local (sliding-window) attention; None for full attention.
        use_vmap: whether `mask_function` is evaluated with `vmap` (for patterns that are not index-based).
        device: the device of the masks.
        extra: the other keyword arguments (for `dense`).
    """

    batch_size: int
    q_length: int
    kv_length: int
    q_offset: int
    kv_offset: int
    mask_function: Any
    attention_mask: torch.Tensor | None
    local_size: int | None
    use_vmap: bool
    device: Any
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def sparse_ok(self) -> bool:
        """Whether the mask is the plain sliding window over a fresh sequence (what the blockwise path assumes)."""
        return (
            not self.use_vmap
            and self.q_offset == 0
            and self.kv_offset == 0
            and self.q_length == self.kv_length
            and self.local_size is not None
        )

    def block(self, q_start: int, q_stop: int, kv_start: int, kv_len: int) -> torch.Tensor:
        lo, hi = max(kv_start, 0), min(kv_start + kv_len, self.kv_length)
        out = torch.zeros(self.batch_size, 1, q_stop - q_start, kv_len, dtype=torch.bool, device=self.device)
        if hi > lo:
            out[..., lo - kv_start : hi - kv_start] = compat.sdpa_mask(
                batch_size=self.batch_size,
                q_length=q_stop - q_start,
                kv_length=hi - lo,
                q_offset=self.q_offset + q_start,
                kv_offset=self.kv_offset + lo,
                mask_function=self.mask_function,
                attention_mask=self.attention_mask,
                allow_is_causal_skip=False,
                use_vmap=self.use_vmap,
                device=self.device,
            )
        return out

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        return compat.eager_mask(
            batch_size=self.batch_size,
            q_length=self.q_length,
            kv_length=self.kv_length,
            q_offset=self.q_offset,
            kv_offset=self.kv_offset,
            mask_function=self.mask_function,
            attention_mask=self.attention_mask,
            dtype=dtype,
            use_vmap=self.use_vmap,
            device=self.device,
            **self.extra,
        )


def _sparse_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    use_vmap: bool = False,
    device: Any = "cpu",
    **kwargs: Any,
) -> SparseMask:
    """The mask interface of `hf_dsv4_sparse`: nothing is materialized here."""
    kwargs.pop("allow_is_causal_skip", None)
    for unused in ("dtype", "config"):
        kwargs.pop(unused, None)
    return SparseMask(
        batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, local_size, use_vmap,
        device, kwargs,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ selections


@dataclass
class TopKEntries:
    """CSA: the indexer's picks per query, `[B, L, k]`, -1 where a pick is not causal (stock's sentinel)."""

    indices: torch.Tensor

    def allowed(self, start: int, stop: int) -> torch.Tensor:
        return self.indices[:, start:stop] >= 0

    def mask(self, start: int, stop: int, compressed_len: int) -> torch.Tensor:
        """`[B, C, T]`: whether query `t` picked entry `w`."""
        picks = self.indices[:, start:stop]
        safe = torch.where(picks >= 0, picks, compressed_len)
        out = torch.zeros(*picks.shape[:2], compressed_len + 1, dtype=torch.bool, device=picks.device)
        return out.scatter_(-1, safe, True)[..., :compressed_len]

    def dense_bias(self, compressed_len: int, dtype: torch.dtype) -> torch.Tensor:
        allowed = self.mask(0, self.indices.shape[1], compressed_len).unsqueeze(1)
        return torch.zeros((), dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))


@dataclass
class CausalEntries:
    """HCA: query `t` sees the compressed entries `w < threshold[t] = (position + 1) // m` (stock's block bias); in a
    packed row, only its own sample's: `lower[t] <= w < lower[t] + (position + 1) // m`."""

    threshold: torch.Tensor  # [B, L]
    lower: torch.Tensor | None = None  # [B, L]: the first entry of the query's sample (packed rows)

    def allowed(self, start: int, stop: int, compressed_len: int) -> torch.Tensor:
        entries = torch.arange(compressed_len, device=self.threshold.device).view(1, 1, -1)
        allowed = entries < self.threshold[:, start:stop, None]
        return allowed if self.lower is None else allowed & (entries >= self.lower[:, start:stop, None])

    def dense_bias(self, compressed_len: int, dtype: torch.dtype) -> torch.Tensor:
        allowed = self.allowed(0, self.threshold.shape[1], compressed_len).unsqueeze(1)
        return torch.zeros((), dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))


@dataclass
class _Dense:
    """A compressor that ran the stock way (with a cache): its dense block bias."""

    block_bias: torch.Tensor | None


# ------------------------------------------------------------------------------------------------ compressors


def overlap_compress(module: Any, hidden_states: torch.Tensor, first_position: int = 0) -> torch.Tensor:
    """The CSA compressor's (and the indexer's) compressed entries without a cache: stock's arithmetic, op for op
    (`DeepseekV4CSACompressor.forward` / `DeepseekV4Indexer.forward` with `cache=None`), `[B, T, head_dim]`;
    `first_position`: the global position of `hidden_states`' first token (context parallelism), for the rope. With
    fewer tokens than one block, no entry `[B, 0, head_dim]`, still computed from the projections: see
    `hca_compress`."""
    batch = hidden_states.shape[0]
    kv = module.kv_proj(hidden_states)
    gate = module.gate_proj(hidden_states)
    ratio, head_dim = module.compress_rate, module.head_dim
    usable = (kv.shape[1] // ratio) * ratio
    chunk_kv, chunk_gate = kv[:, :usable], gate[:, :usable]
    n_windows = usable // ratio
    chunk_kv = chunk_kv.view(batch, n_windows, ratio, kv.shape[-1])
    chunk_gate = chunk_gate.view(batch, n_windows, ratio, gate.shape[-1]) + module.position_bias
    new_kv = chunk_kv.new_zeros((batch, n_windows, 2 * ratio, head_dim))
    new_gate = chunk_gate.new_full((batch, n_windows, 2 * ratio, head_dim), float("-inf"))
    new_kv[:, :, ratio:] = chunk_kv[..., head_dim:]
    new_gate[:, :, ratio:] = chunk_gate[..., head_dim:]
    if n_windows > 1:
        new_kv[:, 1:, :ratio] = chunk_kv[:, :-1, :, :head_dim]
        new_gate[:, 1:, :ratio] = chunk_gate[:, :-1, :, :head_dim]
    compressed = module.kv_norm((new_kv * new_gate.softmax(dim=2, dtype=torch.float32).to(new_kv.dtype)).sum(dim=2))
    positions = (torch.arange(n_windows, device=compressed.device) * ratio + first_position).unsqueeze(0)
    positions = positions.expand(batch, -1)
    cos, sin = module.rotary_emb(compressed, position_ids=positions, layer_type=module.rope_layer_type)
    return compat.dsv4_apply_rotary_pos_emb(compressed.unsqueeze(1), cos, sin).squeeze(1)


def hca_compress(module: Any, hidden: torch.Tensor, first_position: int = 0) -> torch.Tensor:
    """`DeepseekV4HCACompressor.forward`'s entries without a cache, `[B, T, head_dim]`, for `hidden` starting at the
    global position `first_position` (a multiple of the ratio; context parallelism): stock's arithmetic, op for op.
    With fewer tokens than one block, no entry, but computed from the projections all the same (stock returns
    fresh zeros): the compressor's parameters then get a gradient of zeros instead of none, so that ranks whose
    batches make entries and ranks whose batches make none reduce the same gradients under FSDP2 (a parameter with
    a gradient on one rank and none on another is a collective mismatch, or a hang)."""
    batch = hidden.shape[0]
    kv, gate = module.kv_proj(hidden), module.gate_proj(hidden)
    ratio = module.compress_rate
    usable = (kv.shape[1] // ratio) * ratio
    n_windows = usable // ratio
    chunk_kv = kv[:, :usable].view(batch, n_windows, ratio, kv.shape[-1])
    chunk_gate = gate[:, :usable].view(batch, n_windows, ratio, gate.shape[-1]) + module.position_bias
    compressed = module.kv_norm(
        (chunk_kv * chunk_gate.softmax(dim=2, dtype=torch.float32).to(chunk_kv.dtype)).sum(dim=2)
    )
    positions = (torch.arange(n_windows, device=compressed.device) * ratio + first_position).unsqueeze(0)
    cos, sin = module.rotary_emb(
        compressed, position_ids=positions.expand(batch, -1), layer_type=module.rope_layer_type
    )
    return compat.dsv4_apply_rotary_pos_emb(compressed.unsqueeze(1), cos, sin).squeeze(1)


@torch.no_grad()
def indexer_topk(
    indexer: Any,
    hidden_states: torch.Tensor,
    q_residual: torch.Tensor,
    position_ids: torch.Tensor,
    chunk: int,
    compressed: torch.Tensor | None = None,
) -> torch.Tensor:
    """`DeepseekV4Indexer.forward` with `cache=None`, its scores computed `chunk` queries at a time: `[B, L, k]`.

    Stock's top-k indices are not differentiable (the indexer gets no gradient from the loss), so nothing here is
    recorded for backward. The inputs are detached: under no_grad a slice of a tensor that requires grad still says
    it does, with no gradient function (which torch's memory tracker, for one, cannot follow). `compressed`: the
    indexer's compressed keys when they come from elsewhere (context parallelism: every rank's)."""
    hidden_states, q_residual = hidden_states.detach(), q_residual.detach()
    batch, seq_len, _ = hidden_states.shape
    compressed = overlap_compress(indexer, hidden_states) if compressed is None else compressed
    cos_q, sin_q = indexer.rotary_emb(hidden_states, position_ids=position_ids, layer_type=indexer.rope_layer_type)
    q = indexer.q_b_proj(q_residual).view(batch, seq_len, -1, indexer.head_dim).transpose(1, 2)
    q = compat.dsv4_apply_rotary_pos_emb(q, cos_q, sin_q).transpose(1, 2)
    compressed_len = compressed.shape[1]
    top_k = min(indexer.index_topk, compressed_len)
    threshold = ((position_ids + 1) // indexer.compress_rate).expand(batch, -1)
    entries = torch.arange(compressed_len, device=hidden_states.device)
    picks = []
    for start in range(0, seq_len, chunk):
        stop = min(start + chunk, seq_len)
        scores = indexer.scorer(q[:, start:stop], compressed, hidden_states[:, start:stop])  # [B, C, T]
        if compressed_len == 0:
            picks.append(scores.topk(top_k, dim=-1).indices)
            continue
        limit = threshold[:, start:stop, None]
        scores = scores.masked_fill(entries.view(1, 1, -1) >= limit, float("-inf"))
        indices = scores.topk(top_k, dim=-1).indices
        picks.append(torch.where(indices >= limit, torch.full_like(indices, -1), indices))
    return torch.cat(picks, dim=1)


# ------------------------------------------------------------------------------------------------ packed rows

_LAST_SAMPLES: list[Any] = [None, None]  # (weak reference to position ids, (key, samples)): every layer asks


def packed_samples(position_ids: torch.Tensor, batch: int) -> list[list[tuple[int, int]]] | None:
    """The samples of packed rows: per row, the `(start, stop)` token span of each sample, a sample starting where a
    position does not follow the one before (transformers' `find_packed_sequence_indices` rule: what TRL's packing
    and padding-free batches produce, each sample's positions restarting at 0); None when no row is packed.

    Args:
        position_ids: `[B, L]` or `[1, L]`.
        batch: B.

    Returns:
        Per row, the spans of its samples, or None (also for traced position ids, which have no values: a
        trace under `FakeTensorMode`, as the Flash rehearsal runs, is of unpacked rows)."""
    if position_ids.is_meta or compat.is_fake(position_ids):
        return None
    ref, cached = _LAST_SAMPLES
    key = (batch, position_ids.shape, position_ids._version)
    if ref is not None and ref() is position_ids and cached[0] == key:
        return cached[1]
    positions = position_ids.expand(batch, -1)
    restarts = positions[:, 1:] - positions[:, :-1] != 1
    samples = None
    if bool(restarts.any()):
        length = positions.shape[1]
        starts = [[0, *(torch.nonzero(row).flatten() + 1).tolist()] for row in restarts]
        samples = [list(zip(row, [*row[1:], length], strict=True)) for row in starts]
    _LAST_SAMPLES[:] = [weakref.ref(position_ids), (key, samples)]
    return samples


def _rows(parts: list[list[torch.Tensor]], dim: int, fill: float) -> torch.Tensor:
    """Each row's parts (`[1, ...]` tensors) concatenated along `dim`, the rows padded with `fill` along `dim` and
    along the last dimension to the longest, and stacked."""
    width = max(part.shape[-1] for row in parts for part in row)
    rows = [torch.cat([F.pad(part, (0, width - part.shape[-1]), value=fill) for part in row], dim=dim) for row in parts]
    longest = max(row.shape[dim] for row in rows)
    pad = [0, 0] * (rows[0].dim() - dim - 1)
    return torch.cat([F.pad(row, [*pad, 0, longest - row.shape[dim]], value=fill) for row in rows])


def _packed_csa(
    compressor: Any, hidden_states: torch.Tensor, q_residual: torch.Tensor, positions: torch.Tensor, samples, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """CSA over packed rows, each sample as if alone: its compressed entries from its own tokens (blocks aligned to
    its start, the first without an overlap), its indexer's picks among them; the entries of a row's samples one
    after the other (the picks shifted to them). Returns (entries `[B, T, D]`, picks `[B, L, k]`, -1 where none)."""
    entries, picks = [], []
    for row, spans in enumerate(samples):
        row_entries, row_picks, offset = [], [], 0
        for start, stop in spans:  # a sample shorter than a block makes no entry and picks none
            own = (slice(row, row + 1), slice(start, stop))
            row_entries.append(overlap_compress(compressor, hidden_states[own]))
            chosen = indexer_topk(compressor.indexer, hidden_states[own], q_residual[own], positions[own], chunk)
            row_picks.append(torch.where(chosen >= 0, chosen + offset, chosen))
            offset += row_entries[-1].shape[1]
        entries.append(row_entries)
        picks.append(row_picks)
    return _rows(entries, 1, 0.0), _rows(picks, 1, -1)


def _packed_hca(compressor: Any, hidden_states: torch.Tensor, positions: torch.Tensor, samples):
    """HCA over packed rows, each sample as if alone: its entries from its own tokens (`hca_compress` on the
    sample), a query seeing its own sample's entries causally. Returns (entries `[B, T, D]`, the selection)."""
    rate, entries = compressor.compress_rate, []
    lower, upper = torch.zeros_like(positions), torch.zeros_like(positions)
    for row, spans in enumerate(samples):
        row_entries, offset = [], 0
        for start, stop in spans:
            lower[row, start:stop] = offset
            row_entries.append(hca_compress(compressor, hidden_states[row : row + 1, start:stop]))
            offset += row_entries[-1].shape[1]
            upper[row, start:stop] = offset  # a sample not starting at position 0 sees no entry past its own
        entries.append(row_entries)
    threshold = torch.minimum(lower + (positions + 1) // rate, upper)
    return _rows(entries, 1, 0.0), CausalEntries(threshold, lower)


@dataclass
class SparseLayer:
    """One DeepSeek-V4 layer's sparse attention: its settings, and the hand-off transformers' interfaces force (the
    attention module calls its compressor, then the attention function, separately): the compressor leaves its
    selection here and the attention takes it, in the same forward; a forward with a cache (generation) is marked
    `cached` by the attention's pre-hook. One object, shared by the layer's attention and compressor (`SPARSE`).

    Args:
        chunk: queries per block of the portable kernel (`DEFAULT_CHUNK_SIZE`).
        kernel: "portable" (blockwise, any device) or "flex" (flex_attention).
        selection: the compressor's selection for the current forward (None until it runs).
        cached: whether the current forward has a cache.
        context_parallel: the layer's `context_parallel.ContextParallel` under `enable_context_parallel`, else None.
    """

    chunk: int = DEFAULT_CHUNK_SIZE
    kernel: str = "portable"
    selection: Any = None
    cached: bool = False
    context_parallel: Any = None  # `context_parallel.ContextParallel` under `enable_context_parallel`

    def take(self) -> tuple[Any, bool]:
        """(the selection, whether this forward has a cache), cleared for the next forward."""
        selection, cached = self.selection, self.cached
        self.selection, self.cached = None, False
        return selection, cached


def sparse_layer(module: Any) -> SparseLayer | None:
    """The sparse attention settings of one module.

    Args:
        module: a DeepSeek-V4 attention or compressor.

    Returns:
        Its `SparseLayer` under `enable_sparse_attention`, else None.
    """
    return module.__dict__.get(SPARSE)


def _csa_forward(self, hidden_states, q_residual, position_ids, cache=None, layer_idx=None):
    """`DeepseekV4CSACompressor.forward` under sparse attention: without a cache, the compressed entries and the
    indexer's picks, no dense block bias (the attention reads the picks). With a cache, the stock forward."""
    layer = sparse_layer(self)
    if cache is not None:
        compressed_kv, block_bias = type(self).forward(self, hidden_states, q_residual, position_ids, cache, layer_idx)
        layer.selection = _Dense(block_bias)
        return compressed_kv, block_bias
    samples = packed_samples(position_ids, hidden_states.shape[0])
    if samples is not None:
        positions = position_ids.expand(hidden_states.shape[0], -1)
        entries, picks = _packed_csa(self, hidden_states, q_residual, positions, samples, layer.chunk)
        layer.selection = TopKEntries(picks)
        return entries.unsqueeze(1), None
    compressed_kv = overlap_compress(self, hidden_states).unsqueeze(1)
    layer.selection = TopKEntries(indexer_topk(self.indexer, hidden_states, q_residual, position_ids, layer.chunk))
    return compressed_kv, None


def _hca_forward(self, hidden_states, q_residual, position_ids, cache=None, layer_idx=None):
    """`DeepseekV4HCACompressor.forward` under sparse attention: without a cache, the compressed entries
    (`hca_compress`, stock's arithmetic) and the per-query visible count, no dense block bias. With a cache, the
    stock forward."""
    layer = sparse_layer(self)
    if cache is not None:
        compressed_kv, block_bias = type(self).forward(self, hidden_states, q_residual, position_ids, cache, layer_idx)
        layer.selection = _Dense(block_bias)
        return compressed_kv, block_bias
    samples = packed_samples(position_ids, hidden_states.shape[0])
    if samples is not None:
        positions = position_ids.expand(hidden_states.shape[0], -1)
        entries, layer.selection = _packed_hca(self, hidden_states, positions, samples)
        return entries.unsqueeze(1), None
    compressed_kv = hca_compress(self, hidden_states).unsqueeze(1)
    layer.selection = CausalEntries(((position_ids + 1) // self.compress_rate).expand(hidden_states.shape[0], -1))
    return compressed_kv, None


_FORWARDS = {"DeepseekV4CSACompressor": _csa_forward, "DeepseekV4HCACompressor": _hca_forward}


def _sparse_forward(compressor: Any) -> Any:
    """The compressor's sparse forward, bound to it (an instance attribute: its class stays transformers')."""
    forward = next(f for name, f in _FORWARDS.items() if any(c.__name__ == name for c in type(compressor).__mro__))
    return types.MethodType(forward, compressor)


# ------------------------------------------------------------------------------------------------ attention


def attend_block(
    query: torch.Tensor,
    window: torch.Tensor,
    window_allowed: torch.Tensor,
    compressed: torch.Tensor | None,
    picks: torch.Tensor | None,
    compressed_allowed: torch.Tensor | None,
    sinks: torch.Tensor,
    scaling: float,
    dropout: float,
) -> torch.Tensor:
    """One block of queries `[B, H, C, D]` against its window keys `[B, 1, S, D]` (K = V), its compressed entries
    (`[B, T, D]`: all of them, or the `picks` `[B, C, k]` of each query gathered) and the sinks: stock eager's
    arithmetic (scores in the input dtype, scaled, promoted to fp32 beside the sinks, max subtracted, softmax, the
    sink dropped, probabilities cast back) on the keys a query may read. Returns `[B, H, C, D]`."""
    batch, heads, length, _ = query.shape
    parts = [(torch.matmul(query, window.transpose(-1, -2)) * scaling).masked_fill(~window_allowed, float("-inf"))]
    values = None
    if compressed is not None and picks is None:  # every entry, masked (HCA: causally; CSA: the picks)
        values = compressed.unsqueeze(1)  # [B, 1, T, D]
        scores = torch.matmul(query, values.transpose(-1, -2)) * scaling
        parts.append(scores.masked_fill(~compressed_allowed.unsqueeze(1), float("-inf")))
    elif compressed is not None:  # CSA: each query's own picks, gathered as an embedding lookup (its backward is
        # a dense scatter-add, ~4x faster on CPU than advanced indexing's index_put)
        entries = compressed.shape[1]
        rows = picks.clamp(min=0) + (torch.arange(batch, device=picks.device) * entries).view(-1, 1, 1)
        values = F.embedding(rows, compressed.reshape(batch * entries, -1))  # [B, C, k, D]
        scores = torch.matmul(query.transpose(1, 2), values.transpose(-1, -2)).transpose(1, 2) * scaling
        parts.append(scores.masked_fill(~compressed_allowed.unsqueeze(1), float("-inf")))
    sink = sinks.reshape(1, -1, 1, 1).expand(batch, -1, length, -1)
    logits = torch.cat([*parts, sink], dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    probs = F.softmax(logits, dim=-1, dtype=logits.dtype)[..., :-1]
    probs = F.dropout(probs, p=dropout, training=dropout > 0).to(window.dtype)
    work = torch.float32 if window.dtype in (torch.bfloat16, torch.float16) else window.dtype
    span = window.shape[-2]
    out = torch.matmul(probs[..., :span].to(work), window.to(work))
    if values is not None and picks is None:
        out = out + torch.matmul(probs[..., span:].to(work), values.to(work))
    elif values is not None:
        mixed = torch.matmul(probs[..., span:].transpose(1, 2).to(work), values.to(work))  # [B, C, H, D]
        out = out + mixed.transpose(1, 2)
    return out.to(window.dtype)


def sparse_attention_forward(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention interface of `hf_dsv4_sparse` (called by the stock `DeepseekV4Attention.forward`).

    Reads only the keys each query may see (its window, its compressed entries or CSA picks) where the layer's
    mask and selection allow it, else falls back to the stock eager arithmetic on a dense mask.

    Args:
        module: the `DeepseekV4Attention` (its `sinks`, and its `compressor` when the layer has one).
        query: `[B, H, L, D]` queries.
        key: `[B, 1, L + T, D]` window keys followed by the T compressed entries (K = V).
        value: the values (the same tensor as `key` on the sparse path).
        attention_mask: a `SparseMask` (the sparse path) or the stock mask (the dense fallback).
        scaling: the softmax scale.
        dropout: attention dropout probability.
        sliding_window: the layer's window; the sparse path needs the mask's own.

    Returns:
        (`[B, L, H, D]` attention output, None): the interface's (output, weights).
    """
    layer = sparse_layer(module) or SparseLayer()
    selection, cached = layer.take()
    if cached or not _sparse_applies(module, key, value, attention_mask, selection, sliding_window):
        return _dense_fallback(module, query, key, value, attention_mask, selection, scaling, dropout, **kwargs)
    differentiable = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad)
    if layer.kernel == "flex" and dropout == 0 and (query.is_cuda or not differentiable):
        return _flex_attention(module, query, key, attention_mask, selection, scaling), None
    chunked = _chunked_attention(
        module, query, key, attention_mask, selection, sliding_window, layer.chunk, scaling, dropout
    )
    return chunked, None


def _sparse_applies(module, key, value, attention_mask, selection, sliding_window) -> bool:
    """Whether the sparse path reads the same keys the stock mask allows: a sparse-capable `SparseMask` of this
    window, K = V, and a selection exactly when the layer compresses (a dense one means the stock block bias)."""
    return (
        isinstance(attention_mask, SparseMask)
        and attention_mask.sparse_ok
        and key is value
        and sliding_window is not None
        and attention_mask.local_size == sliding_window
        and (getattr(module, "compressor", None) is None) == (selection is None)
        and not isinstance(selection, _Dense)
    )


def _chunked_attention(
    module, query, key, attention_mask, selection, sliding_window, chunk, scaling, dropout
) -> torch.Tensor:
    """The sparse path in blocks of `chunk` queries, each against its window and compressed entries
    (`attend_block`), recomputed in backward when gradients are needed. Returns `[B, L, H, D]`."""
    seq_len = query.shape[2]
    window_len = chunk + sliding_window - 1
    n_chunks = -(-seq_len // chunk)
    # every chunk's window of keys, as views of one padded copy (backward: one unfold, no per-chunk full-size grads)
    padded = F.pad(key[:, :, :seq_len], (0, 0, sliding_window - 1, n_chunks * chunk - seq_len))
    windows = padded.unfold(2, window_len, chunk).transpose(-1, -2).unbind(2)  # n x [B, 1, S, D]
    compressed, picks, gather = _compressed_entries(key, seq_len, selection)
    compressed_len = compressed.shape[1] if compressed is not None else 0
    recompute = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, module.sinks))
    outputs = []
    for index, (q_chunk, window) in enumerate(zip(query.split(chunk, dim=2), windows, strict=False)):
        start, stop = index * chunk, index * chunk + q_chunk.shape[2]
        window_allowed = attention_mask.block(start, stop, start - sliding_window + 1, window_len)
        chunk_picks = comp_allowed = None
        if compressed is not None and picks is not None and gather:
            chunk_picks = picks[:, start:stop]
            comp_allowed = selection.allowed(start, stop)
        elif compressed is not None and picks is not None:  # few entries: all of them, the picks as a mask
            comp_allowed = selection.mask(start, stop, compressed_len)
        elif compressed is not None:
            comp_allowed = selection.allowed(start, stop, compressed_len)
        args = (q_chunk, window, window_allowed, compressed, chunk_picks, comp_allowed, module.sinks, scaling, dropout)
        if recompute:
            outputs.append(checkpoint(attend_block, *args, use_reentrant=False, preserve_rng_state=dropout > 0))
        else:
            outputs.append(attend_block(*args))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous()


def _compressed_entries(
    key: torch.Tensor, seq_len: int, selection: Any
) -> tuple[torch.Tensor | None, torch.Tensor | None, bool]:
    """(the compressed entries `[B, T, D]` or None when there are none to read, the CSA picks `[B, L, k]` or None,
    whether to gather each query's picks rather than read every entry with the picks as a mask)."""
    compressed = key[:, 0, seq_len:] if selection is not None else None  # [B, T, D]
    compressed_len = compressed.shape[1] if compressed is not None else 0
    picks = selection.indices if isinstance(selection, TopKEntries) else None
    if compressed_len == 0 or (picks is not None and picks.shape[-1] == 0):
        compressed = picks = None
    # CSA: gather each query's picks when they are a small part of the entries; else read every entry (one matmul)
    # with the picks as a mask: the same keys, fewer and larger matmuls
    gather = picks is not None and compressed_len > _GATHER_ABOVE * picks.shape[-1]
    return compressed, picks, gather


_FLEX: dict[bool, Any] = {}
# Triton tiles for a head_dim above 256 (Flash: 512): flex's default 64/128-row tiles of q, k and v in bf16 need more
# shared memory than an H100 / H200 has (228 KB per SM); 32-row tiles, one stage, need 96 KB. Not yet run on a GPU.
WIDE_HEAD_TILES = {"BLOCK_M": 32, "BLOCK_N": 32, "num_stages": 1, "BLOCK_M1": 16, "BLOCK_N1": 32, "BLOCK_M2": 32,
                   "BLOCK_N2": 16}  # fmt: skip


def _flex_kernel(compiled: bool) -> Any:
    """flex_attention, compiled on GPU (uncompiled it materializes the whole score matrix). Compiled with automatic
    dynamic shapes: a new sequence length recompiles once, then the lengths are symbolic (with `dynamic=False` every
    length recompiles, and past dynamo's recompile limit flex falls back to its unfused, dense-score path)."""
    if compiled not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX[compiled] = torch.compile(flex_attention) if compiled else flex_attention
    return _FLEX[compiled]


def flex_kernel_options(head_dim: int) -> dict[str, int] | None:
    """flex_attention's tile sizes for `head_dim`: its defaults up to 256, `WIDE_HEAD_TILES` above."""
    return dict(WIDE_HEAD_TILES) if head_dim > 256 else None


def flex_mask_mod(attention_mask: SparseMask, selection: Any, seq_len: int, compressed_len: int, device: Any) -> Any:
    """The block mask's `mask_mod` over [window keys | compressed entries]: transformers' mask function on the keys,
    the selection on the entries. The lengths are captured as tensors, not Python ints: compiled, an int would be a
    constant of the graph, so every new sequence length would recompile."""
    window = compat.mask_function_with_padding(attention_mask)
    picked = None
    if isinstance(selection, TopKEntries) and compressed_len:
        picked = selection.mask(0, seq_len, compressed_len)
    threshold = selection.threshold if isinstance(selection, CausalEntries) else None
    lower = selection.lower if isinstance(selection, CausalEntries) else None
    keys = torch.tensor(seq_len, device=device)
    last_entry = torch.tensor(max(compressed_len - 1, 0), device=device)

    def mask_mod(b, h, q, kv):
        in_window = (kv < keys) & window(b, h, q, torch.minimum(kv, keys - 1))
        entry = torch.minimum((kv - keys).clamp(min=0), last_entry)
        if picked is not None:
            return in_window | ((kv >= keys) & picked[b, q, entry])
        if threshold is not None and lower is not None:
            return in_window | ((kv >= keys) & (entry < threshold[b, q]) & (entry >= lower[b, q]))
        if threshold is not None:
            return in_window | ((kv >= keys) & (entry < threshold[b, q]))
        return in_window

    return mask_mod


def _flex_attention(module, query, key, attention_mask: SparseMask, selection, scaling) -> torch.Tensor:
    """The same attention through `torch.nn.attention.flex_attention` (a fused kernel on GPU): one block mask over
    [window keys | compressed entries] whose `mask_mod` is transformers' mask function on the keys and the
    selection on the entries (`flex_mask_mod`); the sinks applied afterwards from the log-sum-exp (`out *
    sigmoid(lse - sink)`, the softmax with the sink's column dropped). The CSA selection is a `[B, L, T]` boolean here
    (one byte per query and entry), built for the block mask; on GPU the block mask itself is built by a compiled
    function (block by block: uncompiled, `create_block_mask` evaluates a dense `[B, L, L + T]` mask first). Returns
    `[B, L, H, D]` like the portable path."""
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask

    batch, heads, seq_len, head_dim = query.shape
    compressed_len = key.shape[2] - seq_len
    mask_mod = flex_mask_mod(attention_mask, selection, seq_len, compressed_len, query.device)
    block_mask = create_block_mask(
        mask_mod, batch, None, seq_len, key.shape[2], device=query.device, _compile=query.is_cuda
    )
    try:
        out, aux = _flex_kernel(query.is_cuda)(
            query, key, key, block_mask=block_mask, scale=scaling, enable_gqa=key.shape[1] != heads,
            return_aux=AuxRequest(lse=True), kernel_options=flex_kernel_options(head_dim) if query.is_cuda else None,
        )  # fmt: skip
    except Exception as exc:  # Triton's and inductor's errors have no public type
        if "out of resource" not in str(exc).lower() and "shared memory" not in str(exc).lower():
            raise
        raise SparseAttentionError(
            f"kernel='flex' does not fit head_dim {head_dim} in this GPU's shared memory ({exc}); use the default "
            "kernel='portable'"
        ) from exc
    lse = aux.lse
    weight = torch.sigmoid(lse.float() - module.sinks.float().view(1, -1, 1))  # the sink's share taken out
    return (out.float() * weight.unsqueeze(-1)).to(query.dtype).transpose(1, 2).contiguous()


def _dense_fallback(module, query, key, value, attention_mask, selection, scaling, dropout, **kwargs):
    """Stock eager attention, with the mask stock would have built: the dense mask, extended over the compressed
    entries as `DeepseekV4Attention.forward` extends a tensor mask (the compressor's block bias, or zeros)."""
    if isinstance(attention_mask, SparseMask):
        attention_mask = attention_mask.dense(query.dtype)
        if attention_mask is not None and key.shape[2] > attention_mask.shape[-1]:
            bias = selection.block_bias if isinstance(selection, _Dense) else None
            if bias is not None:
                attention_mask = torch.cat([attention_mask, bias.to(attention_mask.dtype)], dim=-1)
            else:
                attention_mask = F.pad(attention_mask, (0, key.shape[2] - attention_mask.shape[-1]), value=0.0)
    if isinstance(selection, (TopKEntries, CausalEntries)) and attention_mask is not None:
        # a tensor mask (passed in 4-D) that the stock forward extended with zeros: the selection's bias instead
        compressed_len = key.shape[2] - query.shape[2]
        bias = selection.dense_bias(compressed_len, attention_mask.dtype)
        attention_mask = torch.cat([attention_mask[..., : key.shape[2] - compressed_len], bias], dim=-1)
    kwargs.pop("s_aux", None)
    return compat.dsv4_eager_attention_forward(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
    )


# ------------------------------------------------------------------------------------------------ switch


def _registered() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, sparse_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, _sparse_mask)


def modules_of(model: Any, class_name: str):
    """The modules of `model` whose class (or a base of it) is named `class_name` (transformers' class, or ours)."""
    for module in model.modules():
        if any(c.__name__ == class_name for c in type(module).__mro__):
            yield module


def _note_cache(module: Any, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of an attention module: with a cache (generation) the layer runs the stock way."""
    sparse_layer(module).cached = kwargs.get("cache", kwargs.get("past_key_values")) is not None


def _no_implicit_cache(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of `DeepseekV4Model`: a forward that asks for no cache (`use_cache` unset, no cache passed:
    training, evaluation) builds none. Stock builds one from `config.use_cache` even in training, and a layer with a
    cache must keep its compressor states: the dense path. `generate` and callers who want a cache pass
    `use_cache=True` (or a cache) and get the stock computation."""
    if kwargs.get("use_cache") is None and kwargs.get("cache", kwargs.get("past_key_values")) is None and len(args) < 4:
        kwargs["use_cache"] = False
    if kwargs.get("use_cache") is False and kwargs.get("cache", kwargs.get("past_key_values")) is None:
        _packed_rows_without_mask(kwargs)
    return args, kwargs


def _packed_rows_without_mask(kwargs: dict) -> None:
    """Packed rows (position ids restarting) keep each sample to itself only without a 2-D attention mask:
    transformers looks for packed samples only then (TRL's padding-free batches pass none). A mask of ones says
    nothing more and is dropped; one with padding in packed rows is refused."""
    mask, position_ids = kwargs.get("attention_mask"), kwargs.get("position_ids")
    if not (isinstance(mask, torch.Tensor) and mask.dim() == 2 and isinstance(position_ids, torch.Tensor)):
        return
    if packed_samples(position_ids, mask.shape[0]) is None:
        return
    if not bool(mask.all()):
        raise SparseAttentionError(
            "packed rows (position_ids restarting at 0) with padding in attention_mask: pass position_ids and no "
            "attention_mask (TRL's padding-free batches), padding positions restarting at 0 as their own samples"
        )
    kwargs["attention_mask"] = None


KERNELS = ("portable", "flex")


def enable_sparse_attention(model: Any, chunk_size: int = DEFAULT_CHUNK_SIZE, kernel: str = "portable") -> Any:
    """Make every DeepSeek-V4 attention layer of `model` (a transformers model, a `PeftModel`, FSDP2-sharded or not)
    compute stock's attention with memory linear in the sequence length. In place and idempotent (a second call
    only changes `chunk_size`); returns `model`.

    `chunk_size`: queries per block (each block reads `chunk_size + sliding_window - 1` window keys). Larger blocks
    are faster and take more transient memory. `kernel="flex"`: `torch.nn.attention.flex_attention` with a block mask
    instead of the portable blocks, on CUDA (and on CPU without gradients: torch has no flex backward on CPU); with
    attention dropout, the portable path.

    Args:
        model: a transformers model, a `PeftModel`, FSDP2-sharded or not.
        chunk_size: queries per block.
        kernel: "portable" (any device) or "flex".

    Returns:
        `model`, changed in place.

    Raises:
        SparseAttentionError: a model without DeepSeek-V4 attention, a bad `chunk_size` or `kernel`.
        hf_dsv4.compat.UpstreamCompatError: the installed transformers changed what is replaced."""
    if chunk_size < 1:
        raise SparseAttentionError(f"chunk_size must be positive, got {chunk_size}")
    if kernel not in KERNELS:
        raise SparseAttentionError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    compat.require("transformers.attention")
    attentions = list(modules_of(model, "DeepseekV4Attention"))
    if not attentions:
        raise SparseAttentionError(f"{type(model).__name__} has no DeepSeek-V4 attention layer (DeepseekV4Attention)")
    _registered()
    for decoder in modules_of(model, "DeepseekV4Model"):
        if SPARSE not in decoder.__dict__:
            decoder.register_forward_pre_hook(_no_implicit_cache, with_kwargs=True)
            decoder.__dict__[SPARSE] = True
    for attention in attentions:
        layer = sparse_layer(attention)
        if layer is None:
            layer = attention.__dict__[SPARSE] = SparseLayer()
            attention.register_forward_pre_hook(_note_cache, with_kwargs=True)
            if attention.compressor is not None:
                attention.compressor.__dict__[SPARSE] = layer
                attention.compressor.forward = _sparse_forward(attention.compressor)
        layer.chunk, layer.kernel = chunk_size, kernel
        attention.config._attn_implementation = IMPLEMENTATION
    for config in {id(a.config): a.config for a in attentions}.values():
        config._attn_implementation = IMPLEMENTATION
    logger.info(
        "sparse attention on %d DeepSeek-V4 attention layers (chunks of %d queries)", len(attentions), chunk_size
    )
    return model


def sparse_attention_enabled(model: Any) -> bool:
    """Whether `enable_sparse_attention` was applied to `model`.

    Args:
        model: any module.

    Returns:
        True when `model` has DeepSeek-V4 attention layers and every one uses the sparse implementation.
    """
    attentions = list(modules_of(model, "DeepseekV4Attention"))
    return bool(attentions) and all(a.config._attn_implementation == IMPLEMENTATION for a in attentions)
