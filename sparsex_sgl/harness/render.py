"""A workload request as token ids and segment spans for one tokenizer.

The messages go through the model's chat template with a placeholder per message; the template's own
text (role headers, end-of-turn tokens, the generation prompt) becomes non-segment pieces, and each
message's pieces are tokenized alone (``protocol.encode_pieces``), so a segment has the same token ids
wherever it appears. The harness sends these ids, with the spans, to every system under test, so stock
SGLang and SparseX compute on identical tokens.
"""

from __future__ import annotations

from typing import Any

from sparsex_sgl.core.protocol import TextPiece, encode_pieces
from sparsex_sgl.harness.workloads import WorkloadRequest

_PLACEHOLDER = "\u2063SX_MESSAGE_{}\u2063"


def _template_pieces(request: WorkloadRequest, tokenizer: Any) -> list[TextPiece]:
    placeholders = [_PLACEHOLDER.format(i) for i in range(len(request.messages))]
    if getattr(tokenizer, "chat_template", None):
        chat = [{"role": m.role, "content": p} for m, p in zip(request.messages, placeholders)]
        rendered = str(tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    else:
        rendered = "".join(f"{m.role}: {p}\n" for m, p in zip(request.messages, placeholders)) + "assistant:"
    pieces: list[TextPiece] = []
    for message, placeholder in zip(request.messages, placeholders):
        before, rendered = rendered.split(placeholder, 1)
        pieces += [TextPiece(before, False), *message.pieces]
    pieces.append(TextPiece(rendered, False))
    return [p for p in pieces if p.text]


def render(request: WorkloadRequest, tokenizer: Any) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of the whole prompt and the ``[start, end)`` spans of its segments."""
    pieces = _template_pieces(request, tokenizer)

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    return encode_pieces(pieces, encode, encode)
