"""How clients mark segments: the ``custom_params`` keys and the in-band text markers.

SGLang's ``sampling_params.custom_params`` accepts scalars, flat lists of scalars and flat dicts only
(nested lists fail the scheduler's typed decoder), so token spans travel as one flat list
``[start0, end0, start1, end1, ...]``. Clients that can send only text wrap each segment in
``MARKER_BEGIN ... MARKER_END``, or list the segment texts under ``SEGMENTS_KEY``; the server then
tokenizes each segment on its own, so a segment always has the same token ids wherever it appears
(tokenizing the whole prompt at once would merge tokens across segment boundaries and break reuse).

This module is engine-agnostic: ``encode`` is any ``str -> list[int]`` callable.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from sparsex_sgl.core.errors import InvalidSegmentsError

SPANS_KEY = "sparsex_spans"
"""Flat list of token offsets ``[s0, e0, s1, e1, ...]`` into the request's ``input_ids``."""
SEGMENTS_KEY = "sparsex_segments"
"""List of segment texts that occur verbatim in a text prompt."""
NAMESPACE_KEY = "sparsex_namespace"
"""Optional string: requests share segment KV only within one namespace (tenant isolation)."""
RATIO_KEY = "sparsex_recompute_ratio"
"""Optional float in [0, 1]: this request's recompute ratio (1.0 recomputes every reused token: exact)."""
APPROXIMATE_LOGPROBS_KEY = "sparsex_approximate_logprobs"
"""Optional bool: a request that asks for output-token logprobs may still reuse segments (its logprobs then
describe the reuse prefill it got); without it such a request runs exact full prefill. Prompt-token
logprobs always do: the sparse layers compute only some prompt rows."""
MARKERS_KEY = "sparsex_markers"
"""Optional bool: parse in-band markers in this text prompt (``--sparsex-markers`` does it for every
request). Off by default, so user text that happens to contain the markers is served as sent."""
KEYS = (SPANS_KEY, SEGMENTS_KEY, NAMESPACE_KEY, RATIO_KEY, APPROXIMATE_LOGPROBS_KEY, MARKERS_KEY)
MAX_ECHO = 60
"""Characters of an offending value quoted in an error: enough to find it, never the whole input."""


def short(value: object) -> str:
    """``repr(value)`` cut to ``MAX_ECHO`` characters, for error messages."""
    text = repr(value)
    return text if len(text) <= MAX_ECHO else text[: MAX_ECHO - 3] + "..."

MARKER_BEGIN = "<|sx_segment|>"
MARKER_END = "<|/sx_segment|>"


def check_vocabulary(token_ids: Sequence[int], vocab_size: int, name: str) -> None:
    """InvalidSegmentsError naming the first id of ``token_ids`` outside ``[0, vocab_size)``."""
    bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidSegmentsError(f"{name} holds token id {bad}, outside the vocabulary [0, {vocab_size})")


def parse_spans(value: object) -> list[tuple[int, int]]:
    """Pairs from the flat wire list; shape and type errors raise InvalidSegmentsError.

    Range checks need the prompt length and happen in ``segments.validate_spans``.
    """
    if not isinstance(value, (list, tuple)):
        raise InvalidSegmentsError(
            f"custom_params[{SPANS_KEY!r}] must be a flat list of token offsets [start0, end0, start1, end1, ...], "
            f"got {type(value).__name__}"
        )
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        raise InvalidSegmentsError(f"custom_params[{SPANS_KEY!r}] must hold integers only, got {short(value)}")
    if len(value) % 2:
        raise InvalidSegmentsError(
            f"custom_params[{SPANS_KEY!r}] must have an even length (start/end pairs), got {len(value)} values"
        )
    return [(int(value[i]), int(value[i + 1])) for i in range(0, len(value), 2)]


def flatten_spans(spans: Sequence[tuple[int, int]]) -> list[int]:
    """The wire form of span pairs."""
    return [x for span in spans for x in span]


def check_custom_params(custom: Mapping[str, object] | None) -> None:
    """Reject malformed SparseX keys early (shape, types, order, overlap); range is checked later."""
    if custom is None:
        return
    if not isinstance(custom, Mapping):
        raise InvalidSegmentsError(f"custom_params must be an object, got {type(custom).__name__}")
    if SPANS_KEY in custom and custom[SPANS_KEY] is not None:
        spans = parse_spans(custom[SPANS_KEY])
        for start, end in spans:
            if start < 0 or end <= start:
                raise InvalidSegmentsError(f"segment span [{start}, {end}] is negative, empty or reversed")
        ordered = sorted(spans)
        for (s0, e0), (s1, e1) in itertools.pairwise(ordered):
            if s1 < e0:
                raise InvalidSegmentsError(f"segment spans [{s0}, {e0}] and [{s1}, {e1}] overlap")
    if SEGMENTS_KEY in custom and custom[SEGMENTS_KEY] is not None:
        segs = custom[SEGMENTS_KEY]
        if not isinstance(segs, (list, tuple)) or not all(isinstance(s, str) and s for s in segs):
            raise InvalidSegmentsError(f"custom_params[{SEGMENTS_KEY!r}] must be a list of non-empty strings")
    if NAMESPACE_KEY in custom and not isinstance(custom[NAMESPACE_KEY], (str, type(None))):
        raise InvalidSegmentsError(f"custom_params[{NAMESPACE_KEY!r}] must be a string")
    parse_ratio(custom.get(RATIO_KEY))
    for key in (APPROXIMATE_LOGPROBS_KEY, MARKERS_KEY):
        if not isinstance(custom.get(key), (bool, type(None))):
            raise InvalidSegmentsError(f"custom_params[{key!r}] must be true or false")


