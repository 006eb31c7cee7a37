"""GPU micro-benchmark: attention for a recompute set against dense causal prefill, side by side in one run.

For each prompt length N and head layout (bf16, head_dim 128) it times FlashInfer's dense causal prefill
over all N rows (the baseline every ratio is divided by; torch SDPA where FlashInfer is absent), then for
each recompute ratio:

- ``scattered``: the Triton scattered-query kernel (``kernels/scattered_attention.py``) over ``ratio * N``
  random sorted positions, K/V read through a shuffled slot row as from SGLang's pool; every launch
  config in ``CONFIGS`` is timed and the fastest reported;
- ``custom mask``: FlashInfer's single prefill with a custom mask over the same rows (what a FlashInfer
  user would reach for);
- ``runs of 64``: the same share of rows as runs of 64 consecutive positions (block-granular selection),
  timed both on FlashInfer's paged batch prefill (each run a causal "request" over the pages before its
  end, page size 16, pages shuffled) and on the scattered kernel.

Every timed result is first checked against the torch reference on a sample of rows. Needs CUDA.

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
from sparsex_sgl.kernels.scattered_attention import KernelConfig, heaviest_first, query_tiles, scattered_query_attention

CONFIGS = (KernelConfig(64, 64, 4, 2), KernelConfig(64, 64, 4, 3), KernelConfig(64, 128, 4, 2),
           KernelConfig(64, 128, 8, 2), KernelConfig(128, 64, 4, 2), KernelConfig(128, 64, 8, 3),
           KernelConfig(128, 128, 8, 2), KernelConfig(256, 64, 8, 2))
"""Launch configs tried per shape; the fastest is reported with its config."""
MAX_ABS_ERR = 0.05
"""bf16 outputs of unit-variance random data against the float32 reference (measured: 2.4e-4 to 4.9e-4)."""
PAGE = 16
RUN = 64
D = 128
DEVICE = "cuda"
DTYPE = torch.bfloat16


def bench(fn: Any) -> float:
    """Median milliseconds of ``fn()``."""
    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def check(out: torch.Tensor, q: torch.Tensor, k_seq: torch.Tensor, v_seq: torch.Tensor, pos: torch.Tensor,
          scale: float) -> float:
    """Max abs error of ``out`` against the reference on the last 128 rows (they see the most keys)."""
    rows = slice(max(0, q.shape[0] - 128), q.shape[0])
    ref, _ = scattered_query_attention_ref(q[rows], k_seq, v_seq, pos[rows], scale)
    return float((out[rows].float() - ref.float()).abs().max())


class Case:
    """One (N, heads) shape: a shuffled pool, the dense baseline, and the FlashInfer paged layout."""

    def __init__(self, n: int, hq: int, hkv: int, flashinfer: Any) -> None:
        dev, dtype = DEVICE, DTYPE
        self.n, self.hq, self.hkv, self.fi = n, hq, hkv, flashinfer
        self.scale = D**-0.5
        self.k = torch.randn(n + 1, hkv, D, device=dev, dtype=dtype)
        self.v = torch.randn(n + 1, hkv, D, device=dev, dtype=dtype)
        self.slots = (torch.randperm(n, device=dev) + 1).to(torch.int32)  # slot 0 is padding, as in SGLang
        self.k_seq, self.v_seq = self.k[self.slots.long()], self.v[self.slots.long()]
        self.r2t = self.slots[None, :]
        self.pool = torch.zeros(1, dtype=torch.int32, device=dev)
        self.lens = torch.tensor([n], dtype=torch.int32, device=dev)
        q_all = torch.randn(n, hq, D, device=dev, dtype=dtype)
        self.sdpa_ms: float | None = None
        self.dense_ms: float | None = None
        if flashinfer is None:  # SDPA's GQA path falls back to the math kernel: O(N^2) memory
            self.sdpa_ms = bench(lambda: torch.nn.functional.scaled_dot_product_attention(
                q_all.transpose(0, 1), self.k_seq.transpose(0, 1), self.v_seq.transpose(0, 1), is_causal=True,
                scale=self.scale, enable_gqa=True))
        else:
            self.dense_ms = bench(lambda: flashinfer.single_prefill_with_kv_cache(
                q_all, self.k_seq, self.v_seq, causal=True, sm_scale=self.scale))
            pages = torch.randperm(n // PAGE, device=dev)
            self.pages = pages.to(torch.int32)
            self.k_paged = torch.empty(n // PAGE, PAGE, hkv, D, device=dev, dtype=dtype)
            self.v_paged = torch.empty_like(self.k_paged)
            self.k_paged[pages] = self.k_seq.view(-1, PAGE, hkv, D)
            self.v_paged[pages] = self.v_seq.view(-1, PAGE, hkv, D)
            self.workspace = torch.empty(512 << 20, dtype=torch.uint8, device=dev)

    @property
    def baseline_ms(self) -> float:
        base = self.dense_ms if self.dense_ms is not None else self.sdpa_ms
        assert base is not None
        return base

    def scattered(self, q: torch.Tensor, pos: torch.Tensor) -> tuple[float, KernelConfig, float]:
        """Fastest config's milliseconds, the config, and its max abs error."""
        timings: dict[KernelConfig, float] = {}
        m = q.shape[0]
        for config in CONFIGS:
            # The tile table is per-batch plan work (sparse_extend builds it once for every layer): not timed.
            tiles = heaviest_first(torch.from_numpy(query_tiles([0, m], self.hq // self.hkv, config.block_t)).to(q.device),
                                   pos.long(), self.hq // self.hkv)

            def run(config: KernelConfig = config, tiles: torch.Tensor = tiles) -> Any:
                return scattered_query_attention(q, self.k, self.v, pos, [0, m], self.r2t, self.pool, self.lens,
                                                 self.scale, config=config, tiles=tiles)
            try:
                out = run()[0]
            except Exception as exc:  # noqa: BLE001 - a config may not fit in shared memory or registers
                print(f"  config {config} skipped: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                continue
            err = check(out, q, self.k_seq, self.v_seq, pos, self.scale)
            if err > MAX_ABS_ERR:
                raise AssertionError(f"config {config}: max abs error {err} against the reference")
            timings[config] = bench(run)
        best = min(timings, key=timings.__getitem__)
        out, _ = scattered_query_attention(q, self.k, self.v, pos, [0, m], self.r2t, self.pool, self.lens, self.scale,
                                           config=best)
        return timings[best], best, check(out, q, self.k_seq, self.v_seq, pos, self.scale)

    def custom_mask(self, q: torch.Tensor, pos: torch.Tensor) -> float | None:
        if self.fi is None or q.shape[0] * self.n > 2**31:
            return None
        mask = torch.arange(self.n, device=DEVICE)[None, :] <= pos[:, None]
        return bench(lambda: self.fi.single_prefill_with_kv_cache(q, self.k_seq, self.v_seq, custom_mask=mask,
                                                                  sm_scale=self.scale))

    def runs(self, q: torch.Tensor, pos: torch.Tensor) -> tuple[float, float]:
        """FlashInfer paged prefill over runs of ``RUN`` positions (``pos`` is made of such runs): ms, error."""
        n_runs = q.shape[0] // RUN
        ends = pos.view(n_runs, RUN)[:, -1].to(torch.int32) + 1
        n_pages = (ends + PAGE - 1) // PAGE
        kv_indptr = torch.zeros(n_runs + 1, dtype=torch.int32, device=DEVICE)
        kv_indptr[1:] = torch.cumsum(n_pages, 0)
        kv_indices = torch.cat([self.pages[: int(p)] for p in n_pages.tolist()])
        last_len = ends - (n_pages - 1) * PAGE
        qo_indptr = torch.arange(0, n_runs * RUN + 1, RUN, dtype=torch.int32, device=DEVICE)
        wrapper = self.fi.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
        wrapper.plan(qo_indptr, kv_indptr, kv_indices, last_len, self.hq, self.hkv, D, PAGE, causal=True,
                     sm_scale=self.scale, q_data_type=DTYPE, kv_data_type=DTYPE)
        out = wrapper.run(q, (self.k_paged, self.v_paged))
        err = check(out, q, self.k_seq, self.v_seq, pos, self.scale)
        return bench(lambda: wrapper.run(q, (self.k_paged, self.v_paged))), err


def random_rows(n: int, m: int) -> torch.Tensor:
    """``m`` sorted distinct positions in ``[0, n)``, the last one ``n - 1`` (always computed)."""
    pos = torch.sort(torch.randperm(n - 1, device=DEVICE)[: m - 1]).values
    return torch.cat([pos, torch.tensor([n - 1], device=DEVICE)]).to(torch.int32)


def run_rows(n: int, m: int) -> torch.Tensor:
    """About ``m`` positions as whole runs of ``RUN`` (random aligned blocks, the last block included)."""
    blocks = n // RUN
    k = max(1, m // RUN)
    chosen = torch.sort(torch.randperm(blocks - 1, device=DEVICE)[: k - 1]).values
    chosen = torch.cat([chosen, torch.tensor([blocks - 1], device=DEVICE)])
    return (chosen[:, None] * RUN + torch.arange(RUN, device=DEVICE)[None, :]).reshape(-1).to(torch.int32)


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
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    for n in map(int, args.lengths.split(",")):
        for heads in args.heads.split(","):
            hq, hkv = map(int, heads.split("/"))
            case = Case(n, hq, hkv, flashinfer)
            for ratio in map(float, args.ratios.split(",")):
                m = max(RUN, int(ratio * n))
                pos = random_rows(n, m)
                q = torch.randn(m, hq, D, device=DEVICE, dtype=DTYPE)
                ms, config, err = case.scattered(q, pos)
                row: dict[str, Any] = {
                    "n": n, "heads": heads, "ratio": ratio, "queries": m, "dense_causal_ms": case.dense_ms,
                    "sdpa_causal_ms": case.sdpa_ms, "scattered_ms": ms, "scattered_config": list(vars(config).values()),
                    "scattered_max_abs_err": err, "scattered_over_dense": ms / case.baseline_ms,
                    "custom_mask_ms": case.custom_mask(q, pos),
                }
                runs = run_rows(n, m)
                q_runs = torch.randn(runs.numel(), hq, D, device=DEVICE, dtype=DTYPE)
                row["runs64_queries"] = runs.numel()
                row["runs64_scattered_ms"], _, row["runs64_scattered_err"] = case.scattered(q_runs, runs)
                row["runs64_flashinfer_ms"], row["runs64_flashinfer_err"] = (
                    case.runs(q_runs, runs) if flashinfer is not None else (None, None))
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "machine": platform.platform(),
                                    "torch": torch.__version__, "triton": triton.__version__,
                                    "flashinfer": getattr(flashinfer, "__version__", None), "rows": rows}, indent=1))
    print(f"wrote {args.out}")


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: milliseconds, and each against dense causal prefill over all rows."""
    def ms(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    def ratio(x: float | None, base: float) -> str:
        return "n/a" if x is None else f"{x / base:.2f}"

    lines = [("| N | heads q/kv | ratio | dense causal ms | scattered ms (x dense) | custom mask ms (x dense) | "
              "runs of 64: FlashInfer paged ms (x dense) | runs of 64: scattered ms (x dense) | scattered config |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = r["dense_causal_ms"] if r["dense_causal_ms"] is not None else r["sdpa_causal_ms"]
        lines.append(
            f"| {r['n']} | {r['heads']} | {r['ratio']} | {ms(base)} | {ms(r['scattered_ms'])} "
            f"({ratio(r['scattered_ms'], base)}) | {ms(r['custom_mask_ms'])} ({ratio(r['custom_mask_ms'], base)}) | "
            f"{ms(r['runs64_flashinfer_ms'])} ({ratio(r['runs64_flashinfer_ms'], base)}) | "
            f"{ms(r['runs64_scattered_ms'])} ({ratio(r['runs64_scattered_ms'], base)}) | {r['scattered_config']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
