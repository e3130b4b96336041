"""Context parallelism for DeepSeek-V4: one sequence split across ranks, each holding a contiguous chunk.

Everything in a DeepSeek-V4 layer but the attention works per token (norms, hyper-connections, MoE, the LM head), so
a rank runs the model on its chunk alone (`input_ids` and `position_ids` of its tokens, positions global). What a
token's attention reads from earlier tokens is small: the previous `sliding_window - 1` keys, and the compressed
entries of all earlier tokens (1 per 4 tokens for CSA, 1 per 128 for HCA) with the indexer's compressed keys. So
under `enable_context_parallel` each attention layer

- receives from the ranks before it the last `halo` hidden states before its chunk (`halo = max(window - 1,
  2 m_CSA - 1, m_HCA - 1)`: 127 tokens for Flash), a differentiable all-gather of every rank's tail, and recomputes
  their keys and the compressor inputs it needs (a compressed block that straddles two ranks is compressed, from the
  right tokens, by the rank that holds its last token; a CSA block's overlap reads the block before it);
- computes the compressed entries of the blocks that end in its chunk, with their global positions, and all-gathers
  every rank's entries (differentiable: their gradients are summed back to the rank that made them) and the
  indexer's compressed keys (no gradient: stock's top-k has none);
- attends its queries to its window keys (halo included), the indexer's top-k of all earlier CSA entries (each
  query's own picks) or the causal HCA entries, and the sinks: `sparse_attention`'s blocks, op for op.

Parameters' gradients are each rank's share: summed over the context-parallel ranks (an all-reduce, or FSDP2's
reduction over a mesh that includes them) they are the gradients of the whole sequence's loss. Training only (no
cache), no padding mask; a packed row (samples one after the other, positions restarting at 0) is split as one
sequence, each sample kept apart as in `sparse_attention`'s packed rows (its window, its own compressed blocks aligned
to its start, its indexer's picks among its own entries), given the row's samples (`chunk_inputs` hands them in).
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .. import compat
from .sparse_attention import (
    CausalEntries,
    SparseAttentionError,
    TopKEntries,
    attend_block,
    hca_compress,
    indexer_topk,
    modules_of,
    overlap_compress,
    packed_samples,
    sparse_attention_enabled,
    sparse_layer,
)

BOUNDS = "context_parallel_bounds"  # the model keyword `chunk_inputs` adds: every rank's [start, stop)
SAMPLES = "context_parallel_samples"  # and for a packed row: its samples' [start, stop) in the row


@dataclass
class ContextParallel:
    """A layer's context-parallel setting: the ranks that share a sequence, and the model's rotary embedding (for
    the halo's keys).

    Args:
        group: the process group whose ranks share each sequence (`world` and `rank` are read from it).
        rotary: the decoder's rotary embedding module, called for the positions of the halo's keys.
    """

    group: Any
    rotary: Any

    @property
    def world(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)


def chunk_bounds(length: int, world: int) -> list[tuple[int, int]]:
    """Each rank's contiguous `[start, stop)` of a sequence of `length` tokens: as equal as can be, the first
    `length % world` ranks one token longer.

    Args:
        length: the sequence's number of tokens.
        world: the number of ranks.

    Returns:
        One `(start, stop)` per rank, in rank order.
    """
    base, extra = divmod(length, world)
    bounds, start = [], 0
    for rank in range(world):
        stop = start + base + (rank < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


def _gather(tensor: torch.Tensor, group: Any) -> list[torch.Tensor]:
    """Every rank's `tensor` (the same shape on every rank), in rank order; no gradient."""
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, tensor.contiguous(), group=group)
    return out


