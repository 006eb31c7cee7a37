"""Client segment data: the custom_params wire format and the in-band text markers (no server)."""

from __future__ import annotations

import pytest

from sparsex_sgl.errors import InvalidSegmentsError
from sparsex_sgl.frontend import segment
from sparsex_sgl.protocol import (
    MARKER_BEGIN,
    MARKER_END,
    TextPiece,
    check_custom_params,
    encode_pieces,
    parse_spans,
    split_listed_segments,
    split_marked_text,
)
from sparsex_sgl.segments import split_into_pieces


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
