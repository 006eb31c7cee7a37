"""Client helpers: mark segments from SGLang programs and plain HTTP.

In an ``@sgl.function``, append retrieved chunks with ``s += segment(chunk)``: the chunk travels inside
in-band markers that a ``--enable-sparsex --sparsex-markers`` server turns into token spans (each segment
tokenized on its own, so it has the same ids wherever it appears)::

    import sglang as sgl
    from sparsex_sgl import client as sx

    @sgl.function
    def rag(s, chunks, question):
        s += "Answer from the documents.\\n\\n"
        for chunk in chunks:
            s += sx.segment(chunk)
        s += "Question: " + question + "\\nAnswer:" + sgl.gen("answer", max_tokens=32, temperature=0)

Over HTTP, ``SparseXClient.generate`` sends the prompt text with its segment texts listed in
``custom_params`` and returns SGLang's reply, whose ``meta_info["cached_tokens_details"]`` carries the
``sparsex_*`` counts. Requests built by hand can instead send ``input_ids`` with
``custom_params={"sparsex_spans": [start0, end0, ...]}`` (see ``sparsex_sgl.core.protocol``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from sparsex_sgl.core.protocol import MARKER_BEGIN, MARKER_END, RATIO_KEY, SEGMENTS_KEY


def segment(text: str) -> str:
    """``text`` wrapped in the in-band segment markers (for ``s += segment(chunk)``)."""
    if MARKER_BEGIN in text or MARKER_END in text:
        raise ValueError("a segment cannot contain the segment markers itself")
    return f"{MARKER_BEGIN}{text}{MARKER_END}"


@dataclass(frozen=True)
class Segment:
    """A reusable piece of a prompt for ``SparseXClient.generate``."""

    text: str


def reuse_counts(meta_info: Mapping[str, Any]) -> dict[str, int | str]:
    """The ``sparsex_*`` entries of a reply's ``meta_info`` (empty on a stock server)."""
    details = meta_info.get("cached_tokens_details") or {}
    return {k[len("sparsex_"):]: v for k, v in details.items() if k.startswith("sparsex_")}


class SparseXClient:
    """Minimal HTTP client for a ``--enable-sparsex`` SGLang server (httpx, as SGLang's OpenAI SDK uses)."""

    def __init__(self, base_url: str, timeout: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def _request(self, path: str, payload: Mapping[str, Any] | None = None) -> Any:
        url = self.base_url + path
        response = (httpx.get(url, timeout=self.timeout) if payload is None
                    else httpx.post(url, json=dict(payload), timeout=self.timeout))
        response.raise_for_status()
        if "json" not in response.headers.get("content-type", ""):
            return response.text  # /flush_cache answers in plain text
        return response.json()

    def generate(self, pieces: Sequence[str | Segment], sampling_params: Mapping[str, Any] | None = None,
                 recompute_ratio: float | None = None) -> dict[str, Any]:
        """Generate from the concatenated pieces; ``Segment`` pieces are reusable anywhere."""
        params = dict(sampling_params or {})
        custom = dict(params.get("custom_params") or {})
        custom[SEGMENTS_KEY] = [p.text for p in pieces if isinstance(p, Segment)]
        if recompute_ratio is not None:
            custom[RATIO_KEY] = recompute_ratio
        params["custom_params"] = custom
        text = "".join(p.text if isinstance(p, Segment) else p for p in pieces)
        result: dict[str, Any] = self._request("/generate", {"text": text, "sampling_params": params})
        return result

    def prewarm(self, segments: Sequence[str | Sequence[int]], namespace: str | None = None,
                sink_prefix: str | Sequence[int] | None = None, **isolation: str) -> dict[str, Any]:
        """Compute ``segments`` (texts or token ids) ahead of traffic (``POST /sparsex/prewarm``): each behind
        the sink prefix (default: the chat template's opening), cached and stored without it. ``isolation``:
        ``extra_key`` / ``cache_salt``, as the tenant's requests send them."""
        payload: dict[str, Any] = {"segments": [s if isinstance(s, str) else list(s) for s in segments], **isolation}
        if namespace is not None:
            payload["namespace"] = namespace
        if sink_prefix is not None:
            payload["sink_prefix"] = sink_prefix if isinstance(sink_prefix, str) else list(sink_prefix)
        reply: dict[str, Any] = self._request("/sparsex/prewarm", payload)
        return reply

    def stats(self) -> list[dict[str, Any]]:
        """Cumulative SparseX counters of every scheduler (``GET /sparsex/stats``)."""
        reply: dict[str, Any] = self._request("/sparsex/stats")
        return list(reply["schedulers"])

    def flush_cache(self) -> None:
        """Drop every cached segment (SGLang's ``/flush_cache``; only succeeds when the server is idle)."""
        self._request("/flush_cache", {})
