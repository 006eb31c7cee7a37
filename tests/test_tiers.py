"""Segment tiers without a server: the stored object's checks (every fault the store can hand back), the host
tier's LRU, and the segment store over SGLang's own ``file`` backend (built through the seam) with a store
that raises, one that hangs, and two writers of one segment."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from mooncake_master import mooncake_master  # tests/: on sys.path (pytest's rootdir insertion)

from sparsex_sgl.core.segments import make_piece, namespace_key
from sparsex_sgl.core.tiers import (
    HostTier,
    KVLayout,
    ObjectError,
    SegmentKV,
    SegmentStore,
    TierCounters,
    decode,
    encode,
)
from sparsex_sgl.sglang import compat

LAYOUT = KVLayout("tiny", torch.float32, num_layers=3, kv_heads=2, head_dim=4, v_head_dim=4)


def segment(tokens: tuple[int, ...], start: int = 5, namespace: str = "", seed: int = 0) -> SegmentKV:
    gen = torch.Generator().manual_seed(seed)
    n = len(tokens)
    piece = make_piece(tokens, 0, n, namespace_key(namespace), reusable=True)
    return SegmentKV(piece.key, tokens, start, torch.randn(3, n, 2, 4, generator=gen),
                     torch.randn(3, n, 2, 4, generator=gen))


def same(a: SegmentKV, b: SegmentKV) -> bool:
    return (a.key, a.token_ids, a.source_start) == (b.key, b.token_ids, b.source_start) and bool(
        torch.equal(a.k, b.k) and torch.equal(a.v, b.v))


def test_an_object_reads_back_bit_exact_and_every_check_catches_its_fault() -> None:
    seg = segment((3, 1, 4, 1, 5))
    data = encode(seg, LAYOUT)
    assert data.numel() == LAYOUT.object_bytes(5)
    assert same(decode(data.clone(), seg.key, seg.token_ids, LAYOUT), seg)

    def reason(data: torch.Tensor, **changes: Any) -> str:
        args: dict[str, Any] = {"key": seg.key, "token_ids": seg.token_ids, "layout": LAYOUT, **changes}
        with pytest.raises(ObjectError) as caught:
            decode(data, **args)
        return caught.value.reason

    flipped = data.clone()
    flipped[-3] ^= 0x10  # one bit of one V value
    assert reason(flipped) == "corrupt"
    assert reason(data[:-1]) == "corrupt"  # truncated
    assert reason(torch.cat([data[:40], torch.zeros_like(data[40:])])) == "corrupt"  # half-written
    other_model = KVLayout("other", torch.float32, 3, 2, 4, 4)
    assert reason(data, layout=other_model) == "foreign"
    assert reason(data, layout=KVLayout("tiny", torch.float32, 3, 2, 4, 4, tp_rank=1, tp_size=2)) == "foreign"
    tenant = segment((3, 1, 4, 1, 5), namespace="tenant-b")
    assert reason(data, key=tenant.key) == "foreign"
    assert reason(data, token_ids=(3, 1, 4, 1, 6)) == "foreign"
    assert LAYOUT.store_key(seg.key) != other_model.store_key(seg.key) != LAYOUT.store_key(tenant.key)


def test_host_tier_keeps_the_most_recent_segments_within_its_size_and_gives_each_back_once() -> None:
    counters = TierCounters()
    one = segment((1, 2, 3, 4))
    tier = HostTier(capacity_bytes=2 * one.nbytes + 1, counters=counters)
    a, b, c = segment((1, 2, 3, 4)), segment((5, 6, 7, 8)), segment((9, 10, 11, 12))
    tier.put(a)
    tier.put(b)
    tier.put(c)  # a goes: least recently put
    assert a.key not in tier and b.key in tier and c.key in tier
    assert counters.host_evictions == 1 and tier.bytes == 2 * one.nbytes
    assert tier.take(b.key, (5, 6, 7, 9)) is None  # a hash collision is not served
    taken = tier.take(b.key, b.token_ids)
    assert taken is not None and same(taken, b)
    assert tier.take(b.key, b.token_ids) is None and tier.bytes == one.nbytes  # exclusive: given back once
    tier.put(segment(tuple(range(100))))  # larger than the tier: not kept, nothing dropped for it
    assert len(tier) == 1 and counters.host_evictions == 1


def test_segments_read_from_the_host_tier_go_back_to_it_unless_every_rank_read_them() -> None:
    """``PoolTiers.load`` over SGLang's real pool and allocator: a segment another rank did not read stays in the
    host tier (counted ``other_rank``), one every rank read enters the pool, and when the vote itself fails
    (it raises) every segment read goes back: nothing is lost from the host tier."""
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    from sparsex_sgl.core.graph import SegmentGraph
    from sparsex_sgl.sglang.cache import _PoolAllocator
    from sparsex_sgl.sglang.tiers import PoolTiers

    pool = MHATokenToKVPool(64, 1, torch.float32, 2, 4, 3, "cpu", False)
    graph = SegmentGraph(_PoolAllocator(TokenToKVPoolAllocator(64, torch.float32, "cpu", pool, False),
                                        torch.device("cpu")), max_tokens=64)
    counters = TierCounters()
    host = HostTier(1 << 20, counters)
    tiers = PoolTiers(pool, LAYOUT, torch.device("cpu"), host, None, counters)
    a, b = segment((1, 2, 3, 4), seed=1), segment((5, 6, 7, 8), seed=2)
    pieces = [make_piece(s.token_ids, 0, 4, namespace_key(""), reusable=True) for s in (a, b)]
    host.put(a)
    host.put(b)

    def refuse(found: Any) -> set[Any]:
        raise RuntimeError("the vote failed")

    with pytest.raises(RuntimeError):
        tiers.load(graph, pieces, refuse)
    assert a.key in host and b.key in host and len(graph) == 0
    assert tiers.load(graph, pieces, lambda found: {a.key}) == 4  # the other rank did not read b
    assert a.key not in host and b.key in host and counters.store_faults["other_rank"] == 1
    assert graph.has_source(a.key) and not graph.has_source(b.key)
    k, _ = compat.layer_buffers(pool, 1)
    assert all(any(torch.equal(k[slot], a.k[1][j]) for slot in range(64)) for j in range(4))  # copied in


def file_store(path: Path, counters: TierCounters, **kwargs: Any) -> SegmentStore:
    backend = compat.storage_backend("file", {"file_storage_path": str(path)}, "tiny", 0, 1)
    return SegmentStore(backend, LAYOUT, counters, **kwargs)


def stored_file(path: Path, seg: SegmentKV) -> Path:
    (found,) = path.glob(f"{LAYOUT.store_key(seg.key)}*.bin")
    return found


def test_file_store_round_trip_and_every_fault_is_a_counted_miss(tmp_path: Path) -> None:
    counters = TierCounters()
    store = file_store(tmp_path, counters)
    seg, other = segment((7, 7, 8, 9)), segment((1, 1, 2, 3), seed=1)
    assert store.load(seg.key, seg.token_ids) is None  # missing: a miss, not a fault
    store.save(seg)
    store.save(other)
    assert store.flush() and counters.store_writes == 2
    loaded = store.load(seg.key, seg.token_ids)
    assert loaded is not None and same(loaded, seg)

    path = stored_file(tmp_path, seg)
    good = path.read_bytes()
    path.write_bytes(good[:-8])  # truncated: the file backend's short read
    assert store.load(seg.key, seg.token_ids) is None
    path.write_bytes(good[:200] + bytes([good[200] ^ 1]) + good[201:])
    assert store.load(seg.key, seg.token_ids) is None
    path.write_bytes(stored_file(tmp_path, other).read_bytes())  # another segment's object under this key
    assert store.load(seg.key, seg.token_ids) is None
    assert dict(counters.store_faults) == {"unreadable": 1, "corrupt": 1, "foreign": 1}
    path.write_bytes(good)
    assert store.load(seg.key, seg.token_ids) is not None  # the faults were per read: nothing sticks


class HangingFile:
    """The file backend, whose reads block until released (a store that hangs) or raise (one that fails)."""

    def __init__(self, backend: Any, mode: str) -> None:
        self.backend, self.mode, self.release = backend, mode, threading.Event()

    def exists(self, key: str) -> bool:
        return bool(self.backend.exists(key))

    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> Any:
        if self.mode == "raise":
            raise RuntimeError("store is down")
        self.release.wait(30)
        return self.backend.get(key, target_location)

    def set(self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None) -> bool:
        self.release.wait(30)
        return bool(self.backend.set(key, value))


@pytest.mark.parametrize("mode", ["hang", "raise"])
def test_a_store_that_hangs_or_raises_costs_a_bounded_wait_and_never_blocks_a_write(tmp_path: Path,
                                                                                   mode: str) -> None:
    counters = TierCounters()
    seed_store = file_store(tmp_path, TierCounters())
    seg = segment((4, 4, 4, 2))
    seed_store.save(seg)
    assert seed_store.flush()
    backend = HangingFile(compat.storage_backend("file", {"file_storage_path": str(tmp_path)}, "tiny", 0, 1), mode)
    store = SegmentStore(backend, LAYOUT, counters, timeout_s=0.3, readers=1, queue_bytes=2 * seg.nbytes)
    started = time.monotonic()
    assert store.load(seg.key, seg.token_ids) is None
    assert store.load(seg.key, seg.token_ids) is None  # hung: the one reader is still held, refused at once
    elapsed = time.monotonic() - started
    for _ in range(5):
        store.save(segment((5, 5, 5, 5)))  # the writer is stuck (hang): two objects' bytes queue, saves return
    assert time.monotonic() - started < 0.3 + 1.0
    if mode == "hang":
        assert dict(counters.store_faults) == {"timeout": 1, "busy": 1} and 0.3 <= elapsed < 1.0
        assert counters.store_write_drops == 3  # the one being written and one queued fill the bytes
        backend.release.set()  # the store comes back: reads work again
        time.sleep(0.2)
        loaded = store.load(seg.key, seg.token_ids)
        assert loaded is not None and same(loaded, seg)
    else:
        assert dict(counters.store_faults) == {"error": 2}


def test_two_instances_writing_one_segment_at_once_leave_one_good_object(tmp_path: Path) -> None:
    counters = [TierCounters(), TierCounters()]
    stores = [file_store(tmp_path, c) for c in counters]
    seg = segment(tuple(range(64)))
    for _ in range(3):
        for store in stores:
            store.save(seg)
    assert all(store.flush() for store in stores)
    assert len(list(tmp_path.glob("*.bin"))) == 1
    for store in stores:
        loaded = store.load(seg.key, seg.token_ids)
        assert loaded is not None and same(loaded, seg)
    assert not any(c.store_faults or c.store_write_failures for c in counters)


def test_mooncake_store_shares_segments_between_clients_and_every_fault_is_a_counted_miss(tmp_path: Path) -> None:
    """The real distributed store (a master on 127.0.0.1, TCP): a second client reads what the first wrote;
    a short, long, corrupt or foreign (another tenant's) object under a segment's key is a counted fault, never a segment."""
    with mooncake_master(tmp_path / "master.log") as config:
        counters = [TierCounters(), TierCounters()]
        stores = [SegmentStore(compat.storage_backend("mooncake", config, "tiny", 0, 1), LAYOUT, c) for c in counters]
        seg, tenant_b = segment(tuple(range(300))), segment(tuple(range(300)), namespace="b", seed=1)
        assert stores[1].load(seg.key, seg.token_ids) is None  # missing: a miss, not a fault
        for store in stores:  # both write the same segment: one object, every read good
            store.save(seg)
        assert all(store.flush() for store in stores)
        for store in stores:
            loaded = store.load(seg.key, seg.token_ids)
            assert loaded is not None and same(loaded, seg)

        raw = stores[0].backend.backend.store  # Mooncake's own client, to put damaged objects
        good = bytes(encode(seg, LAYOUT).numpy())
        name = LAYOUT.store_key(seg.key)
        for damaged in (good[:-8], good + b"\0" * 8, good[:200] + bytes([good[200] ^ 1]) + good[201:],
                        bytes(encode(tenant_b, LAYOUT).numpy())):
            assert raw.remove(name, True) == 0 and raw.put(name, damaged) == 0
            stores[1]._missed.clear()
            assert stores[1].load(seg.key, seg.token_ids) is None
        assert dict(counters[1].store_faults) == {"corrupt": 2, "unreadable": 1, "foreign": 1}
        assert raw.remove(name, True) == 0 and raw.put(name, good) == 0
        loaded = stores[1].load(seg.key, seg.token_ids)
        assert loaded is not None and same(loaded, seg)
