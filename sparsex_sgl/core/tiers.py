"""Where a segment's KV goes when the device pool lets it go: a host-memory tier and a shared object store.

Engine-free: the KV arrives as host tensors and leaves as host tensors; moving it in and out of an engine's
pool is the adapter's job, and the store is any object with SGLang's ``HiCacheStorage`` shape
(``get`` / ``set`` / ``exists``), injected. docs/how-it-works.md ("Tiers") says when objects move and why.

A stored object carries what a load must check before its KV may be served: the layout digest (model,
dtype, KV shape, the rank's head shard), the segment's namespaced hash, its token ids and a BLAKE2b
checksum of everything after the header. The store key names the same fields, so a lookup never even asks
for another model's, shard's or tenant's object; the header catches one that was put there anyway.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from queue import Queue
from typing import Any, Protocol

import torch

from sparsex_sgl.core.segments import SegmentHash

OBJECT_MAGIC = b"SXKV"
OBJECT_VERSION = 1
_IDENTITY = struct.Struct("<4sI16s16sIQ")
"""magic, version, layout digest, segment hash, token count, source position."""
_HEADER = struct.Struct("<4sI16s16sIQ16s4x")
"""The identity, then a BLAKE2b-128 checksum of the identity and the payload."""
MISS_TTL_S = 2.0
"""How long a store miss is believed before the store is asked again (a segment another instance is about
to write shows up within this; every waiting request is matched again each scheduling round)."""


@dataclass(frozen=True)
class KVLayout:
    """What one rank's KV of one token is: objects of another layout are never read as this one's."""

    model: str
    dtype: torch.dtype
    num_layers: int
    kv_heads: int
    head_dim: int
    v_head_dim: int
    tp_rank: int = 0
    tp_size: int = 1

    @property
    def digest(self) -> bytes:
        """16 bytes over every field (the model as served, the dtype, the shape and the head shard)."""
        text = "|".join(str(v) for v in (self.model, self.dtype, self.num_layers, self.kv_heads, self.head_dim,
                                           self.v_head_dim, self.tp_rank, self.tp_size))
        return hashlib.blake2b(text.encode(), digest_size=16).digest()

    def k_bytes(self, n_tokens: int) -> int:
        return n_tokens * self.num_layers * self.kv_heads * self.head_dim * self.dtype.itemsize

    def kv_bytes(self, n_tokens: int) -> int:
        return self.k_bytes(n_tokens) + n_tokens * self.num_layers * self.kv_heads * self.v_head_dim * self.dtype.itemsize

    def object_bytes(self, n_tokens: int) -> int:
        return _HEADER.size + 8 * n_tokens + self.kv_bytes(n_tokens)

    def store_key(self, key: SegmentHash) -> str:
        """The object's key in a shared store: the layout digest and the segment's namespaced hash."""
        return f"sparsex-{self.digest.hex()}-{key.hex()}"


@dataclass(frozen=True)
class SegmentKV:
    """A segment's exact KV on the host: ``k [layers, n, kv_heads, head_dim]``, ``v [layers, n, kv_heads,
    v_head_dim]``, computed at ``source_start`` (a load re-rotates its keys from there)."""

    key: SegmentHash
    token_ids: tuple[int, ...]
    source_start: int
    k: torch.Tensor
    v: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


class ObjectError(Exception):
    """A stored object that must not be served; ``reason`` is the counted fault."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def encode(segment: SegmentKV, layout: KVLayout) -> torch.Tensor:
    """The segment as one byte tensor: header, token ids (int64), K bytes, V bytes."""
    tokens = torch.tensor(segment.token_ids, dtype=torch.int64)
    payload = torch.cat([_bytes_of(tokens), _bytes_of(segment.k.to(layout.dtype)), _bytes_of(segment.v.to(layout.dtype))])
    identity = _IDENTITY.pack(OBJECT_MAGIC, OBJECT_VERSION, layout.digest, segment.key, len(segment.token_ids),
                              segment.source_start)
    header = _HEADER.pack(*_IDENTITY.unpack(identity), _checksum(identity, payload))
    return torch.cat([torch.frombuffer(bytearray(header), dtype=torch.uint8), payload])


def _checksum(identity: bytes, payload: torch.Tensor) -> bytes:
    digest = hashlib.blake2b(identity, digest_size=16)
    digest.update(payload.numpy().data)
    return digest.digest()


