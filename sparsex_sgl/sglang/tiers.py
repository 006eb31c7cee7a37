"""The tiers below one scheduler's KV pool: copies between SGLang's pool and the host tier or the store.

``core.tiers`` decides nothing about SGLang; this module moves bytes. The graph decides what lives where:

- **evicted** (``spill``, the graph's ``on_evict``): an exact segment node leaving the pool is copied to the
  host tier, while its slots still hold its KV;
- **cached** (``keep``, after a checkpoint's insert): an exact segment the pool adopted is written to the
  shared store at once (write-through: another instance can reuse it on its first visit, and a segment
  the host tier later drops is still in the store). The copy out of the pool happens here, on the
  scheduler; encoding and the store's I/O on the writer thread;
- **looked up** (``load``, before the graph's lookup): a marked segment the pool does not hold is taken
  from the host tier, else read from the store, copied into fresh pool slots and adopted by the graph
  as a detached node; the lookup then finds it like any pool hit. Copies are plain and synchronous:
  on CUDA they are not overlapped with the full layers (not built; docs/how-it-works.md, "Tiers").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import torch

from sparsex_sgl.core.graph import EvictedSegment, InsertResult, NodeId, SegmentGraph
from sparsex_sgl.core.segments import Piece, SegmentHash
from sparsex_sgl.core.tiers import HostTier, KVLayout, SegmentKV, SegmentStore, TierCounters
from sparsex_sgl.sglang import compat


class PoolTiers:
    """The host tier and the store of one scheduler, and the copies between them and its KV pool."""

    def __init__(self, pool: Any, layout: KVLayout, device: torch.device, host: HostTier | None,
                 store: SegmentStore | None, counters: TierCounters, store_name: str = "") -> None:
        self.pool = pool
        self.layout = layout
        self.device = device
        self.host = host
        self.store = store
        self.store_name = store_name
        self.counters = counters

    # ------------------------------------------------------------------ copies
    def _copy_out(self, slots: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``k, v [layers, n, kv_heads, dim]`` of ``slots``, in host memory (pinned on CUDA)."""
        index = torch.tensor(list(slots), dtype=torch.int64, device=self.device)
        ks, vs = [], []
        for layer in range(self.layout.num_layers):
            k_buffer, v_buffer = compat.layer_buffers(self.pool, layer)
            ks.append(k_buffer[index])
            vs.append(v_buffer[index])
        k, v = torch.stack(ks), torch.stack(vs)
        if self.device.type == "cpu":
            return k, v
        pinned_k = torch.empty(k.shape, dtype=k.dtype, pin_memory=True)
        pinned_v = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
        pinned_k.copy_(k)
        pinned_v.copy_(v)
        return pinned_k, pinned_v

    def _copy_in(self, slots: Sequence[int], segment: SegmentKV) -> None:
        index = torch.tensor(list(slots), dtype=torch.int64, device=self.device)
        for layer in range(self.layout.num_layers):
            k_buffer, v_buffer = compat.layer_buffers(self.pool, layer)
            k_buffer[index] = segment.k[layer].to(self.device, k_buffer.dtype)
            v_buffer[index] = segment.v[layer].to(self.device, v_buffer.dtype)

    def _snapshot(self, key: Any, token_ids: tuple[int, ...], start: int, slots: Sequence[int]) -> SegmentKV:
        k, v = self._copy_out(slots)
        return SegmentKV(key, token_ids, start, k, v)

    # ------------------------------------------------------------------ the graph's events
    def spill(self, evicted: EvictedSegment) -> None:
        """An exact segment leaves the pool: keep it in the host tier (if there is one)."""
        if self.host is None:
            return
        self.host.put(self._snapshot(evicted.key, evicted.token_ids, evicted.start_pos, evicted.slots))
        self.counters.spilled_segments += 1
        self.counters.spilled_tokens += len(evicted.token_ids)

    def keep(self, graph: SegmentGraph, pieces: Sequence[Piece], result: InsertResult) -> None:
        """After a checkpoint's insert: write each exact segment the pool just adopted to the store."""
        if self.store is None:
            return
        for piece, node_id, adopted in zip(pieces, result.node_ids, result.adopted):
            if adopted and node_id is not None and piece.reusable and graph.is_exact(node_id):
                self.store.save(self._snapshot(piece.key, piece.token_ids, piece.start, graph.node_slots(node_id)))

    def load(self, graph: SegmentGraph, pieces: Sequence[Piece],
             agree: Callable[[Sequence[tuple[SegmentHash, bool]]], set[Any]]) -> int:
        """Bring the request's marked segments that the pool lacks back from the host tier or the store, as
        detached nodes, and return their tokens; a segment the pool has no room for stays where it was.

        Each is read first; ``agree`` then says which every tensor-parallel rank found (with one rank: those
        it found), and only those enter the pool, so every rank's graph adopts the same nodes (a read that
        failed on another rank is counted here as ``other_rank``). Loaded nodes are locked until every load
        is done (a later one must not evict an earlier one); the caller's lookup follows at once."""
        fetched: dict[SegmentHash, tuple[Piece, SegmentKV | None, bool, float]] = {}
        for piece in pieces:
            if piece.reusable and piece.key not in fetched and not graph.has_source(piece.key):
                started = time.perf_counter()
                segment, from_host = self._fetch(piece)
                fetched[piece.key] = (piece, segment, from_host, time.perf_counter() - started)
        loaded: list[NodeId] = []
        tokens = 0
        try:
            agreed = agree([(key, segment is not None) for key, (_, segment, _, _) in fetched.items()])
            for key in list(fetched):
                piece, segment, from_host, seconds = fetched.pop(key)
                if segment is None:
                    continue
                if key not in agreed:
                    self._put_back(segment, from_host)
                    self.counters.store_faults["other_rank"] += 1
                    continue
                node_id = self._adopt(graph, piece, segment, from_host, seconds)
                if node_id is None:
                    continue
                graph.lock([node_id])
                loaded.append(node_id)
                tokens += piece.length
        finally:
            graph.unlock(loaded)
            for _, segment, from_host, _ in fetched.values():  # an error stopped the loop: none is lost
                if segment is not None:
                    self._put_back(segment, from_host)
        return tokens

    def _fetch(self, piece: Piece) -> tuple[SegmentKV | None, bool]:
        """The segment from the host tier (taken out of it), else from the store; and whether from the host."""
        if self.host is not None:
            segment = self.host.take(piece.key, piece.token_ids)
            if segment is not None:
                return segment, True
        if self.store is not None:
            return self.store.load(piece.key, piece.token_ids), False
        return None, False

    def _put_back(self, segment: SegmentKV, from_host: bool) -> None:
        """A segment read but not adopted: one from the host tier goes back there (the store keeps its own)."""
        if from_host and self.host is not None:
            self.host.put(segment)

    def _adopt(self, graph: SegmentGraph, piece: Piece, segment: SegmentKV, from_host: bool,
               seconds: float) -> NodeId | None:
        started = time.perf_counter()
        slots = graph.alloc(piece.length)
        node_id = None
        if slots is not None:
            self._copy_in(slots, segment)
            node_id = graph.insert_detached(piece, slots, segment.source_start)
            if node_id is None:
                graph.free_slots(slots)
        if node_id is None:  # no room in the pool
            self._put_back(segment, from_host)
            return None
        c = self.counters
        if from_host:
            c.host_hits += 1
            c.host_hit_tokens += piece.length
        else:
            c.store_hits += 1
            c.store_hit_tokens += piece.length
        c.loaded_bytes += segment.nbytes
        c.load_seconds += seconds + time.perf_counter() - started
        return node_id

    def clear(self) -> None:
        """``/flush_cache``: the host tier goes with the pool (the store is shared and persistent)."""
        if self.host is not None:
            self.host.clear()

    def stats(self) -> dict[str, object]:
        out: dict[str, object] = {k: v for k, v in asdict(self.counters).items() if k != "store_faults"}
        out["store_faults"] = dict(self.counters.store_faults)
        out["host_segments"] = 0 if self.host is None else len(self.host)
        out["host_bytes"] = 0 if self.host is None else self.host.bytes
        out["host_capacity_bytes"] = 0 if self.host is None else self.host.capacity_bytes
        out["store_backend"] = self.store_name
        return out
