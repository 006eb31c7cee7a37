"""The reference executor for hybrid models (attention and recurrent layers) on HF transformers, pure torch.

A recurrent layer's state depends on its whole left context, so for these models only an exact prefix can be
reused, and only from a point where the state was stored. A cached sequence keeps its attention K/V whole and its
recurrent state (each recurrent layer's conv window and SSM / delta-rule state) only at checkpoints, placed by
``core.checkpoints``. A prefill resumes from the deepest checkpoint inside its exact prefix hit: the attention
K/V cut to that offset and the states stored there; every later token runs through all layers, exactly.

HF transformers 5 keeps both kinds of state in a ``DynamicCache`` built from the model's config: one layer per
``config.layer_types`` entry, ``DynamicLayer`` for attention, ``LinearAttentionLayer`` for Gated DeltaNet and
Mamba2 (NemotronH's MLP layers get an empty one). Positions and the causal mask follow the attention K/V
length, so the K/V must be cut exactly at the checkpoint, and a restored recurrent layer must say it has a
previous state, or it starts from zero (both checked in tests/test_hybrid_reference.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import LinearAttentionCacheLayerMixin


@dataclass(frozen=True)
class StateCheckpoint:
    """Every recurrent layer's state after ``offset`` tokens: ``layers[i] = (conv window, state, kernel size)``."""

    offset: int
    layers: dict[int, tuple[torch.Tensor, torch.Tensor, int]]

    @property
    def nbytes(self) -> int:
        return sum(conv.nbytes + state.nbytes for conv, state, _ in self.layers.values())


@dataclass
class CachedSequence:
    token_ids: tuple[int, ...]
    keys_values: dict[int, tuple[torch.Tensor, torch.Tensor]]
    """Each attention layer's K and V over the whole sequence, ``[1, kv_heads, n, head_dim]``."""
    checkpoints: dict[int, StateCheckpoint] = field(default_factory=dict)


@dataclass(frozen=True)
class HybridPrefill:
    logits: torch.Tensor
    """``[n - resumed_from, vocab]``: the logits of the positions computed."""
    resumed_from: int
    """Tokens taken from the cache (0: nothing)."""


def _layers(cache: DynamicCache) -> list[Any]:
    """The cache's layers, attention or recurrent (their attributes differ by kind: HF types them as a union)."""
    return list(cache.layers)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class HybridPrefixCache:
    """Exact prefix reuse for one HF hybrid model, resumed from stored recurrent-state checkpoints."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.sequences: list[CachedSequence] = []

    def lookup(self, ids: Sequence[int]) -> tuple[CachedSequence | None, int]:
        """The cached sequence and checkpoint to resume ``ids`` from: the deepest checkpoint within an exact
        prefix hit, short of the last token (whose logits the request needs)."""
        best: tuple[CachedSequence | None, int] = (None, 0)
        for sequence in self.sequences:
            hit = min(_common_prefix(sequence.token_ids, ids), len(ids) - 1)
            offsets = [c for c in sequence.checkpoints if c <= hit]
            if offsets and max(offsets) > best[1]:
                best = (sequence, max(offsets))
        return best

    @torch.no_grad()
    def prefill(self, ids: Sequence[int], checkpoints: Sequence[int] = ()) -> HybridPrefill:
        """Prefill ``ids`` from the best stored checkpoint, keep states at ``checkpoints`` (offsets; those at or
        below the resume point are the source's) and cache the sequence."""
        sequence, offset = self.lookup(ids)
        return self.resume(ids, sequence, offset, checkpoints)

    @torch.no_grad()
    def resume(self, ids: Sequence[int], sequence: CachedSequence | None, offset: int,
               checkpoints: Sequence[int] = ()) -> HybridPrefill:
        """Prefill ``ids`` from ``sequence``'s checkpoint at ``offset`` (0 and None: from nothing), in pieces
        ending at the new checkpoints, whose states are copied as the prefill passes them."""
        n = len(ids)
        if not 0 <= offset < n or (offset and (sequence is None or offset not in sequence.checkpoints
                                                or _common_prefix(sequence.token_ids, ids) < offset)):
            raise ValueError(f"no stored state of this prefix at offset {offset}")
        cache = DynamicCache(config=self.model.config)
        kept: dict[int, StateCheckpoint] = {}
        if sequence is not None and offset:
            self._restore(cache, sequence, offset)
            kept = {c: s for c, s in sequence.checkpoints.items() if c <= offset}
        tensor = torch.tensor([list(ids)], dtype=torch.long)
        ends = sorted({c for c in checkpoints if offset < c < n} | {n})
        logits, start = [], offset
        for end in ends:
            logits.append(self.model(input_ids=tensor[:, start:end], past_key_values=cache, use_cache=True).logits[0])
            if end in checkpoints:
                kept[end] = self._state(cache, end)
            start = end
        keys_values = {i: (layer.keys.clone(), layer.values.clone()) for i, layer in enumerate(_layers(cache))
                       if not isinstance(layer, LinearAttentionCacheLayerMixin) and layer.is_initialized}
        self.sequences.append(CachedSequence(tuple(ids), keys_values, kept))
        return HybridPrefill(torch.cat(logits), offset)

    @staticmethod
    def _state(cache: DynamicCache, offset: int) -> StateCheckpoint:
        layers: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
        for i, layer in enumerate(_layers(cache)):
            recurrent: Any = layer  # HF types the state dicts as optional
            if isinstance(layer, LinearAttentionCacheLayerMixin) and recurrent.is_conv_states_initialized[0]:
                layers[i] = (recurrent.conv_states[0].clone(), recurrent.recurrent_states[0].clone(),
                             int(recurrent.conv_kernel_size[0]))
        return StateCheckpoint(offset, layers)

    @staticmethod
    def _restore(cache: DynamicCache, sequence: CachedSequence, offset: int) -> None:
        state = sequence.checkpoints[offset]
        for i, layer in enumerate(_layers(cache)):
            if i in state.layers:
                conv, recurrent, kernel = state.layers[i]
                layer.lazy_initialization(conv_states=conv, recurrent_states=recurrent, conv_kernel_size=kernel)
                layer.conv_states[0].copy_(conv)
                layer.recurrent_states[0].copy_(recurrent)
                layer.has_previous_state[0] = True  # else the layer starts the next forward from a zero state
            elif i in sequence.keys_values:
                keys, values = sequence.keys_values[i]
                layer.update(keys[..., :offset, :].clone(), values[..., :offset, :].clone())
        assert cache.get_seq_length() == offset, "positions follow the attention K/V length"