def parse_ratio(value: object) -> float | None:
    """The per-request recompute ratio, or None when absent."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise InvalidSegmentsError(f"custom_params[{RATIO_KEY!r}] must be a number in [0, 1], got {short(value)}")
    return float(value)


@dataclass(frozen=True)
class TextPiece:
    """A piece of a text prompt; ``segment`` pieces are reusable."""

    text: str
    segment: bool


def split_marked_text(text: str) -> list[TextPiece]:
    """Split a prompt at ``MARKER_BEGIN``/``MARKER_END`` pairs (markers removed)."""
    pieces: list[TextPiece] = []
    cursor = 0
    while True:
        begin = text.find(MARKER_BEGIN, cursor)
        stray_end = text.find(MARKER_END, cursor)
        if begin < 0:
            if stray_end >= 0:
                raise InvalidSegmentsError(f"{MARKER_END!r} at character {stray_end} has no {MARKER_BEGIN!r}")
            if cursor < len(text):
                pieces.append(TextPiece(text[cursor:], segment=False))
            return pieces
        if 0 <= stray_end < begin:
            raise InvalidSegmentsError(f"{MARKER_END!r} at character {stray_end} has no {MARKER_BEGIN!r}")
        end = text.find(MARKER_END, begin + len(MARKER_BEGIN))
        if end < 0:
            raise InvalidSegmentsError(f"{MARKER_BEGIN!r} at character {begin} is never closed by {MARKER_END!r}")
        body = text[begin + len(MARKER_BEGIN) : end]
        if MARKER_BEGIN in body:
            raise InvalidSegmentsError("segment markers cannot nest")
        if begin > cursor:
            pieces.append(TextPiece(text[cursor:begin], segment=False))
        if body:
            pieces.append(TextPiece(body, segment=True))
        cursor = end + len(MARKER_END)


def split_listed_segments(text: str, segments: Sequence[str]) -> list[TextPiece]:
    """Split a prompt at the first occurrence, in order, of each listed segment text."""
    pieces: list[TextPiece] = []
    cursor = 0
    for seg in segments:
        at = text.find(seg, cursor)
        if at < 0:
            raise InvalidSegmentsError(
                f"segment text {short(seg)} does not occur in the prompt after character {cursor} "
                "(segments must be listed in prompt order and must not overlap)"
            )
        if at > cursor:
            pieces.append(TextPiece(text[cursor:at], segment=False))
        pieces.append(TextPiece(seg, segment=True))
        cursor = at + len(seg)
    if cursor < len(text):
        pieces.append(TextPiece(text[cursor:], segment=False))
    return pieces


def has_markers(text: str) -> bool:
    return MARKER_BEGIN in text or MARKER_END in text


def encode_pieces(
    pieces: Sequence[TextPiece],
    encode_first: Callable[[str], list[int]],
    encode_rest: Callable[[str], list[int]],
) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of the prompt and the token spans of its segments, each piece tokenized alone.

    ``encode_first`` tokenizes the first piece (adding the tokenizer's special tokens, e.g. BOS), and
    ``encode_rest`` the others (no special tokens).
    """
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    for index, piece in enumerate(pieces):
        toks = (encode_first if index == 0 else encode_rest)(piece.text)
        if piece.segment and toks:
            spans.append((len(ids), len(ids) + len(toks)))
        ids.extend(toks)
    return ids, spans


def locate_segments(input_ids: Sequence[int], segments: Sequence[Sequence[int]],
                    max_trim: int = 2) -> list[tuple[int, int]]:
    """Token spans of segments (each tokenized alone) inside a prompt that was tokenized as a whole: a chat
    template's ids, from ``/v1/chat/completions``.

    Each segment is found, in order, as a contiguous run of its own ids after the previous one. Where the
    template put it between other text, the tokenizer may have merged its first or last token with its
    neighbours; then the segment without up to ``max_trim`` tokens at each end is looked for, and its
    span is that interior (the merged edge tokens stay new text). A segment that is a whole message is
    found whole: the template's special tokens end BPE merges."""
    spans: list[tuple[int, int]] = []
    cursor = 0
    ids = list(input_ids)
    for index, seg in enumerate(segments):
        found = None
        for trim in range(max_trim + 1):
            for left, right in ((trim, 0), (0, trim), (trim, trim)) if trim else ((0, 0),):
                core = list(seg[left : len(seg) - right])
                if len(core) < 2:
                    continue
                at = _find(ids, core, cursor)
                if at >= 0:
                    found = (at, at + len(core))
                    break
            if found:
                break
        if found is None:
            raise InvalidSegmentsError(f"segment {index} does not occur in the prompt's tokens after token {cursor} "
                                       "(segments must be listed in prompt order and must not overlap)")
        spans.append(found)
        cursor = found[1]
    return spans


def _find(haystack: list[int], needle: list[int], start: int) -> int:
    """First index >= ``start`` where ``needle`` occurs in ``haystack``, or -1."""
    first, n = needle[0], len(needle)
    at = start
    while True:
        try:
            at = haystack.index(first, at)
        except ValueError:
            return -1
        if haystack[at : at + n] == needle:
            return at
        at += 1