def decode(data: torch.Tensor, key: SegmentHash, token_ids: tuple[int, ...], layout: KVLayout) -> SegmentKV:
    """The segment ``key`` names, with tokens ``token_ids``, from an object read back; ``ObjectError`` unless
    every check holds (size, header, layout, key, checksum, tokens)."""
    n = len(token_ids)
    raw = data.view(torch.uint8).reshape(-1)
    if raw.numel() != layout.object_bytes(n):
        raise ObjectError("corrupt", f"{raw.numel()} bytes, expected {layout.object_bytes(n)}")
    header = raw[: _HEADER.size].numpy().tobytes()
    magic, version, digest, stored_key, stored_n, source_start, checksum = _HEADER.unpack(header)
    if magic != OBJECT_MAGIC or version != OBJECT_VERSION:
        raise ObjectError("corrupt", f"header {magic!r} v{version}")
    payload = raw[_HEADER.size :]
    if _checksum(header[: _IDENTITY.size], payload) != checksum:
        raise ObjectError("corrupt", "checksum mismatch (damaged or half-written)")
    if digest != layout.digest or stored_key != key or stored_n != n:
        raise ObjectError("foreign", "another model, dtype, shard, tenant or segment")
    stored_tokens = tuple(payload[: 8 * n].view(torch.int64).tolist())
    if stored_tokens != token_ids:
        raise ObjectError("foreign", "the object holds other tokens under this segment's hash")
    k_bytes = layout.k_bytes(n)
    kv = payload[8 * n :]
    k = kv[:k_bytes].view(layout.dtype).reshape(layout.num_layers, n, layout.kv_heads, layout.head_dim)
    v = kv[k_bytes:].view(layout.dtype).reshape(layout.num_layers, n, layout.kv_heads, layout.v_head_dim)
    return SegmentKV(key, token_ids, int(source_start), k, v)


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)


@dataclass
class TierCounters:
    """Cumulative tier statistics of one scheduler (``/sparsex/stats``, ``/metrics``)."""

    host_hits: int = 0
    host_hit_tokens: int = 0
    store_hits: int = 0
    store_hit_tokens: int = 0
    loaded_bytes: int = 0
    load_seconds: float = 0.0
    spilled_segments: int = 0
    spilled_tokens: int = 0
    host_evictions: int = 0
    """Segments the host tier dropped to stay within its size (to the store, if one keeps them)."""
    store_misses: int = 0
    """Store reads that found no object (not a fault: the segment was never stored, or was evicted there)."""
    store_writes: int = 0
    store_write_failures: int = 0
    store_write_drops: int = 0
    """Writes not queued because the writer was this many objects behind (the scheduler never waits)."""
    store_faults: Counter[str] = field(default_factory=Counter)
    """Loads refused, by reason: missing, unreadable, corrupt, foreign, error, timeout, busy; other_rank: read
    here but not on another tensor-parallel rank, so no rank used it."""


class HostTier:
    """A bounded LRU of segments in host memory, by segment hash (the namespace is in the hash).

    Exclusive with the device pool: a load takes a segment out (it lives in the pool until evicted again),
    so the two tiers together hold each segment once."""

    def __init__(self, capacity_bytes: int, counters: TierCounters) -> None:
        self.capacity_bytes = capacity_bytes
        self.bytes = 0
        self._segments: OrderedDict[SegmentHash, SegmentKV] = OrderedDict()
        self._counters = counters

    def __len__(self) -> int:
        return len(self._segments)

    def __contains__(self, key: object) -> bool:
        return key in self._segments

    def put(self, segment: SegmentKV) -> None:
        """Keep ``segment`` (replacing one of the same hash), dropping least recently used ones to fit."""
        if segment.nbytes > self.capacity_bytes:
            return
        old = self._segments.pop(segment.key, None)
        if old is not None:
            self.bytes -= old.nbytes
        while self._segments and self.bytes + segment.nbytes > self.capacity_bytes:
            _, dropped = self._segments.popitem(last=False)
            self.bytes -= dropped.nbytes
            self._counters.host_evictions += 1
        self._segments[segment.key] = segment
        self.bytes += segment.nbytes

    def take(self, key: SegmentHash, token_ids: tuple[int, ...]) -> SegmentKV | None:
        """The segment, removed from the tier; None if absent or (a hash collision) holding other tokens."""
        segment = self._segments.get(key)
        if segment is None or segment.token_ids != token_ids:
            return None
        del self._segments[key]
        self.bytes -= segment.nbytes
        return segment

    def clear(self) -> None:
        self._segments.clear()
        self.bytes = 0


class ObjectStore(Protocol):
    """The part of SGLang's ``HiCacheStorage`` interface a segment store uses."""

    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> Any: ...

    def set(self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None) -> bool: ...

    def exists(self, key: str) -> bool: ...


@dataclass
class _Read:
    """One store read's outcome, filled in by its thread."""

    done: threading.Event = field(default_factory=threading.Event)
    data: torch.Tensor | None = None
    error: Exception | None = None


