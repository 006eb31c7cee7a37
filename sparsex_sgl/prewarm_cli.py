"""``sparsex-sgl prewarm``: send a corpus to a server's ``/sparsex/prewarm`` in calls, with a progress bar.

Resumable: after each call that succeeded, the number of corpus segments done is written (atomically) to a
state file beside the corpus (``--state``); a rerun skips them. A call the server refuses (400: bad input)
stops the run at that call, since every later call would need the same fix.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import httpx
from tqdm import tqdm

from sparsex_sgl.client import SparseXClient
from sparsex_sgl.core.prewarm import MAX_SEGMENTS, load_corpus


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("corpus", type=Path, help="JSON lines: a string, {\"text\": ...} or {\"input_ids\": [...]}")
    parser.add_argument("--url", default="http://127.0.0.1:30000", help="the --enable-sparsex server")
    parser.add_argument("--namespace", default=None, help="the tenant namespace its requests send")
    parser.add_argument("--extra-key", default=None, help="SGLang's extra_key its requests send")
    parser.add_argument("--cache-salt", default=None, help="SGLang's cache_salt its requests send")
    parser.add_argument("--sink-prefix", default=None,
                        help="text every segment is prefilled behind (default: the chat template's opening; '' none)")
    parser.add_argument("--batch", type=int, default=32, help=f"segments per call (at most {MAX_SEGMENTS})")
    parser.add_argument("--state", type=Path, default=None, help="progress file (default: CORPUS.prewarm)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    if not 1 <= args.batch <= MAX_SEGMENTS:
        raise SystemExit(f"--batch must be in [1, {MAX_SEGMENTS}], got {args.batch}")
    try:
        segments = load_corpus(args.corpus.read_text().splitlines())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{args.corpus}: {exc}") from None
    state = args.state or args.corpus.with_name(args.corpus.name + ".prewarm")
    done = int(json.loads(state.read_text())["done"]) if state.exists() else 0
    client = SparseXClient(args.url)
    isolation = {k: v for k, v in (("extra_key", args.extra_key), ("cache_salt", args.cache_salt)) if v is not None}
    with tqdm(total=len(segments), initial=done, unit="seg", desc="prewarm") as bar:
        while done < len(segments):
            batch = segments[done : done + args.batch]
            try:
                client.prewarm(batch, args.namespace, args.sink_prefix, **isolation)
            except httpx.HTTPStatusError as exc:
                raise SystemExit(f"segments {done}..{done + len(batch) - 1}: {exc.response.status_code} "
                                 f"{exc.response.text[:300]}") from None
            done += len(batch)
            _save(state, done)
            bar.update(len(batch))
    print(f"prewarmed {done} segments; progress in {state}")


def _save(state: Path, done: int) -> None:
    tmp = state.with_name(state.name + ".tmp")
    tmp.write_text(json.dumps({"done": done}))
    os.replace(tmp, state)
