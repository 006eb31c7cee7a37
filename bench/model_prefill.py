"""Model-level prefill time: full prefill against SparseX prefill, with the reference executor.

A randomly initialised model of a real shape (the architecture's config, no weights needed) processes a
RAG-shaped prompt: a 64-token instruction, segments of ``--segment`` tokens cached alone beforehand, and
a 64-token question. Full prefill runs dense causal attention in every layer (FlashInfer when installed,
else SDPA); SparseX runs its selection (``--full-layers``, ``--ratio``, Sparse-Q): its full
layers on the same dense attention, then the shared sparse-extend pipeline (``sparse_extend.py``, the one
the SGLang adapter runs) on the Triton kernels. KV is laid out as SGLang's pool lays it out, per layer
``[slots, kv_heads, head_dim]``, the cached segments in allocator slots of their own. Times are medians of
``--repeats`` runs after one warm-up, measured side by side in one process (the segment graph's lookup,
host work, is timed apart); peak memory is the most the
prefill allocates above what was allocated before it (weights and the segment cache excluded).

    python bench/model_prefill.py --model qwen2.5-1.5b --lengths 8192,16384,32768 --out results/model_prefill.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from sparsex_sgl.eval.methods import method_config
from sparsex_sgl.reference import ReferenceExecutor
from sparsex_sgl.reference.cache import ReferenceSegmentCache

SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-1.5b": {"family": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "rope_theta": 1e6, "vocab_size": 151936},
    "llama-3-8b": {"family": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0, "vocab_size": 128256},
    "tiny": {"family": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0, "vocab_size": 1024},
}


def build_model(name: str, max_len: int, dtype: torch.dtype, device: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    shape = dict(SHAPES[name])
    config_class = {"qwen2": Qwen2Config, "llama": LlamaConfig}[shape.pop("family")]
    config = config_class(**shape, max_position_embeddings=max_len, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def peak_bytes(device: str, fn: Any, *args: Any) -> int | None:
    """Most bytes ``fn(*args)`` holds above what was allocated before it (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(*args)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def timed(repeats: int, device: str, fn: Any, *args: Any) -> float:
    """Median seconds of ``fn(*args)`` over ``repeats`` runs after a warm-up."""
    def once() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(*args)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    once()  # warm-up (kernel compilation, allocator)
    return statistics.median(once() for _ in range(repeats))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-1.5b", choices=sorted(SHAPES))
    ap.add_argument("--lengths", default="8192,16384,32768")
    ap.add_argument("--segment", type=int, default=512)
    ap.add_argument("--ratio", type=float, default=0.15)
    ap.add_argument("--full-layers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=Path("results/model_prefill.json"))
    args = ap.parse_args()
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lengths = [int(x) for x in args.lengths.split(",")]
    model = build_model(args.model, max(lengths) + 256, dtype, device)
    full_exec = ReferenceExecutor(model)  # every layer dense causal (kernels.dense)
    sparse_exec = ReferenceExecutor(model, kernels="triton" if device == "cuda" else "torch")
    config = method_config("sparsex", args.ratio, args.full_layers)
    assert config is not None
    vocab = SHAPES[args.model]["vocab_size"]
    rows = []
    for n in lengths:
        gen = torch.Generator().manual_seed(n)
        n_segments = (n - 128) // args.segment
        segs = [torch.randint(0, vocab, (args.segment,), generator=gen).tolist() for _ in range(n_segments)]
        head = torch.randint(0, vocab, (64,), generator=gen).tolist()
        question = torch.randint(0, vocab, (n - 64 - n_segments * args.segment,), generator=gen).tolist()
        ids, spans = list(head), []
        for seg in segs:
            spans.append([len(ids), len(ids) + len(seg)])
            ids += seg
        ids += question
        cache = ReferenceSegmentCache(sparse_exec, num_slots=n + 1)
        for seg in segs:
            assert cache.fill_segment(seg)
        lookup_s = timed(args.repeats, "cpu", cache.lookup, ids, spans)  # host work: the segment graph's lookup
        lookup = cache.lookup(ids, spans)
        full_s = timed(args.repeats, device, full_exec.prefill_full, ids)
        sparse_s = timed(args.repeats, device, sparse_exec.prefill_reuse, ids, lookup, cache.pool, config)
        stats = sparse_exec.prefill_reuse(ids, lookup, cache.pool, config).stats
        full_peak = peak_bytes(device, full_exec.prefill_full, ids)
        sparse_peak = peak_bytes(device, sparse_exec.prefill_reuse, ids, lookup, cache.pool, config)
        row = {"n": n, "segments": n_segments, "full_s": full_s, "sparsex_s": sparse_s, "lookup_s": lookup_s,
               "speedup": full_s / sparse_s, "speedup_with_lookup": full_s / (sparse_s + lookup_s),
               "computed_rows": stats.computed_rows, "modeled_flops_ratio": full_exec.full_flops(n) / stats.flops,
               "full_peak_bytes": full_peak, "sparsex_peak_bytes": sparse_peak,
               "peak_ratio": sparse_peak / full_peak if full_peak and sparse_peak else None}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n| tokens | full prefill (s) | SparseX prefill (s) | speedup | graph lookup (s) | modeled FLOPs ratio | peak GiB full / "
          f"SparseX (ratio) |  ({args.model}, {device}, ratio {args.ratio}, L_full {args.full_layers})")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        peak = "not measured" if r["peak_ratio"] is None else (
            f"{r['full_peak_bytes'] / 2**30:.2f} / {r['sparsex_peak_bytes'] / 2**30:.2f} ({r['peak_ratio']:.2f})")
        print(f"| {r['n']} | {r['full_s']:.3f} | {r['sparsex_s']:.3f} | {r['speedup']:.2f}x | {r['lookup_s']:.4f} | "
              f"{r['modeled_flops_ratio']:.2f}x | {peak} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                    "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                                    "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
