"""Exception types raised by the SparseX core.

They are split by who is at fault, so that the engine adapter can map each to the right reaction:
bad client input becomes a 400-class error, an unsupported model or feature becomes a logged fallback
to exact full prefill, and a hash collision is never silently served as a cache hit.
"""

from __future__ import annotations


class SparseXError(Exception):
    """Base class of every error the SparseX core raises on purpose."""


class InvalidSegmentsError(SparseXError, ValueError):
    """Segment data from a client is malformed: empty, overlapping, out of range or of a wrong type."""


class UnsupportedModelError(SparseXError, NotImplementedError):
    """The model, its RoPE configuration or an option cannot be served by SparseX exactly.

    The remedy is named in the message; an engine falls back to exact full prefill for such requests.
    """


class SegmentHashCollisionError(SparseXError):
    """Two different token sequences produced the same 128-bit segment hash.

    Raised instead of returning another segment's KV: reusing it would produce a wrong answer.
    """