class SegmentStore:
    """Segments in a shared object store, read with a bound on time and written behind the scheduler.

    - Each read runs on a daemon thread of its own (a hung read never keeps the process from exiting) and is
      waited for at most ``timeout_s``; at most ``readers`` reads are out at once, so a store that hangs
      holds at most that many threads, and while they are all held a read is refused at once (``busy``): a
      scheduler never waits longer than ``timeout_s`` for one read.
    - Writes go to one writer thread through a queue holding at most ``queue_bytes`` of K/V (the object
      being written included); a write past that is dropped (counted), so a slow or hung store never blocks
      the scheduler and never makes it hold more memory than that.
    - Every load is checked (``decode``); anything that fails is a counted fault and the segment is
      recomputed by the caller.
    """

    def __init__(self, backend: ObjectStore, layout: KVLayout, counters: TierCounters, timeout_s: float = 2.0,
                 readers: int = 2, queue_bytes: int = 256 << 20) -> None:
        self.backend = backend
        self.layout = layout
        self.timeout_s = timeout_s
        self._counters = counters
        self._free_readers = threading.Semaphore(readers)
        self._missed: dict[SegmentHash, float] = {}
        self._queue: Queue[SegmentKV] = Queue()
        self._queue_bytes = queue_bytes
        self._pending_bytes = 0
        self._stats_lock = threading.Lock()
        self._writer = threading.Thread(target=self._write_loop, name="sparsex-store-write", daemon=True)
        self._writer.start()

    # ------------------------------------------------------------------ reads
    def load(self, key: SegmentHash, token_ids: tuple[int, ...]) -> SegmentKV | None:
        """The stored segment, checked, or None (a counted fault, or a miss) within ``timeout_s``."""
        if time.monotonic() < self._missed.get(key, 0.0):
            return None
        if not self._free_readers.acquire(blocking=False):
            self._fault("busy")
            return None
        read = _Read()
        threading.Thread(target=self._read, args=(key, len(token_ids), read), name="sparsex-store-read",
                         daemon=True).start()
        if not read.done.wait(self.timeout_s):
            self._fault("timeout")
            return None
        if read.error is not None:
            error = read.error
            self._fault(error.reason if isinstance(error, ObjectError) else
                         "unreadable" if isinstance(error, OSError) else "error")
            return None
        data = read.data
        if data is None:
            with self._stats_lock:
                self._counters.store_misses += 1
            self._missed[key] = time.monotonic() + MISS_TTL_S
            if len(self._missed) > 65536:
                now = time.monotonic()
                self._missed = {k: t for k, t in self._missed.items() if t > now}
            return None
        try:
            return decode(data, key, token_ids, self.layout)
        except ObjectError as exc:
            self._fault(exc.reason)
            return None

    def _read(self, key: SegmentHash, n_tokens: int, read: _Read) -> None:
        """One read, on its own thread: the object's bytes (or None: not stored), or the error it met."""
        try:
            name = self.layout.store_key(key)
            if self.backend.exists(name):
                target = torch.empty(self.layout.object_bytes(n_tokens), dtype=torch.uint8)
                got = self.backend.get(name, target)
                if got is None:  # vanished between exists and get
                    raise ObjectError("unreadable", "listed but not returned")
                read.data = got if isinstance(got, torch.Tensor) else target
        except Exception as exc:  # noqa: BLE001 - handed to the waiting scheduler, which counts it
            read.error = exc
        finally:
            read.done.set()
            self._free_readers.release()

    def _fault(self, reason: str) -> None:
        with self._stats_lock:
            self._counters.store_faults[reason] += 1

    # ------------------------------------------------------------------ writes
    def save(self, segment: SegmentKV) -> None:
        """Queue ``segment`` for writing; never blocks (a full queue drops it, counted)."""
        self._missed.pop(segment.key, None)
        with self._stats_lock:
            if self._pending_bytes + segment.nbytes > self._queue_bytes:
                self._counters.store_write_drops += 1
                return
            self._pending_bytes += segment.nbytes
        self._queue.put_nowait(segment)

    def _write_loop(self) -> None:
        while True:
            segment = self._queue.get()
            try:
                name = self.layout.store_key(segment.key)
                ok = self.backend.exists(name) or bool(self.backend.set(name, encode(segment, self.layout)))
            except Exception:  # noqa: BLE001 - a failed write only costs a later recompute
                ok = False
            with self._stats_lock:
                self._pending_bytes -= segment.nbytes
                if ok:
                    self._counters.store_writes += 1
                else:
                    self._counters.store_write_failures += 1
            self._queue.task_done()

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every queued write is done (tests, shutdown); False after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

