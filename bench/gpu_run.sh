#!/usr/bin/env bash
# Every GPU step of issue 4 in one command, for the lent GPU machine (torch + triton there, no sglang,
# no network). FlashInfer wheels come in an ignored .whl/ folder (../shared/docs/gpu.md); without them
# the dense path falls back to SDPA and the FlashInfer columns read n/a. Logs and JSON go to $OUT.
#   run: bash bench/gpu_run.sh        (carry: .whl)
set -uo pipefail
repo="$(pwd)"
out="${OUT:-$repo/results/gpu}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/device.txt"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
fi
export FLASHINFER_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
# The package without installing it: sparsex_sgl with kernels/ in place as sparsex_sgl.kernels.
rm -rf /tmp/pkg && mkdir -p /tmp/pkg && cp -r sparsex_sgl /tmp/pkg/ && cp -r kernels /tmp/pkg/sparsex_sgl/kernels
export PYTHONPATH=/tmp/pkg:/tmp/site
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/device.txt"
(cd /tmp && python3 -m pytest -q -p no:cacheprovider -p no:warnings --rootdir /tmp \
  "$repo/tests/test_scattered_attention_kernel.py" "$repo/tests/test_selection_realign_kernels.py" \
  "$repo/tests/test_dense_attention.py" "$repo/tests/test_attention_ref.py" 2>&1 | tail -15) | tee "$out/gpu_tests.txt"
python3 bench/kernels.py --out "$out/kernels.json" 2>&1 | grep -v '^{' | tee "$out/kernels_table.txt"
for model in qwen2.5-1.5b llama-3-8b; do
  python3 bench/model_prefill.py --model "$model" --device cuda --lengths 8192,16384,32768 --ratio 0.15 \
    --full-layers 2 --out "$out/model_prefill-$model.json" 2>&1 | tail -8 | tee "$out/model_prefill-$model.txt"
done
