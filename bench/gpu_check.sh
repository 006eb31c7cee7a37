#!/usr/bin/env bash
# The GPU check: every GPU step in one command, sized for a lent H200 (torch + triton there, no sglang,
# no network, 64 MiB carried). Run from the repository root on the device machine:
#
#   mkdir -p .gpu && cp ../shared/gpu/flashinfer-*.tar.xz .gpu/      # here, once (.gpu/ is git-ignored)
#   bash bench/gpu_check.sh                                          # there, carrying .gpu
#
# Steps: FlashInfer's JIT kernels build in the background while the full-size kernel and pipeline tests
# run (bf16 and IEEE fp32, 16k-32k keys, shuffled slots, ragged batches); then bench/kernels.py (scattered
# vs FlashInfer dense causal, custom mask and runs of 64) and bench/model_prefill.py (full vs SparseX
# prefill on Qwen2.5-1.5B and Llama-3-8B shapes, with peak memory). A failing step is reported and the
# next one still runs; the exit status is non-zero if any failed. Everything printed also lands in
# $OUT (or results/gpu here): gpu_check.log, device.txt, fi_warmup.txt, tests.txt, kernels.json,
# model_prefill-*.json.
# On a machine without CUDA, SPARSEX_GPU_DRY_RUN=1 runs the tests at 1/64 size under the interpreter.
set -euo pipefail
repo="$(pwd)"
out="${OUT:-$repo/results/gpu}"
mkdir -p "$out"
exec > >(tee -a "$out/gpu_check.log") 2>&1
start=$SECONDS
failed=()
step() {  # step NAME TIMEOUT_S COMMAND...: run, time and record one step without stopping the check
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s, at $((SECONDS - start))s)"
  if timeout "$limit" "$@"; then echo "=== $name ok ($((SECONDS - start))s)"; else
    echo "=== $name FAILED (exit $?, $((SECONDS - start))s)"; failed+=("$name"); fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt" || true
site=$(mktemp -d)
if ls .gpu/flashinfer-*.tar.xz >/dev/null 2>&1; then
  tar -xJf .gpu/flashinfer-*.tar.xz -C "$site"
else
  echo "no .gpu/flashinfer-*.tar.xz: FlashInfer columns read n/a, dense prefill falls back to SDPA"
fi
# The package without installing it: sparsex_sgl with kernels/ in place as sparsex_sgl.kernels.
pkg=$(mktemp -d)
cp -r sparsex_sgl "$pkg/" && cp -r kernels "$pkg/sparsex_sgl/kernels"
export PYTHONPATH="$pkg:$site" PYTHONUNBUFFERED=1 FLASHINFER_CUDA_ARCH_LIST=9.0 MAX_JOBS=8
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())" \
  | tee -a "$out/device.txt"

# FlashInfer JIT-builds each kernel variant once (about 50 s each): build the three we use in parallel,
# in the background, while the Triton tests run.
warm_pids=()
for variant in causal mask paged; do
  python3 - "$variant" >>"$out/fi_warmup.txt" 2>&1 <<'EOF' &
import sys, time, torch
try:
    import flashinfer
except ImportError:
    sys.exit(0)
start = time.time()
q = torch.randn(64, 4, 128, device="cuda", dtype=torch.bfloat16)
k = torch.randn(64, 2, 128, device="cuda", dtype=torch.bfloat16)
variant = sys.argv[1]
if variant == "causal":
    flashinfer.single_prefill_with_kv_cache(q, k, k, causal=True)
elif variant == "mask":
    flashinfer.single_prefill_with_kv_cache(q, k, k, custom_mask=torch.ones(64, 64, dtype=torch.bool, device="cuda"))
else:
    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(torch.empty(64 << 20, dtype=torch.uint8, device="cuda"), "NHD")
    i32 = dict(dtype=torch.int32, device="cuda")
    w.plan(torch.tensor([0, 64], **i32), torch.tensor([0, 4], **i32), torch.arange(4, **i32), torch.tensor([16], **i32),
           4, 2, 128, 16, causal=True, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
    w.run(q, (k.view(4, 16, 2, 128), k.view(4, 16, 2, 128)))
torch.cuda.synchronize()
print(f"flashinfer {variant} ready in {time.time() - start:.0f} s")
EOF
  warm_pids+=($!)
done

tests=(test_gpu_full_size.py test_sparse_extend.py test_scattered_attention_kernel.py test_selection_realign_kernels.py
       test_attention_ref.py test_dense_attention.py)
step "kernel and pipeline tests" 170 bash -c "set -o pipefail; cd /tmp && python3 -m pytest -q -p no:cacheprovider \
  -p no:warnings --rootdir /tmp ${tests[*]/#/$repo/tests/} 2>&1 | tee '$out/tests.txt'"
for pid in "${warm_pids[@]}"; do wait "$pid" || echo "a FlashInfer warm-up failed (pid $pid)"; done
cat "$out/fi_warmup.txt"
step "kernel benchmark" 170 python3 bench/kernels.py --out "$out/kernels.json"
for model in qwen2.5-1.5b llama-3-8b; do
  step "model prefill $model" 90 python3 bench/model_prefill.py --model "$model" --device cuda \
    --lengths 8192,16384,32768 --ratio 0.15 --full-layers 2 --out "$out/model_prefill-$model.json"
done
echo "gpu_check done in $((SECONDS - start)) s; failed: ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]
