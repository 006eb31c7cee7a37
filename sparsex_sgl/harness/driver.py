"""Load driver for any SGLang HTTP endpoint: open-loop Poisson arrivals or a fixed concurrency, streaming.

Each request goes to ``POST /generate`` with its token ids, greedy sampling and the segment spans in
``custom_params`` (a stock server ignores them), streamed, so the first chunk gives the time to first
token and the later chunks the inter-token latency. Failures (HTTP errors, timeouts, broken streams)
are recorded per request, never raised: one bad request does not end a run, and an interrupted run
still returns what finished (``results`` is filled as requests complete).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from tqdm import tqdm

from sparsex_sgl.client import reuse_counts
from sparsex_sgl.core.protocol import SPANS_KEY, flatten_spans


@dataclass(frozen=True)
class PreparedRequest:
    """A workload request rendered for one tokenizer (the same ids go to every system)."""

    id: str
    input_ids: list[int]
    spans: list[tuple[int, int]]
    max_new_tokens: int

    def body(self) -> dict[str, Any]:
        params: dict[str, Any] = {"temperature": 0.0, "max_new_tokens": self.max_new_tokens}
        if self.spans:
            params["custom_params"] = {SPANS_KEY: flatten_spans(self.spans)}
        return {"input_ids": self.input_ids, "sampling_params": params, "stream": True}


@dataclass
class RequestResult:
    """What one request did. Times in seconds; ``arrival`` is relative to the start of the run."""

    id: str
    arrival: float
    ok: bool = False
    error: str = ""
    ttft: float | None = None
    latency: float | None = None
    token_gaps: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    reuse: dict[str, Any] = field(default_factory=dict)
    text: str = ""


def arrival_times(n: int, rate: float | None, seed: int) -> list[float]:
    """Open-loop Poisson arrivals at ``rate`` requests/s (exponential gaps, seeded); all at 0 if no rate."""
    if rate is None:
        return [0.0] * n
    rng = random.Random(seed)
    times, now = [], 0.0
    for _ in range(n):
        times.append(now)
        now += rng.expovariate(rate)
    return times


async def _one(client: httpx.AsyncClient, url: str, request: PreparedRequest, result: RequestResult,
               timeout: float) -> None:
    try:
        await asyncio.wait_for(_stream(client, url, request, result), timeout)
    except asyncio.TimeoutError:
        result.error = f"timeout after {timeout:.0f} s"
    except (httpx.HTTPError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:300]


async def _stream(client: httpx.AsyncClient, url: str, request: PreparedRequest, result: RequestResult) -> None:
    start = time.perf_counter()
    last_time, last_tokens = start, 0
    async with client.stream("POST", url + "/generate", json=request.body()) as response:
        if response.status_code != 200:
            result.error = f"HTTP {response.status_code}: {(await response.aread()).decode('utf-8', 'replace')[:300]}"
            return
        meta: dict[str, Any] = {}
        async for raw in response.aiter_lines():
            line = raw.strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data:"):])
            if "error" in chunk:
                result.error = f"stream error: {str(chunk['error'])[:300]}"
                return
            now = time.perf_counter()
            meta = chunk.get("meta_info", {})
            tokens = int(meta.get("completion_tokens", last_tokens + 1))
            if result.ttft is None:
                result.ttft = now - start
            elif tokens > last_tokens:
                gap = (now - last_time) / (tokens - last_tokens)
                result.token_gaps.extend([gap] * (tokens - last_tokens))
            last_time, last_tokens = now, tokens
            result.text = chunk.get("text", result.text)
        if result.ttft is None:
            result.error = "the stream ended without a chunk"
            return
        result.latency = time.perf_counter() - start
        result.output_tokens = last_tokens
        result.prompt_tokens = int(meta.get("prompt_tokens", len(request.input_ids)))
        result.cached_tokens = int(meta.get("cached_tokens", 0))
        result.reuse = dict(reuse_counts(meta))
        result.ok = True


async def run_load(url: str, requests: list[PreparedRequest], results: list[RequestResult], *,
                   rate: float | None = None, concurrency: int | None = None, seed: int = 0,
                   timeout: float = 900.0, progress: bool = True, label: str = "") -> float:
    """Send ``requests`` in order; returns the makespan (s). ``rate``: Poisson arrivals; else ``concurrency``
    requests in flight (1 when neither is given). Appends to ``results`` as requests complete."""
    if rate is not None and rate <= 0:
        raise ValueError("rate must be positive")
    limit = asyncio.Semaphore(concurrency or (len(requests) if rate is not None else 1))
    arrivals = arrival_times(len(requests), rate, seed)
    bar = tqdm(total=len(requests), desc=label or url, unit="req", disable=not progress)
    started = time.perf_counter()
    unlimited = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(limits=unlimited, timeout=httpx.Timeout(timeout)) as client:

        async def send(request: PreparedRequest, at: float) -> None:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - started)))
            async with limit:
                result = RequestResult(request.id, arrival=time.perf_counter() - started)
                await _one(client, url, request, result, timeout)
            results.append(result)
            bar.update(1)
            bar.set_postfix(errors=sum(not r.ok for r in results))

        await asyncio.gather(*(send(r, t) for r, t in zip(requests, arrivals)))
    bar.close()
    return time.perf_counter() - started
