#!/usr/bin/env bash
# The fidelity sweep behind the README table: every reuse method against exact full prefill on
# HotpotQA with the real SmolLM2 weights, at recompute ratios 0.05 / 0.15 / 0.3 and L_full 1 / 2 / 4.
# About 60 s per question on 2 CPU cores (50 questions: ~50 minutes). Writes JSON and prints the table.
# Usage: bench/fidelity_sweep.sh [N] [OFFSET]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
n="${1:-50}"
offset="${2:-0}"
"$here/scripts/setup"
cd "$here"
.venv/bin/sparsex-sgl eval fidelity --model smollm2 --data hotpotqa --n "$n" --offset "$offset" \
  --ratio 0.05,0.15,0.3 --full-layers 1,2,4 --out "results/fidelity-sweep-n$n-o$offset.json"
.venv/bin/python -m sparsex_sgl.eval.sweep_table "results/fidelity-sweep-n$n-o$offset.json"
