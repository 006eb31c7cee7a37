"""Pre-warming a corpus: the segments' KV computed ahead of traffic, behind a shared sink prefix.

A pre-warmed segment is prefilled as ``sink prefix + segment`` with the segment marked, so the cache keeps
the segment's own KV as a node whose context is the sink prefix, and writes it to the tiers like any segment.
Without a prefix a segment computed alone from position 0 makes its first token an attention sink (Qwen
tokenizers add no BOS), and that sink then sits mid-prompt wherever the segment is reused; behind the chat
template's opening, the segment's tokens saw the same sink every real prompt has (docs/how-it-works.md,
"Pre-warming"). A request whose first segment follows that very opening even gets an exact prefix hit.

Engine-free: ``encode`` is any ``str -> list[int]`` callable; the adapter submits the requests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sparsex_sgl.core.errors import InvalidSegmentsError
from sparsex_sgl.core.protocol import NAMESPACE_KEY, RATIO_KEY, SPANS_KEY, check_vocabulary, short

MAX_SEGMENTS = 256
"""Segments in one pre-warm call (the CLI sends a corpus in calls of this size or fewer)."""
CHAT_MARKER = "\u2063SPARSEX_CONTENT\u2063"
"""Stands for the message while the template renders (invisible separators: no template strips them)."""


def chat_frame(tokenizer: Any) -> tuple[str, str]:
    """The chat template's text before and after one user message (generation prompt included); a
    tokenizer without a template has no opening."""
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_MARKER}], tokenize=False,
                                                 add_generation_prompt=True)
        head, tail = rendered.split(CHAT_MARKER)
        return head, tail
    return "", "\nAnswer:"


@dataclass(frozen=True)
class PrewarmItem:
    """One segment to pre-warm: the prompt ``sink + segment`` and the segment's span in it."""

    input_ids: tuple[int, ...]
    span: tuple[int, int]

    @property
    def tokens(self) -> int:
        """The segment's own tokens (the sink prefix not counted)."""
        return self.span[1] - self.span[0]

    def sampling_params(self, namespace: str | None) -> dict[str, Any]:
        """A prefill without decoding, at ratio 1.0 (anything the request could reuse is recomputed, so what
        it caches is exact), with the segment marked."""
        custom: dict[str, Any] = {SPANS_KEY: list(self.span), RATIO_KEY: 1.0}
        if namespace:
            custom[NAMESPACE_KEY] = namespace
        return {"max_new_tokens": 0, "temperature": 0.0, "custom_params": custom}


@dataclass(frozen=True)
class PrewarmRequest:
    """One pre-warm call: its segments, and the isolation fields every request of a tenant sends (segments
    are shared only between requests whose namespace, ``extra_key`` and ``cache_salt`` are all equal)."""

    items: tuple[PrewarmItem, ...]
    namespace: str | None
    extra_key: str | None
    cache_salt: str | None

    @property
    def tokens(self) -> int:
        return sum(item.tokens for item in self.items)


def parse_prewarm(body: object, encode: Callable[[str], list[int]], default_sink: str, vocab_size: int,
                  max_tokens: int, min_segment_tokens: int) -> PrewarmRequest:
    """Check a pre-warm call as a whole (``InvalidSegmentsError`` names the first problem, so nothing is
    submitted from a call that fails) and build its prompts.

    ``{"segments": [text | [token ids]], "namespace": str, "extra_key": str, "cache_salt": str,
    "sink_prefix": text | [ids]}``;
    ``sink_prefix`` defaults to ``default_sink`` (the chat template's opening), "" or [] for none."""
    if not isinstance(body, Mapping):
        raise InvalidSegmentsError(f"a pre-warm call is a JSON object, got {type(body).__name__}")
    unknown = set(body) - {"segments", "namespace", "extra_key", "cache_salt", "sink_prefix"}
    if unknown:
        raise InvalidSegmentsError(f"unknown pre-warm keys {sorted(unknown)}; valid: cache_salt, extra_key, "
                                   "namespace, segments, sink_prefix")
    segments = body.get("segments")
    if not isinstance(segments, list) or not segments:
        raise InvalidSegmentsError(f"'segments' must be a non-empty list of texts or token-id lists, got {short(segments)}")
    if len(segments) > MAX_SEGMENTS:
        raise InvalidSegmentsError(f"at most {MAX_SEGMENTS} segments per call, got {len(segments)}")
    for key in ("namespace", "extra_key", "cache_salt"):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise InvalidSegmentsError(f"{key!r} must be a string, got {short(body[key])}")
    sink = _token_ids(body.get("sink_prefix", default_sink), encode, vocab_size, "sink_prefix", allow_empty=True)
    items = []
    for index, segment in enumerate(segments):
        ids = _token_ids(segment, encode, vocab_size, f"segments[{index}]", allow_empty=False)
        if len(ids) < min_segment_tokens:
            raise InvalidSegmentsError(f"segments[{index}] has {len(ids)} tokens; segments shorter than "
                                       f"{min_segment_tokens} are not cached as segments")
        if len(sink) + len(ids) + 1 > max_tokens:
            raise InvalidSegmentsError(f"segments[{index}]: {len(sink) + len(ids)} tokens with the sink prefix, "
                                       f"over the model's {max_tokens - 1}")
        items.append(PrewarmItem(tuple(sink) + tuple(ids), (len(sink), len(sink) + len(ids))))
    return PrewarmRequest(tuple(items), body.get("namespace") or None, body.get("extra_key"), body.get("cache_salt"))


def _token_ids(value: object, encode: Callable[[str], list[int]], vocab_size: int, name: str,
               allow_empty: bool) -> list[int]:
    if isinstance(value, str):
        ids = encode(value) if value else []
    elif isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        ids = list(value)
        check_vocabulary(ids, vocab_size, name)
    else:
        raise InvalidSegmentsError(f"{name} must be a text or a list of token ids, got {short(value)}")
    if not ids and not allow_empty:
        raise InvalidSegmentsError(f"{name} is empty")
    return ids


def load_corpus(lines: Sequence[str]) -> list[str | list[int]]:
    """A corpus file's segments: JSON lines, each a string, ``{"text": ...}`` or ``{"input_ids": [...]}``."""
    import json

    out: list[str | list[int]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"line {number}: not JSON ({exc})") from None
        if isinstance(value, dict):
            value = value.get("text", value.get("input_ids"))
        if not isinstance(value, (str, list)):
            raise ValueError(f"line {number}: a segment is a string, {{\"text\": ...}} or {{\"input_ids\": [...]}}")  # noqa: TRY004 - a corpus file error, reported as one line
        out.append(value)
    return out
