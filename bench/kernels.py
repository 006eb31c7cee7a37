"""GPU micro-benchmark: scattered-query attention against dense causal prefill, all in one run.

For each prompt length N and head layout (bf16, head_dim 128), times dense causal prefill over all N rows
(FlashInfer when installed, and torch SDPA), then for each recompute ratio the Triton scattered-query
kernel over ``ratio * N`` sorted random positions (K/V read through a shuffled slot row, as from SGLang's
pool) and FlashInfer's custom-mask prefill over the same rows (the baseline it must beat). Each
scattered result is checked against the torch reference on a slice of rows. Needs CUDA.

    python bench/kernels.py --out results/kernels.json
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any

import torch
import triton
from sparsex_sgl.kernels import scattered_query_attention_ref
from sparsex_sgl.kernels.scattered_attention import scattered_query_attention

CONFIGS = ((64, 64, 4, 2), (128, 64, 8, 2), (64, 128, 4, 2), (128, 128, 8, 2))
"""(block_m, block_n, num_warps, num_stages) tried per shape; the fastest is reported."""


def bench(fn: Any, *args: Any, **kwargs: Any) -> float:
    """Median milliseconds of ``fn(*args, **kwargs)``."""
    return float(triton.testing.do_bench(lambda: fn(*args, **kwargs), warmup=10, rep=50, return_mode="median"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="8192,16384,32768")
    ap.add_argument("--heads", default="12/2,32/8")
    ap.add_argument("--ratios", default="0.05,0.15,0.3")
    ap.add_argument("--out", type=Path, default=Path("results/kernels.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/kernels.py needs a CUDA device")
    try:
        import flashinfer
    except ImportError:
        flashinfer = None
    dev, dtype, d = "cuda", torch.bfloat16, 128
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    for n in map(int, args.lengths.split(",")):
        for heads in args.heads.split(","):
            hq, hkv = map(int, heads.split("/"))
            k = torch.randn(n + 1, hkv, d, device=dev, dtype=dtype)
            v = torch.randn(n + 1, hkv, d, device=dev, dtype=dtype)
            slots = (torch.randperm(n, device=dev) + 1).to(torch.int32)  # slot 0 is padding, as in SGLang
            k_seq, v_seq = k[slots.long()], v[slots.long()]
            q_all = torch.randn(n, hq, d, device=dev, dtype=dtype)
            scale = d**-0.5
            sdpa_ms = bench(torch.nn.functional.scaled_dot_product_attention, q_all.transpose(0, 1),
                            k_seq.transpose(0, 1), v_seq.transpose(0, 1), is_causal=True, scale=scale, enable_gqa=True)
            dense_ms = None
            if flashinfer is not None:
                dense_ms = bench(flashinfer.single_prefill_with_kv_cache, q_all, k_seq, v_seq, causal=True)
            for ratio in map(float, args.ratios.split(",")):
                m = max(1, int(ratio * n))
                pos = torch.sort(torch.randperm(n - 1, device=dev)[: m - 1]).values
                pos = torch.cat([pos, torch.tensor([n - 1], device=dev)])
                q = torch.randn(m, hq, d, device=dev, dtype=dtype)
                r2t = slots[None, :]
                pool = torch.zeros(1, dtype=torch.int32, device=dev)
                lens = torch.tensor([n], dtype=torch.int32, device=dev)
                timings = {}
                for bm, bn, warps, stages in CONFIGS:
                    try:
                        timings[(bm, bn, warps, stages)] = bench(
                            scattered_query_attention, q, k, v, pos, [0, m], r2t, pool, lens, scale, block_m=bm,
                            block_n=bn, num_warps=warps, num_stages=stages)
                    except Exception as exc:  # noqa: BLE001 - a config may not fit in shared memory
                        print(f"config {(bm, bn, warps, stages)} failed: {type(exc).__name__}")
                best = min(timings, key=timings.__getitem__)
                out, lse = scattered_query_attention(q, k, v, pos, [0, m], r2t, pool, lens, scale, block_m=best[0],
                                                     block_n=best[1], num_warps=best[2], num_stages=best[3])
                check = slice(max(0, m - 128), m)  # the rows that see the most keys
                ref_out, ref_lse = scattered_query_attention_ref(q[check], k_seq, v_seq, pos[check], scale)
                err = float((out[check].float() - ref_out.float()).abs().max())
                lse_err = float((lse[check] - ref_lse).abs().max())
                mask_ms = None
                if flashinfer is not None and m * n <= 2**31:
                    mask = torch.arange(n, device=dev)[None, :] <= pos[:, None]
                    mask_ms = bench(flashinfer.single_prefill_with_kv_cache, q, k_seq, v_seq, custom_mask=mask)
                base = dense_ms if dense_ms is not None else sdpa_ms
                row = {"n": n, "heads": heads, "ratio": ratio, "queries": m, "scattered_ms": timings[best],
                       "config": list(best), "flashinfer_dense_causal_ms": dense_ms, "torch_sdpa_causal_ms": sdpa_ms,
                       "flashinfer_custom_mask_ms": mask_ms, "scattered_over_dense": timings[best] / base,
                       "max_abs_err": err, "max_lse_err": lse_err}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\n| N | heads q/kv | ratio | scattered (ms) | dense causal (ms) | custom mask (ms) | scattered / dense | max abs err |")
    print("|---|---|---|---|---|---|---|---|")
    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    for r in rows:
        dense = r["flashinfer_dense_causal_ms"] if r["flashinfer_dense_causal_ms"] is not None else r["torch_sdpa_causal_ms"]
        print(f"| {r['n']} | {r['heads']} | {r['ratio']} | {fmt(r['scattered_ms'])} | {fmt(dense)} | "
              f"{fmt(r['flashinfer_custom_mask_ms'])} | {r['scattered_over_dense']:.2f} | {r['max_abs_err']:.1e} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "machine": platform.platform(),
                                    "torch": torch.__version__, "triton": triton.__version__,
                                    "flashinfer": getattr(flashinfer, "__version__", None), "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
