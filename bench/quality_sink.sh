#!/usr/bin/env bash
# Paragraphs cached alone, with and without the sink prefix (issue 33; docs/results.md "Pre-warmed paragraphs
# behind the sink prefix"): the same 50 development questions (HotpotQA 500..549, Qwen2.5-0.5B) with every
# paragraph prefilled alone from position 0, then alone behind the chat template's opening (what
# `POST /sparsex/prewarm` does); naive reuse, CacheBlend-style and SparseX at ratio 0.15, L_full 2. Each run
# resumes its checkpoint in bench/results/; then the paired differences (sink minus alone) per method; then the
# chunk-start knob on the sink case (issue 35: CacheBlend-style and SparseX with the first k = 0, 4, 16 tokens
# of every moved segment forced into the recompute set).
# Usage: bench/quality_sink.sh            SPARSEX_THREADS=N: torch threads (0: torch's default)
#        bench/quality_sink.sh --smoke DIR  SmolLM2, one question, into DIR (CI)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$here/scripts/setup" >/dev/null
cd "$here"
model=qwen2.5-0.5b name=qwen05 n=50 offset=500 out=bench/results
if [ "${1:-}" = "--smoke" ]; then
  model=smollm2 name=smollm2 n=1 out=$2
fi
for cached in alone sink; do
  .venv/bin/sparsex-sgl eval fidelity --model "$model" --data hotpotqa --n "$n" --offset "$offset" \
    --methods full,naive,cacheblend,sparsex --ratio 0.15 --full-layers 2 --mass-prior 4 --cached "$cached" \
    --out "$out/quality-dev-$name-hotpotqa-$cached.json" --resume --threads "${SPARSEX_THREADS:-0}"
done
.venv/bin/python -m sparsex_sgl.eval.quality_table "$out/quality-dev-$name-hotpotqa-sink.json" \
  --against "$out/quality-dev-$name-hotpotqa-alone.json"
.venv/bin/sparsex-sgl eval fidelity --model "$model" --data hotpotqa --n "$n" --offset "$offset" \
  --methods full,cacheblend,sparsex --ratio 0.15 --full-layers 2 --mass-prior 4 --cached sink --chunk-start 0,4,16 \
  --out "$out/quality-dev-$name-hotpotqa-sink-chunk-start.json" --resume --threads "${SPARSEX_THREADS:-0}"
.venv/bin/python -m sparsex_sgl.eval.quality_table "$out/quality-dev-$name-hotpotqa-sink-chunk-start.json"
