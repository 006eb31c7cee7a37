"""The segment graph over a tensor KV pool: the reference counterpart of the SGLang cache backend."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sparsex_sgl.core.config import SelectionConfig
from sparsex_sgl.core.graph import Lookup, SegmentGraph
from sparsex_sgl.core.segments import Piece, make_piece, namespace_key, split_into_pieces
from sparsex_sgl.reference.executor import PrefillResult, ReferenceExecutor, ReuseSetting
from sparsex_sgl.reference.pool import TensorKVPool


class ReferenceSegmentCache:
    """Caches segments and exact request paths for a ReferenceExecutor and serves SparseX prefills."""

    def __init__(self, executor: ReferenceExecutor, num_slots: int, max_tokens: int | None = None,
                 namespace: str = "", gap_block: int | None = None) -> None:
        """``gap_block``: cut gaps into blocks and align them with cached cuts, as the SGLang cache does
        (``SegmentGraphCache``, 16), so both plan a prompt alike; None keeps each gap whole."""
        dims = executor.spec.dims
        self.executor = executor
        self.namespace = namespace_key(namespace)
        self.gap_block = gap_block
        self.pool = TensorKVPool(dims.num_layers, num_slots, dims.n_kv_heads, dims.head_dim, executor.dtype,
                                 executor.device)
        self.graph = SegmentGraph(self.pool.allocator, max_tokens or num_slots - 1)

    def fill_segment(self, token_ids: Sequence[int], sink: Sequence[int] = ()) -> bool:
        """Cache a segment computed alone: from position 0, or behind ``sink`` (a shared prefix, cached as a
        gap before it, as the server's pre-warm caches it), so the segment's own KV starts at ``len(sink)``.
        False if there was no room."""
        prompt = [*sink, *token_ids]
        pieces = self._pieces(prompt, [[len(sink), len(prompt)]])
        if len(self.graph.lookup(pieces).prefix_node_ids) == len(pieces):
            return True  # already cached on this path
        k, v = self.executor.encode_segment(prompt)
        return self._insert(pieces, k, v)

    def store(self, input_ids: Sequence[int], spans: object, result: PrefillResult) -> bool:
        """Cache an exactly computed request as a root path (later identical prefixes hit exactly)."""
        if not result.exact:
            raise ValueError("only exactly computed KV may enter the graph as an exact path")
        pieces = self._pieces(input_ids, spans)
        n = len(input_ids)
        return self._insert(pieces, result.kv.k[:, :n], result.kv.v[:, :n])

    def _insert(self, pieces: list[Piece], k: torch.Tensor, v: torch.Tensor) -> bool:
        n = pieces[-1].end
        slots = self.graph.alloc(n)
        if slots is None:
            return False
        self.pool.write(slots, k, v)
        outcome = self.graph.insert(pieces, slots)
        leftover = [
            s for piece, took in zip(pieces, outcome.adopted) if not took for s in slots[piece.start : piece.end]
        ]
        if leftover:
            self.pool.allocator.free(leftover)
        return all(nid is not None for nid in outcome.node_ids)

    def _pieces(self, token_ids: Sequence[int], spans: object) -> list[Piece]:
        pieces = split_into_pieces(token_ids, spans, self.namespace, self.gap_block)
        if self.gap_block is None:
            return pieces
        return self.graph.align(pieces, lambda start, end: make_piece(token_ids, start, end, self.namespace,
                                                                     reusable=False))

    def lookup(self, input_ids: Sequence[int], spans: object) -> Lookup:
        return self.graph.lookup(self._pieces(input_ids, spans))

    def prefill(self, input_ids: Sequence[int], spans: object, setting: SelectionConfig | ReuseSetting,
                extra_capacity: int = 0) -> PrefillResult:
        """SparseX (or baseline) prefill of a request whose reusable segments are ``spans``."""
        return self.prefill_many(input_ids, spans, [setting], extra_capacity)[0]

    def prefill_many(self, input_ids: Sequence[int], spans: object, settings: Sequence[SelectionConfig | ReuseSetting],
                     extra_capacity: int = 0) -> list[PrefillResult]:
        """``prefill`` under each of ``settings`` from one lookup (``ReferenceExecutor.prefill_reuse_many``)."""
        lookup = self.lookup(input_ids, spans)
        self.graph.lock(lookup.node_ids)
        try:
            return self.executor.prefill_reuse_many(input_ids, lookup, self.pool, settings, extra_capacity)
        finally:
            self.graph.unlock(lookup.node_ids)
