set -x
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
export FLASHINFER_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
mkdir -p /tmp/pkg && cp -r sparsex_sgl /tmp/pkg/ && rm -rf /tmp/pkg/sparsex_sgl/kernels && cp -r kernels /tmp/pkg/sparsex_sgl/kernels
export PYTHONPATH=/tmp/pkg:/tmp/site
cd /tmp && python3 -m pytest -q -p no:cacheprovider $OLDPWD/tests/test_scattered_attention_kernel.py $OLDPWD/tests/test_attention_ref.py -p no:warnings 2>&1 | tail -5 | tee $OUT/gpu_tests.txt
cd $OLDPWD && python3 bench/kernels.py --out $OUT/kernels.json 2>&1 | grep -v "^{" | tee $OUT/kernels_table.txt
