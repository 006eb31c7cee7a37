"""The reference executor for hybrid models (attention and recurrent layers) on HF transformers, pure torch.

A recurrent layer's state depends on its whole left context, so for these models only an exact prefix can be
reused, and only from a point where the state was stored. The cache is the server's: a ``SegmentGraph`` over
the prompt cut into 64-token blocks holds the attention K/V of every cached path whole, and ``StateCheckpoints``
keeps each recurrent layer's conv window and SSM / delta-rule state at the offsets its placement chooses. A
prefill resumes from the deepest state inside its exact prefix hit: the attention K/V up to that offset and the
states stored there; every later token runs through all layers, exactly.

HF transformers 5 keeps both kinds of state in a ``DynamicCache`` built from the model's config: one layer per
``config.layer_types`` entry, ``DynamicLayer`` for attention, ``LinearAttentionLayer`` for Gated DeltaNet and
Mamba2 (NemotronH's MLP layers get an empty one). Positions and the causal mask follow the attention K/V
length, so the K/V must be cut exactly at the checkpoint, and a restored recurrent layer must say it has a
previous state, or it starts from zero (both checked in tests/test_hybrid_reference.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import LinearAttentionCacheLayerMixin

from sparsex_sgl.core.checkpoints import BIN
from sparsex_sgl.core.graph import SegmentGraph
from sparsex_sgl.core.segments import SHARED, NamespaceKey, Piece, make_piece, namespace_key, split_into_pieces
from sparsex_sgl.core.states import StateCheckpoints
from sparsex_sgl.reference.pool import FreeListAllocator, TensorKVPool


@dataclass(frozen=True)
class RecurrentState:
    """Every recurrent layer's state after some prefix: ``layers[i] = (conv window, state, kernel size)``."""

    layers: dict[int, tuple[torch.Tensor, torch.Tensor, int]]

    @property
    def nbytes(self) -> int:
        return sum(conv.nbytes + state.nbytes for conv, state, _ in self.layers.values())


@dataclass(frozen=True)
class HybridPrefill:
    logits: torch.Tensor
    """``[n - resumed_from, vocab]``: the logits of the positions computed."""
    resumed_from: int
    """Tokens taken from the cache (0: nothing)."""
    captured: tuple[int, ...]
    """The offsets whose state the prefill kept."""


def tiny_model(kind: str, seed: int = 0) -> Any:
    """A tiny randomly initialised hybrid, float32: ``qwen3_5`` (three Gated DeltaNet layers and one attention
    layer) or ``nemotron_h`` (``M-M*``: Mamba2, MLP, Mamba2, attention); vocabulary 256, hidden size 64."""
    import transformers

    hf: Any = transformers  # the configs take their model-specific fields as keyword arguments HF does not type
    torch.manual_seed(seed)
    if kind == "qwen3_5":
        config = hf.Qwen3_5TextConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            layer_types=["linear_attention"] * 3 + ["full_attention"], num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
            linear_num_key_heads=2, linear_num_value_heads=4, max_position_embeddings=32768)
        return hf.Qwen3_5ForCausalLM(config).float().eval()
    if kind != "nemotron_h":
        raise ValueError(f"unknown tiny hybrid {kind!r} (qwen3_5, nemotron_h)")
    config = hf.NemotronHConfig(
        vocab_size=256, hidden_size=64, hybrid_override_pattern="M-M*", num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=128, mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=2,
        conv_kernel=4, expand=2, chunk_size=64, max_position_embeddings=32768)
    return hf.NemotronHForCausalLM(config).float().eval()


def _layers(cache: DynamicCache) -> list[Any]:
    """The cache's layers, attention or recurrent (their attributes differ by kind: HF types them as a union)."""
    return list(cache.layers)


