"""Client segment data: the custom_params wire format and the in-band text markers (no server)."""

from __future__ import annotations

import pytest

from sparsex_sgl.client import segment
from sparsex_sgl.core.errors import InvalidSegmentsError
from sparsex_sgl.core.protocol import (
    MARKER_BEGIN,
    MARKER_END,
    TextPiece,
    check_custom_params,
    encode_pieces,
    locate_segments,
    parse_spans,
    split_listed_segments,
    split_marked_text,
)
from sparsex_sgl.core.segments import split_into_pieces


def test_parse_spans_pairs_the_flat_list() -> None:
    assert parse_spans([3, 7, 9, 12]) == [(3, 7), (9, 12)]


@pytest.mark.parametrize(
    "custom, message",
    [
        ({"sparsex_spans": "3-7"}, "flat list"),
        ({"sparsex_spans": [3, 7.5]}, "integers"),
        ({"sparsex_spans": [True, 4]}, "integers"),
        ({"sparsex_spans": [3]}, "even length"),
        ({"sparsex_spans": [5, 5]}, "empty"),
        ({"sparsex_spans": [0, 8, 4, 10]}, "overlap"),
        ({"sparsex_segments": ["a", ""]}, "non-empty"),
        ({"sparsex_namespace": 3}, "string"),
        ({"sparsex_recompute_ratio": 1.5}, "[0, 1]"),
    ],
)
def test_check_custom_params_rejects(custom: dict, message: str) -> None:
    with pytest.raises(InvalidSegmentsError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_custom_params(custom)


def test_check_custom_params_accepts_valid_and_foreign_keys() -> None:
    check_custom_params({"sparsex_spans": [10, 20, 0, 5], "sparsex_recompute_ratio": 1, "thinking_budget": 3})
    check_custom_params(None)


def test_markers_split_text_and_segments_tokenize_alone() -> None:
    text = "head " + segment("alpha beta") + " mid " + segment("gamma") + " tail"
    pieces = split_marked_text(text)
    assert pieces == [TextPiece("head ", False), TextPiece("alpha beta", True), TextPiece(" mid ", False),
                      TextPiece("gamma", True), TextPiece(" tail", False)]

    def encode(t: str) -> list[int]:  # one id per character, with a BOS-like 0 on the first piece
        return [ord(c) for c in t]

    ids, spans = encode_pieces(pieces, lambda t: [0] + encode(t), encode)
    assert [ids[s:e] for s, e in spans] == [encode("alpha beta"), encode("gamma")]
    assert ids[0] == 0 and len(ids) == 1 + len(text) - 2 * len(MARKER_BEGIN + MARKER_END)


@pytest.mark.parametrize("text", [MARKER_BEGIN + "x", "x" + MARKER_END, MARKER_BEGIN + MARKER_BEGIN + "x" + MARKER_END])
def test_unbalanced_markers_are_errors(text: str) -> None:
    with pytest.raises(InvalidSegmentsError):
        split_marked_text(text)


def test_listed_segments_must_occur_in_order() -> None:
    assert [p.segment for p in split_listed_segments("a X b Y c", ["X", "Y"])] == [False, True, False, True, False]
    with pytest.raises(InvalidSegmentsError, match="does not occur"):
        split_listed_segments("a X b Y c", ["Y", "X"])


def test_gap_blocks_share_a_common_beginning() -> None:
    ids = list(range(40))
    longer = ids + [99, 98]
    a = split_into_pieces(ids, [], gap_block=16)
    b = split_into_pieces(longer, [], gap_block=16)
    assert [p.length for p in a] == [16, 16, 8]
    assert [p.key for p in a[:2]] == [p.key for p in b[:2]]  # the first two blocks match as a prefix
    assert a[2].key != b[2].key


def test_segments_are_located_in_a_chat_templates_ids(smollm2) -> None:  # type: ignore[no-untyped-def]
    """The chat template tokenizes the whole conversation at once: a segment that is a whole message is found
    whole (special tokens end BPE merges), one inside a message is found up to its merged edge tokens, and
    the span's ids are the segment's own wherever the conversation puts it."""
    from sparsex_sgl.assets import hotpotqa_path
    from sparsex_sgl.eval.hotpotqa import load_examples

    _, tok = smollm2
    docs = list(load_examples(hotpotqa_path(), 1, offset=7)[0].paragraphs[:3])
    own = [tok.encode(d, add_special_tokens=False) for d in docs]
    for order in ([0, 1, 2], [2, 0, 1]):
        messages = [{"role": "system", "content": "Answer from the documents."},
                    {"role": "user", "content": docs[order[0]]},
                    {"role": "user", "content": "".join(docs[i] for i in order[1:]) + "Question: who?"}]
        ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        spans = locate_segments(ids, [own[i] for i in order])
        assert spans[0][1] - spans[0][0] == len(own[order[0]])  # a whole message: found whole
        for (start, end), i in zip(spans, order, strict=True):
            assert end - start >= len(own[i]) - 4
            assert ids[start:end] == own[i][_at(own[i], ids[start:end]):][: end - start]  # the segment's own ids
    with pytest.raises(InvalidSegmentsError, match="does not occur"):
        locate_segments(ids, [own[1], own[1]])  # listed twice, present once


def _at(whole: list[int], part: list[int]) -> int:
    return next(i for i in range(len(whole)) if whole[i : i + len(part)] == part)