class _AllRows(torch.autograd.Function):
    """Every rank's rows `[B, n_r, D]` (`n_r = counts[r]`, known to all ranks) concatenated in rank order; backward:
    each rank's rows get the gradients every rank computed for them (an all-reduce of the whole gradient, then its
    own slice). A custom function rather than torch's differentiable all-gather: its output is one tensor that every
    rank uses, so every rank runs its backward (torch's returns one tensor per rank, and a rank that uses none of
    them would skip the collective the others wait in)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, counts: list[int], group: Any) -> torch.Tensor:
        ctx.counts, ctx.group, ctx.rank = counts, group, dist.get_rank(group)
        padded = F.pad(rows, (0, 0, 0, max(counts) - rows.shape[1]))
        parts = _gather(padded, group)
        return torch.cat([part[:, :count] for part, count in zip(parts, counts, strict=True)], dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        start = sum(ctx.counts[: ctx.rank])
        return grad[:, start : start + ctx.counts[ctx.rank]], None, None


def _all_rows(rows: torch.Tensor, counts: list[int], group: Any) -> torch.Tensor:
    """`_AllRows`; with gradients enabled, differentiable on every rank alike (a rank whose chunk makes no entry has
    rows that require no grad, and would skip the backward collective the other ranks wait in)."""
    if torch.is_grad_enabled() and not rows.requires_grad:
        rows = rows.detach().requires_grad_()
    return _AllRows.apply(rows, counts, group)


def _halo(hidden: torch.Tensor, bounds: list[tuple[int, int]], rank: int, size: int, group: Any) -> torch.Tensor:
    """The `size` hidden states before this rank's chunk (fewer at the start of the sequence), gathered from the
    ranks that hold them: every rank sends its last `size` rows (or all of them, when fewer)."""
    counts = [min(size, stop - start) for start, stop in bounds]
    tails = _all_rows(hidden[:, hidden.shape[1] - counts[rank] :], counts, group)
    end = sum(counts[:rank])
    return tails[:, max(end - size, 0) : end]


def _gather_entries(entries: torch.Tensor, counts: list[int], group: Any) -> torch.Tensor:
    """Every rank's compressed entries `[B, n_r, D]`, concatenated in rank order (sequence order)."""
    return _all_rows(entries, counts, group)