class HybridPrefixCache:
    """Exact prefix reuse for one HF hybrid model: the segment graph's KV and recurrent-state checkpoints."""

    def __init__(self, model: Any, num_slots: int = 4096, max_states: int = 64, per_sequence: int = 16,
                 resolve_every: int = 1) -> None:
        config = model.config
        self.model = model
        self.attention_layers = [i for i, kind in enumerate(config.layer_types) if kind == "full_attention"]
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.pool = TensorKVPool(len(self.attention_layers), num_slots, config.num_key_value_heads, head_dim)
        self.graph = SegmentGraph(self.pool.allocator, num_slots - 1)
        self.stored: dict[int, RecurrentState] = {}
        """State slot -> the states it holds (the reference's state pool)."""
        self.states = StateCheckpoints(self.graph, _StatePool(self.stored, max_states + 1), max_states,
                                       per_sequence, resolve_every)

    def pieces(self, ids: Sequence[int], namespace: NamespaceKey) -> list[Piece]:
        """The prompt in 64-token blocks, re-cut along the cached paths: no segment is reusable elsewhere."""
        pieces = split_into_pieces(ids, [], namespace, BIN)
        return self.graph.align(pieces, lambda start, end: make_piece(ids, start, end, namespace, reusable=False))

    @torch.no_grad()
    def prefill(self, ids: Sequence[int], tenant: str = "", capture: Sequence[int] | None = None) -> HybridPrefill:
        """Prefill ``ids`` from the deepest stored state of its exact prefix, capture states where the placement
        says (or at ``capture``: offsets, a test's or a replay's choice) and cache the path."""
        namespace = namespace_key(tenant) if tenant else SHARED
        n = len(ids)
        pieces = self.pieces(ids, namespace)
        resume = self.states.resume(self.graph.lookup(pieces), namespace)
        offset = resume.offset
        self.graph.lock(resume.lookup.node_ids)
        try:
            cache = DynamicCache(config=self.model.config)
            if resume.state_slot is not None:
                self._restore(cache, resume.lookup.prefix_slots, self.stored[resume.state_slot])
            wanted = self.states.plan(namespace, offset, n) if capture is None else \
                tuple(c for c in capture if offset < c <= n)
            slots = self.states.alloc(len(wanted)) if wanted else []
            captured = dict(zip(wanted, slots or []))
            tensor = torch.tensor([list(ids)], dtype=torch.long)
            logits, start = [], offset
            for end in sorted(set(captured) | {n}):
                if end > start:
                    logits.append(self.model(input_ids=tensor[:, start:end], past_key_values=cache,
                                             use_cache=True).logits[0])
                if end in captured:
                    self.stored[captured[end]] = self._state(cache)
                start = end
            self._insert(pieces, resume.lookup.prefix_slots, cache, offset, captured, namespace)
        finally:
            self.graph.unlock(resume.lookup.node_ids)
        return HybridPrefill(torch.cat(logits), offset, tuple(sorted(captured)))

    def _insert(self, pieces: list[Piece], prefix_slots: Sequence[int], cache: DynamicCache, offset: int,
                captured: dict[int, int], namespace: NamespaceKey) -> None:
        """Cache the request's path (the attention K/V past ``offset`` in new slots) and its captured states."""
        n = pieces[-1].end
        fresh = self.graph.alloc(n - offset)
        if fresh is None:
            self.states.adopt([], captured, namespace)  # nothing to hang them on: freed
            return
        layers = _layers(cache)
        keys = torch.stack([layers[i].keys[0, :, offset:].transpose(0, 1) for i in self.attention_layers])
        values = torch.stack([layers[i].values[0, :, offset:].transpose(0, 1) for i in self.attention_layers])
        self.pool.write(fresh, keys, values)
        slots = [*prefix_slots, *fresh]
        result = self.graph.insert(pieces, slots)
        self.pool.allocator.free([s for piece, took in zip(pieces, result.adopted) if not took
                                  for pos, s in enumerate(slots[piece.start : piece.end], piece.start) if pos >= offset])
        self.states.adopt(result.node_ids, captured, namespace)

    def _state(self, cache: DynamicCache) -> RecurrentState:
        layers: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
        for i, layer in enumerate(_layers(cache)):
            recurrent: Any = layer  # HF types the state dicts as optional
            if isinstance(layer, LinearAttentionCacheLayerMixin) and recurrent.is_conv_states_initialized[0]:
                layers[i] = (recurrent.conv_states[0].clone(), recurrent.recurrent_states[0].clone(),
                             int(recurrent.conv_kernel_size[0]))
        return RecurrentState(layers)

    def _restore(self, cache: DynamicCache, prefix_slots: Sequence[int], state: RecurrentState) -> None:
        keys, values = self.pool.read(prefix_slots)
        for i, layer in enumerate(_layers(cache)):
            if i in state.layers:
                conv, recurrent, kernel = state.layers[i]
                layer.lazy_initialization(conv_states=conv, recurrent_states=recurrent, conv_kernel_size=kernel)
                layer.conv_states[0].copy_(conv)
                layer.recurrent_states[0].copy_(recurrent)
                layer.has_previous_state[0] = True  # else the layer starts the next forward from a zero state
            elif i in self.attention_layers:
                j = self.attention_layers.index(i)
                layer.update(keys[j].transpose(0, 1)[None].clone(), values[j].transpose(0, 1)[None].clone())
        assert cache.get_seq_length() == len(prefix_slots), "positions follow the attention K/V length"


class _StatePool(FreeListAllocator):
    """State slots whose tensors live in ``stored``: a freed slot drops them."""

    def __init__(self, stored: dict[int, RecurrentState], num_slots: int) -> None:
        super().__init__(num_slots)
        self._stored = stored

    def free(self, slots: Sequence[int]) -> None:
        super().free(slots)
        for slot in slots:
            self._stored.pop(slot, None)
