#!/usr/bin/env bash
# One device call: every kernel test run natively on the GPU (Triton, not the interpreter), then
# the memory-bound and matmul kernel benches. Logs and JSON go to $OUT.
#   bash bench/gpu_kernels.sh [tests|memory|memory-sweep|matmul|attention|anchors|dequant|decode]...
#   (default: tests memory matmul attention anchors)
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/fastft_out}; mkdir -p "$OUT"
parts=${*:-tests memory matmul attention anchors}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, flax, optax, torch, triton; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, 'triton', triton.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
for part in $parts; do
  start=$(date +%s)
  case $part in
    tests)
      # float32 references on the GPU would otherwise run their matmuls in TF32.
      JAX_DEFAULT_MATMUL_PRECISION=highest timeout 240 python3 -m pytest -q -p no:cacheprovider -x \
        tests/test_rms_norm.py tests/test_swiglu.py tests/test_rope.py tests/test_lora_linear.py \
        tests/test_cross_entropy.py tests/test_attention.py 2>&1 | tail -25 | tee "$OUT/gpu_tests.log" ;;
    memory) timeout 200 python3 bench/kernels_memory_bound.py --no-sweep --iters 30 2>&1 | tail -40 | tee "$OUT/memory_bound.log" ;;
    memory-sweep) timeout 200 python3 bench/kernels_memory_bound.py --iters 20 --models llama3-8b --ops rms_norm,rope_qk \
      2>&1 | tee "$OUT/memory_sweep.log" ;;
    dequant)
      # NF4 dequant kernel against XLA, and bit-parity with bitsandbytes' own CUDA quantizer.
      python3 -m pip install -q --no-index --no-deps --target /tmp/site .peers/wheels/bitsandbytes-*.whl
      PYTHONPATH=/tmp/site:$PYTHONPATH timeout 180 python3 bench/qlora.py --skip-step --sweep --iters 20 --out "$OUT" \
        2>&1 | tee "$OUT/dequant.log" ;;
    decode) timeout 200 python3 bench/decode.py --batches 1,32 --variants lora --decode-matmul pallas,reference \
      --budget 190 2>&1 | tail -30 | tee "$OUT/decode.log" ;;
    matmul) timeout 240 python3 bench/kernels_matmul.py --no-sweep --no-peak --iters 15 2>&1 | tail -40 | tee "$OUT/matmul.log" ;;
    attention) timeout 300 python3 bench/attention.py --no-sweep --iters 10 --warmup 2 2>&1 | tail -50 | tee "$OUT/attention.log" ;;
    anchors)
      python3 -m pip install -q --no-index --no-deps --target /tmp/site .peers/wheels/liger_kernel-*.whl
      PYTHONPATH=/tmp/site:$PYTHONPATH timeout 200 python3 .peers/kernel_anchors.py 2>&1 | tail -25 | tee "$OUT/anchors.log" ;;
  esac
  echo "== $part took $(( $(date +%s) - start )) s"
done