def _own_entries(compress, module: Any, ext: torch.Tensor, ext_start: int, start: int, stop: int, overlap: bool):
    """The compressed entries of the blocks that end in `[start, stop)`, from `ext` (the hidden states from global
    position `ext_start`); with `overlap` (CSA) a block also reads the one before it, so `ext` starts a block
    earlier and that block's entry (made without its own predecessor) is dropped."""
    ratio = module.compress_rate
    first = (start // ratio - (1 if overlap else 0)) * ratio
    first = max(first, 0)
    entries = compress(module, ext[:, first - ext_start : stop - ext_start], first)
    return entries[:, start // ratio - first // ratio :]


def _cp_attention_forward(self, hidden_states, position_embeddings, position_ids, attention_mask, cache=None, **kw):
    """`DeepseekV4Attention.forward` on this rank's chunk of the sequence (see the module docstring)."""
    if cache is not None:
        raise SparseAttentionError("context parallelism trains without a cache (generation runs on one rank)")
    layer = sparse_layer(self)
    cp: ContextParallel = layer.context_parallel
    bounds = _chunk_bounds(cp, position_ids, hidden_states.shape[1], kw.get(BOUNDS))
    start, stop = bounds[cp.rank]
    samples = [(int(a), int(b)) for a, b in kw.get(SAMPLES) or [(0, bounds[-1][1])]]
    cos, sin = position_embeddings[self.rope_layer_type]
    shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    q_residual = self.q_a_norm(self.q_a_proj(hidden_states))
    q = compat.dsv4_apply_rotary_pos_emb(
        self.q_b_norm(self.q_b_proj(q_residual).view(*shape).transpose(1, 2)), cos, sin
    )
    halo_size = _halo_size(self)
    ext = torch.cat([_halo(hidden_states, bounds, cp.rank, halo_size, cp.group), hidden_states], dim=1)
    ext_start = stop - ext.shape[1]
    ext_positions, segments = _positions_in_samples(samples, ext_start, stop, ext.device)
    ext_cos, ext_sin = cp.rotary(
        ext, position_ids=ext_positions.expand(ext.shape[0], -1), layer_type=self.rope_layer_type
    )
    kv = self.kv_norm(self.kv_proj(ext)).view(ext.shape[0], ext.shape[1], -1, self.head_dim).transpose(1, 2)
    kv = compat.dsv4_apply_rotary_pos_emb(kv, ext_cos, ext_sin)
    compressed, selection = _compressed(
        self, ext, ext_start, q_residual, position_ids, bounds, samples, cp, layer.chunk
    )
    segments = segments if len(samples) > 1 else None
    out = _attend(self, q, kv, ext_start, start, compressed, selection, layer.chunk, segments)
    out = compat.dsv4_apply_rotary_pos_emb(out.transpose(1, 2), cos, -sin).transpose(1, 2)
    grouped = out.reshape(*hidden_states.shape[:-1], self.config.o_groups, -1)
    return self.o_b_proj(self.o_a_proj(grouped).flatten(2)), None


def _chunk_bounds(cp: ContextParallel, position_ids, length: int, given: Any) -> list[tuple[int, int]]:
    """Every rank's `[start, stop)` in the sequence: as `chunk_inputs` handed them to the model (`BOUNDS`), else
    all-gathered from each rank's first position and length (a collective per layer, and data-dependent: a traced
    model needs them handed in)."""
    if given is None:
        start = int(position_ids[0, 0])
        here = torch.tensor([start, start + length], device=position_ids.device)
        return [(int(a), int(b)) for a, b in _gather(here, cp.group)]
    bounds = [(int(a), int(b)) for a, b in given]
    if len(bounds) != cp.world or bounds[cp.rank][1] - bounds[cp.rank][0] != length:
        raise SparseAttentionError(
            f"rank {cp.rank} of {cp.world} context-parallel ranks got {length} tokens, but the chunk bounds handed "
            f"in ({BOUNDS}={bounds}) say otherwise: make each rank's batch with chunk_inputs(batch, rank, world)"
        )
    return bounds


def _positions_in_samples(samples, lo: int, hi: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """For the row's tokens `[lo, hi)`: each one's position in its own sample (the rope's) and its sample's index,
    `[1, hi - lo]` each."""
    positions, segments = [], []
    for index, (first, last) in enumerate(samples):
        a, b = max(lo, first), min(hi, last)
        if a < b:
            positions.append(torch.arange(a - first, b - first, device=device))
            segments.append(torch.full((b - a,), index, device=device))
    return torch.cat(positions)[None], torch.cat(segments)[None]


def _block_count(bounds: tuple[int, int], samples, ratio: int) -> int:
    """How many compressed blocks (aligned to each sample's start, whole within it) end in the chunk `bounds`."""
    start, stop = bounds
    count = 0
    for first, last in samples:
        a, b = max(start, first), min(stop, last)
        if a < b:
            count += (b - first) // ratio - (a - first) // ratio
    return count


def _halo_size(attention: Any) -> int:
    size = attention.sliding_window - 1
    compressor = attention.compressor
    if compressor is not None:  # a CSA block also reads the block before it
        size = max(size, (2 if hasattr(compressor, "indexer") else 1) * compressor.compress_rate - 1)
    return size


def _compressed(attention, ext, ext_start, q_residual, position_ids, bounds, samples, cp, chunk):
    """(every rank's compressed entries `[B, T, D]`, the selection) of a CSA / HCA layer; (None, None) for a
    sliding-window layer. Each sample of the row is compressed from its own tokens (blocks aligned to its start), and
    its queries see its own entries only; every rank's entries are gathered in row order, sample after sample."""
    compressor = attention.compressor
    if compressor is None:
        return None, None
    start, stop = bounds[cp.rank]
    ratio, csa = compressor.compress_rate, hasattr(compressor, "indexer")
    compress = overlap_compress if csa else hca_compress
    counts = [_block_count(chunk_bounds, samples, ratio) for chunk_bounds in bounds]
    offsets = [0]
    for first, last in samples:  # each sample's first entry in the row's list
        offsets.append(offsets[-1] + (last - first) // ratio)
    own = [(index, first, max(start, first), min(stop, last)) for index, (first, last) in enumerate(samples)]
    own = [piece for piece in own if piece[2] < piece[3]]  # the samples with tokens in this chunk, in order

    def made(module, source):  # this chunk's entries of `module`, sample after sample
        parts = []
        for _, first, a, b in own:
            lo = max(ext_start, first)
            piece = source[:, lo - ext_start : b - ext_start]
            parts.append(_own_entries(compress, module, piece, lo - first, a - first, b - first, overlap=csa))
        return torch.cat(parts, dim=1)

    entries = _gather_entries(made(compressor, ext), counts, cp.group)
    if not csa:
        lower, upper = torch.zeros_like(position_ids), torch.zeros_like(position_ids)
        for index, _, a, b in own:
            lower[:, a - start : b - start], upper[:, a - start : b - start] = offsets[index], offsets[index + 1]
        threshold = torch.minimum(lower + (position_ids + 1) // ratio, upper)
        return entries, CausalEntries(threshold.expand(ext.shape[0], -1), lower.expand(ext.shape[0], -1))
    indexer = compressor.indexer
    with torch.no_grad():
        keys = _gather_entries(made(indexer, ext.detach()), counts, cp.group)
    picks = []
    for index, _, a, b in own:  # each sample's queries pick among its own entries
        here = slice(a - start, b - start)
        chosen = indexer_topk(
            indexer, ext[:, a - ext_start : b - ext_start], q_residual[:, here],
            position_ids[:, here].expand(ext.shape[0], -1), chunk, compressed=keys[:, offsets[index] : offsets[index + 1]],
        )  # fmt: skip
        picks.append(torch.where(chosen >= 0, chosen + offsets[index], chosen))
    width = max(p.shape[-1] for p in picks)
    return entries, TopKEntries(torch.cat([F.pad(p, (0, width - p.shape[-1]), value=-1) for p in picks], dim=1))


def _attend(attention, query, kv, ext_start, start, compressed, selection, chunk, segments=None):
    """`sparse_attention_forward`'s blocks for this rank's queries (row positions from `start`) against the window
    keys `kv` (row positions from `ext_start`) and every rank's compressed entries; with `segments` (`[1, ext]`, the
    sample of each key: a packed row), a query's window holds its own sample's keys only. `[B, L, H, D]`."""
    batch, heads, length, _ = query.shape
    window = attention.sliding_window
    compressed_len = compressed.shape[1] if compressed is not None else 0
    picks = selection.indices if isinstance(selection, TopKEntries) else None
    if compressed_len == 0 or (picks is not None and picks.shape[-1] == 0):
        compressed = picks = None
    recompute = torch.is_grad_enabled() and any(t.requires_grad for t in (query, kv, attention.sinks))
    dropout = attention.attention_dropout if attention.training else 0.0
    outputs = []
    for q_start in range(0, length, chunk):
        q_stop = min(q_start + chunk, length)
        first_key = max(start + q_start - window + 1, ext_start)  # global
        keys = kv[:, :, first_key - ext_start : start + q_stop - ext_start]
        query_pos = torch.arange(start + q_start, start + q_stop, device=query.device).view(-1, 1)
        key_pos = torch.arange(first_key, start + q_stop, device=query.device).view(1, -1)
        allowed = (key_pos <= query_pos) & (key_pos > query_pos - window)
        if segments is not None:
            own = segments[0, first_key - ext_start : start + q_stop - ext_start]
            allowed = allowed & (
                own.view(1, -1) == segments[0, start + q_start - ext_start : start + q_stop - ext_start, None]
            )
        allowed = allowed.expand(batch, 1, -1, -1)
        chunk_picks = comp_allowed = None
        if compressed is not None and picks is not None:
            chunk_picks, comp_allowed = picks[:, q_start:q_stop], selection.allowed(q_start, q_stop)
        elif compressed is not None:
            comp_allowed = selection.allowed(q_start, q_stop, compressed_len)
        args = (query[:, :, q_start:q_stop], keys, allowed, compressed, chunk_picks, comp_allowed, attention.sinks,
                attention.scaling, dropout)  # fmt: skip
        if recompute:
            outputs.append(checkpoint(attend_block, *args, use_reentrant=False, preserve_rng_state=dropout > 0))
        else:
            outputs.append(attend_block(*args))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous()


def enable_context_parallel(model: Any, group: Any = None) -> Any:
    """Split each sequence across the ranks of `group` (default: the world): every rank runs `model` on its own
    contiguous chunk of the sequence (`input_ids` / `position_ids` from `chunk_bounds`, positions global) and each
    DeepSeek-V4 attention layer reads what it needs from the other ranks (see the module docstring). The model must
    be under `enable_sparse_attention` first. In place; returns `model`.

    Args:
        model: a DeepSeek-V4 model (a PeftModel, FSDP2-sharded or not) under sparse attention.
        group: the ranks that share one sequence.

    Returns:
        `model`.

    Raises:
        SparseAttentionError: the model is not under sparse attention, or torch.distributed is not initialized."""
    if not dist.is_initialized():
        raise SparseAttentionError("context parallelism needs torch.distributed initialized (one process per rank)")
    if not sparse_attention_enabled(model):
        raise SparseAttentionError("enable_context_parallel needs enable_sparse_attention(model) first")
    decoder = next(modules_of(model, "DeepseekV4Model"))
    for attention in modules_of(model, "DeepseekV4Attention"):
        sparse_layer(attention).context_parallel = ContextParallel(group, decoder.rotary_emb)
        attention.forward = types.MethodType(_cp_attention_forward, attention)
    return model


def chunk_inputs(inputs: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    """This rank's share of a batch of whole sequences, or of one packed row, under context parallelism: its
    contiguous chunk (`chunk_bounds`) of `input_ids`, `labels`, `shift_labels` (the labels shifted before the split,
    so the last token of a chunk is trained on the first of the next) and `position_ids` (made if absent; in a
    packed row, each sample's own, restarting at 0).

    Args:
        inputs: a batch (`input_ids` `[B, L]`, optionally `labels`, `attention_mask`, `position_ids`).
        rank: this rank's index in the context-parallel group.
        world: the group's size.

    Returns:
        The chunked batch, without `attention_mask`, with every rank's `[start, stop)` under
        `"context_parallel_bounds"` and a packed row's samples under `"context_parallel_samples"` (model keywords
        that transformers hands to each attention layer: the layers need no collective to learn them, and a packed
        row's layers need them to keep its samples apart).

    Raises:
        SparseAttentionError: padding in `attention_mask`, several packed rows, or fewer tokens than ranks."""
    ids = inputs["input_ids"]
    batch, length = ids.shape
    mask = inputs.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        raise SparseAttentionError(
            "context parallelism trains whole sequences: this batch is padded (per_device_train_batch_size 1, or "
            "rows of one length)"
        )
    positions = inputs.get("position_ids")
    samples = None if positions is None else packed_samples(positions, batch)
    if samples is not None and batch > 1:
        raise SparseAttentionError(
            f"context parallelism splits one packed row at a time, not {batch}: pack with padding-free batches "
            "(TRL's --padding_free / --packing put a batch's samples in one row)"
        )
    if length < world:
        raise SparseAttentionError(f"a sequence of {length} tokens cannot be split over {world} ranks")
    out = {key: value for key, value in inputs.items() if key != "attention_mask"}
    if "labels" in out and "shift_labels" not in out:
        out["shift_labels"] = F.pad(out["labels"], (0, 1), value=-100)[:, 1:]
    if positions is None:
        out["position_ids"] = torch.arange(length, device=ids.device).expand(batch, -1)
    bounds = chunk_bounds(length, world)
    out[BOUNDS] = tuple(bounds)
    if samples is not None:
        out[SAMPLES] = tuple(samples[0])
    start, stop = bounds[rank]
    for key in ("input_ids", "labels", "shift_labels", "position_ids"):
        if key in out:
            out[key] = out[key][:, start:stop]
    return out
