"""Time to first token: stock SGLang (radix cache) against ``--enable-sparsex``, side by side in one run.

Both servers run on this machine at once (``--sleep-on-idle`` so the idle one does not spin) and get the
same requests, alternately, one at a time. Per HotpotQA question the stream is: the paragraphs in one
order (both servers compute it fully and cache it), then ``--orders`` more requests with the same
paragraphs in new orders (stock SGLang reuses only the identical prefix; SparseX reuses every paragraph).
TTFT is measured on the reordered requests with streaming (first chunk), and each answer is then
generated greedily to compare with full prefill (the stock server's answer: its radix cache only
reuses exact prefixes, so it is exact).

    .venv/bin/python bench/ttft_server.py --questions 8 --orders 2 --out bench/results/ttft-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from sparsex_sgl.assets import hotpotqa_path, resolve_model
from sparsex_sgl.eval.hotpotqa import build_prompt, exact_match, f1_score, load_examples
from sparsex_sgl.eval.server import Server, launch, wait_ready
from sparsex_sgl.frontend import reuse_counts
from sparsex_sgl.protocol import flatten_spans


def ttft(server: Server, ids: list[int], spans: list[int]) -> float:
    body = {"input_ids": ids, "stream": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": 1, "custom_params": {"sparsex_spans": spans}}}
    req = urllib.request.Request(server.url + "/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as resp:
        for line in resp:
            if line.startswith(b"data:"):
                return time.perf_counter() - start
    raise RuntimeError("no streamed chunk")


def answer(server: Server, ids: list[int], spans: list[int], max_new: int) -> dict[str, Any]:
    status, reply = server.post("/generate", {"input_ids": ids, "sampling_params": {
        "temperature": 0, "max_new_tokens": max_new, "custom_params": {"sparsex_spans": spans}}})
    if status != 200:
        raise RuntimeError(reply)
    return dict(reply)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--orders", type=int, default=2, help="reordered requests per question")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--sparsex-args", default="", help="extra flags for the SparseX server, e.g. '--sparsex-recompute-ratio 0.3'")
    ap.add_argument("--out", type=Path, default=Path("results/ttft-cpu.json"))
    args = ap.parse_args()

    from transformers import AutoTokenizer

    model = resolve_model("smollm2")
    tok = AutoTokenizer.from_pretrained(model)
    examples = load_examples(hotpotqa_path(), args.questions, args.offset)
    logs = Path(tempfile.mkdtemp(prefix="sparsex-bench-"))
    stock = launch(model, [], logs / "stock.log", max_total_tokens=32768)
    sparsex = launch(model, ["--enable-sparsex", *args.sparsex_args.split()], logs / "sparsex.log", max_total_tokens=32768)
    rows = []
    try:
        wait_ready(stock)
        wait_ready(sparsex)
        for example in examples:
            for seed in range(args.orders + 1):
                prompt = build_prompt(tok, example, seed)
                ids, spans = list(prompt.input_ids), flatten_spans(prompt.spans)
                t_stock, t_sparsex = ttft(stock, ids, spans), ttft(sparsex, ids, spans)
                if seed == 0:
                    continue  # the cold request that fills both caches
                full = answer(stock, ids, spans, args.max_new_tokens)
                reuse = answer(sparsex, ids, spans, args.max_new_tokens)
                counts = reuse_counts(reuse["meta_info"])
                rows.append({
                    "qid": example.qid, "seed": seed, "prompt_tokens": len(ids),
                    "ttft_stock_s": t_stock, "ttft_sparsex_s": t_sparsex,
                    "stock_cached_tokens": full["meta_info"]["cached_tokens"], **{f"sparsex_{k}": v for k, v in counts.items()},
                    "same_as_full": reuse["output_ids"] == full["output_ids"],
                    "f1_full": f1_score(full["text"], example.answer), "f1_sparsex": f1_score(reuse["text"], example.answer),
                    "em_full": exact_match(full["text"], example.answer), "em_sparsex": exact_match(reuse["text"], example.answer),
                })
                r = rows[-1]
                print(f"{example.qid[:10]} seed {seed}: {len(ids)} tokens, TTFT stock {t_stock:.2f} s, "
                      f"sparsex {t_sparsex:.2f} s ({t_stock / t_sparsex:.2f}x), reused {counts['reused']}, "
                      f"same answer {r['same_as_full']}", flush=True)
        stats = sparsex.get("/sparsex/stats")
    finally:
        stock.stop()
        sparsex.stop()

    ratios = [r["ttft_stock_s"] / r["ttft_sparsex_s"] for r in rows]
    summary = {
        "requests": len(rows),
        "prompt_tokens_mean": statistics.mean(r["prompt_tokens"] for r in rows),
        "ttft_stock_mean_s": statistics.mean(r["ttft_stock_s"] for r in rows),
        "ttft_sparsex_mean_s": statistics.mean(r["ttft_sparsex_s"] for r in rows),
        "speedup_of_means": statistics.mean(r["ttft_stock_s"] for r in rows) / statistics.mean(r["ttft_sparsex_s"] for r in rows),
        "speedup_median": statistics.median(ratios),
        "same_answer_share": statistics.mean(float(r["same_as_full"]) for r in rows),
        "f1_full": statistics.mean(r["f1_full"] for r in rows),
        "f1_sparsex": statistics.mean(r["f1_sparsex"] for r in rows),
        "em_full": statistics.mean(r["em_full"] for r in rows),
        "em_sparsex": statistics.mean(r["em_sparsex"] for r in rows),
        "reused_share": statistics.mean(r["sparsex_reused"] / r["prompt_tokens"] for r in rows),
    }
    print("\n| requests | prompt tokens | TTFT stock (s) | TTFT SparseX (s) | speedup (of means) | median speedup "
          "| same greedy answer as full | F1 full / SparseX |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {summary['requests']} | {summary['prompt_tokens_mean']:.0f} | {summary['ttft_stock_mean_s']:.2f} | "
          f"{summary['ttft_sparsex_mean_s']:.2f} | {summary['speedup_of_means']:.2f}x | {summary['speedup_median']:.2f}x | "
          f"{summary['same_answer_share']:.0%} | {summary['f1_full']:.3f} / {summary['f1_sparsex']:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "machine": platform.platform(),
                                    "summary": summary, "rows": rows, "sparsex_stats": stats}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
