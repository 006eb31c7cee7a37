"""Segment identity and the split of a prompt into pieces.

A prompt is partitioned into *pieces*: the client-marked segments (reusable anywhere) and the gaps
between them (instructions, questions: reusable only as part of an exact prefix). Every piece has a
128-bit identity, a BLAKE2b hash over its token ids keyed by a *namespace key*, so that tenants that
must not share KV never share an identity. The namespace key is itself a SHA-256 of the length-prefixed
isolation fields (``namespace_key``), so no two different field tuples map to one key, however long or
oddly punctuated they are. A hash hit is only a candidate: the graph confirms it by comparing token ids,
because a collision must never serve another segment's KV.
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from hashlib import blake2b, sha256
from typing import NewType

import numpy as np

from sparsex_sgl.core.errors import InvalidSegmentsError

SegmentHash = NewType("SegmentHash", bytes)
"""16 bytes: BLAKE2b-128 of the token ids, keyed by the namespace."""

HASH_BYTES = 16

NamespaceKey = NewType("NamespaceKey", bytes)
"""The BLAKE2b key of an isolation domain: empty (no isolation) or a ``namespace_key`` digest."""
SHARED = NamespaceKey(b"")


def namespace_key(*fields: str | None) -> NamespaceKey:
    """SHA-256 over the fields, each length-prefixed and tagged None or text: ``("a|b", "c")`` and
    ``("a", "b|c")``, ``None`` and ``""``, or two values sharing a long prefix all give different keys."""
    digest = sha256()
    for value in fields:
        data = b"" if value is None else value.encode("utf-8", "surrogatepass")
        digest.update(b"\x00" if value is None else b"\x01")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return NamespaceKey(digest.digest())


def segment_hash(token_ids: Sequence[int], namespace: NamespaceKey = SHARED) -> SegmentHash:
    """128-bit identity of a token sequence within a namespace."""
    digest = blake2b(array("q", token_ids).tobytes(), digest_size=HASH_BYTES, key=namespace)
    return SegmentHash(digest.digest())


@dataclass(frozen=True)
class Piece:
    """A contiguous span ``[start, end)`` of the prompt.

    ``reusable`` pieces are client-marked segments whose KV may be reused at another position;
    the others (gaps) are reused only when they lie on an exact cached prefix path.
    """

    start: int
    end: int
    token_ids: tuple[int, ...]
    key: SegmentHash
    reusable: bool

    @property
    def length(self) -> int:
        return self.end - self.start


def validate_spans(spans: object, n_tokens: int) -> list[tuple[int, int]]:
    """Check client segment spans and return them sorted.

    Raises InvalidSegmentsError for anything that is not a list of ``(start, end)`` integer pairs
    with ``0 <= start < end <= n_tokens`` that do not overlap.
    """
    if not isinstance(spans, (list, tuple)):
        raise InvalidSegmentsError(f"segment spans must be a list of [start, end] pairs, got {type(spans).__name__}")
    checked: list[tuple[int, int]] = []
    for span in spans:
        if (
            not isinstance(span, (list, tuple))
            or len(span) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in span)
        ):
            raise InvalidSegmentsError(f"each segment span must be a pair of integers [start, end], got {repr(span)[:60]}")
        start, end = span
        if start < 0 or end > n_tokens:
            raise InvalidSegmentsError(f"segment span {list(span)} lies outside the prompt of {n_tokens} tokens")
        if end <= start:
            raise InvalidSegmentsError(f"segment span {list(span)} is empty or reversed")
        checked.append((start, end))
    checked.sort()
    for (s0, e0), (s1, e1) in itertools.pairwise(checked):
        if s1 < e0:
            raise InvalidSegmentsError(f"segment spans [{s0}, {e0}] and [{s1}, {e1}] overlap")
    return checked


def make_piece(token_ids: Sequence[int], start: int, end: int, namespace: NamespaceKey, reusable: bool) -> Piece:
    """The piece ``[start, end)`` of ``token_ids``, with its identity in ``namespace``."""
    ids = tuple(int(t) for t in token_ids[start:end])
    return Piece(start, end, ids, segment_hash(ids, namespace), reusable)


def cut_gap(token_ids: Sequence[int], start: int, end: int, namespace: NamespaceKey = SHARED,
            gap_block: int | None = None) -> list[Piece]:
    """The gap ``[start, end)`` as pieces: one, or blocks of ``gap_block`` tokens counted from ``start``."""
    if gap_block is not None and gap_block < 1:
        raise ValueError(f"gap_block must be >= 1, got {gap_block}")
    step = gap_block or (end - start)
    return [make_piece(token_ids, s, min(s + step, end), namespace, reusable=False) for s in range(start, end, step)]


def split_into_pieces(
    token_ids: Sequence[int], spans: object, namespace: NamespaceKey = SHARED, gap_block: int | None = None
) -> list[Piece]:
    """Partition a prompt into reusable segments (the given spans) and the gaps between them.

    With ``gap_block``, gaps are cut into blocks of that many tokens counted from the gap's start, so
    two prompts that share only the beginning of a gap (a system prompt, an earlier chat turn) still
    share its leading blocks as an exact prefix (``SegmentGraph.align`` follows cached cuts elsewhere).
    """
    if gap_block is not None and gap_block < 1:
        raise ValueError(f"gap_block must be >= 1, got {gap_block}")
    n = len(token_ids)
    if n == 0:
        raise InvalidSegmentsError("the prompt is empty")
    pieces: list[Piece] = []
    cursor = 0
    for start, end in validate_spans(spans, n):
        if start > cursor:
            pieces += cut_gap(token_ids, cursor, start, namespace, gap_block)
        pieces.append(make_piece(token_ids, start, end, namespace, reusable=True))
        cursor = end
    if cursor < n:
        pieces += cut_gap(token_ids, cursor, n, namespace, gap_block)
    return pieces


AUTO_WINDOW = 8
"""Tokens that decide an automatic boundary: the same 8 tokens give the same boundary in any context."""
_WINDOW_MULTIPLIERS = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93,
                                0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 0x94D049BB133111EB, 0xBF58476D1CE4E5B9],
                               dtype=np.uint64)


def auto_spans(token_ids: Sequence[int], average: int) -> list[tuple[int, int]]:
    """Segments found without client markers, by content-defined chunking of the token ids.

    A boundary follows position ``i`` when a hash of the ``AUTO_WINDOW`` tokens ending at ``i`` is 0 mod
    ``average``, so a passage that recurs in another prompt, at another offset and after other text, is
    cut at the same places from its first boundary on, and those chunks are found in the graph like
    client-marked segments. Chunks are at least ``average // 4`` and at most ``4 * average`` tokens (about
    ``average`` plus the minimum on random text). The text before the first boundary (a chunk there would
    start at an arbitrary point, the prompt's start) and after the last one (typically the question) is
    not a segment: it stays a gap, cut in blocks, so a prefix hit there keeps a gap's block granularity.
    This is the rolling-hash detection of LMCache's blending, on tokens.
    """
    if average < 4:
        raise ValueError(f"the average automatic segment must be >= 4 tokens, got {average}")
    ids = np.asarray(token_ids, dtype=np.int64).astype(np.uint64)
    n = len(ids)
    if n < AUTO_WINDOW:
        return []
    windows = np.lib.stride_tricks.sliding_window_view(ids, AUTO_WINDOW)  # [n - W + 1, W]
    with np.errstate(over="ignore"):
        h = (windows * _WINDOW_MULTIPLIERS).sum(axis=1, dtype=np.uint64)
        h ^= h >> np.uint64(31)
        h *= np.uint64(0x7FB5D329728EA185)
        h ^= h >> np.uint64(27)
    candidates = (np.flatnonzero(h % np.uint64(average) == 0) + AUTO_WINDOW).tolist()  # boundary after the window
    minimum, maximum = average // 4, 4 * average
    spans: list[tuple[int, int]] = []
    start: int | None = None
    for end in candidates:
        if start is None:
            start = end
            continue
        while end - start > maximum:
            spans.append((start, start + maximum))
            start += maximum
        if end - start >= minimum:
            spans.append((start, end))
            start = end
    return spans
