"""``POST /sparsex/prewarm``: compute a corpus's segments ahead of traffic and keep them in the tiers.

Each segment is served as one prefill without decoding, ``sink prefix + segment`` with the segment marked
(``core.prewarm``), through SGLang's own ``/generate`` path; its checkpoint caches the segment's KV in the
pool and writes it to the store, like any segment a request computes. The call is checked as a whole before
anything is submitted: a bad call is a 400 and stores nothing.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sparsex_sgl.core.errors import InvalidSegmentsError
from sparsex_sgl.core.prewarm import chat_frame, parse_prewarm
from sparsex_sgl.sglang import compat
from sparsex_sgl.sglang.settings import server_config

PATH = "/sparsex/prewarm"


async def handle(request: Any, manager: Any, submit: compat.Submit) -> Any:
    """Pre-warm the call's segments; the reply gives each one's prompt and computed tokens."""
    from fastapi.responses import JSONResponse

    server_args, tokenizer, vocab = compat.tokenizer_parts(manager)
    config = server_config(server_args)
    try:
        body = await request.json()
    except ValueError:
        return JSONResponse({"error": "the body is not JSON"}, status_code=400)
    try:
        call = parse_prewarm(body, lambda text: list(tokenizer.encode(text, add_special_tokens=False)),
                             chat_frame(tokenizer)[0], vocab, compat.context_length(manager),
                             config.min_segment_tokens if config is not None else 1)
    except InvalidSegmentsError as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)
    replies = await asyncio.gather(*(submit(list(item.input_ids), item.sampling_params(call.namespace), call.extra_key,
                                            call.cache_salt) for item in call.items), return_exceptions=True)
    segments = []
    for item, reply in zip(call.items, replies):
        if isinstance(reply, BaseException):
            segments.append({"tokens": item.tokens, "error": str(reply)[:200]})
            continue
        details = reply["meta_info"].get("cached_tokens_details") or {}
        segments.append({"tokens": item.tokens, "computed": details.get("sparsex_computed"),
                         "fallback": details.get("sparsex_fallback", "")})
    failed = sum("error" in s for s in segments)
    return JSONResponse({"segments": segments, "tokens": call.tokens, "failed": failed},
                        status_code=500 if failed else 200)
