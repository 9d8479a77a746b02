#!/usr/bin/env bash
# One device call made of named parts. Each part has its own time limit and writes its log straight
# into $OUT as it runs; its JSON goes to $WORK/<part>, and $WORK is packed into $OUT/results.tgz
# after every part. So a call cut short still brings back every finished part and the progress of
# the running one, in few files (the device tool brings back 8: gpu.txt, parts.log, results.tgz
# and one log per part, so at most 5 parts a call). A part whose limit does not fit in what is
# left of BUDGET seconds (default 560, under the device tool's 600) is skipped, not started.
#   BUDGET=560 bash bench/gpu_kernels.sh PART...
# Parts (limit in s): tests(240) memory(90) memory-sweep(240) matmul(240) attention(300)
#   attention-sweep(150) anchors(200) dequant(120) dequant-sweep(300) qlora-layer(120) decode(200)
#   qlora-step(130)
#   e2e-llama(260) e2e-qwen(200) unsloth4(110) loss-parity(480) long-qlora(540) long-bf16(330)
#   loss-bisect(540: bench/loss_parity.py --bisect, 10 steps, one op swapped a run)
#   lora-ab-flags(250: llama3-8b exact LoRA rounding, XLA flags off / --xla_gpu_triton_gemm_any=true)
#   loss-parity-qlora(540: loss-parity on NF4 weights) loss-parity-hopper(480: with attention=hopper)
#   stacked-gemm-speed(200: stacked-gemm-check's speed rows alone)
#   lora-ab(535: llama3-8b / qwen2.5-1.5b steps with kernels.lora_linear xla, xla_rounded_base, pallas)
#   unroll-ab(360: llama3-8b "selective" with the layer scan, every layer unrolled, and unrolled with
#   each layer's backward tied to its cotangent, one e2e run each)
#   grad-parity(330: bench/grad_parity.py, op by op) attention-tests(200: tests/test_attention.py one
#   test at a time) hopper-check(240: bench/attention_hopper_check.py, the Mosaic GPU attention)
#   scan-flags(250: llama3-8b "selective" layer scan under three XLA flag sets for the slice copies)
#   e2e-hopper(240: llama3-8b "selective" padded and packed rows, default attention against hopper)
#   stacked-gemm-check(250: bench/stacked_matmul_hopper_check.py, the Mosaic GPU GEMM on stacked weights)
#   e2e-stacked(200: llama3-8b "selective" steps, kernels.layer_matmul slice against hopper)
#   e2e-stacked-profile(240: the same, 3 timed and 2 traced steps each, the per-kernel split as JSON) decode-exp(330: bench/decode_kernels.py, then batch-1
#   decode with the layer loop against the straight-line step, each with and without grouped projections) offload(200: llama3-8b True against
#   "unsloth" at the same MLP tiles, and how much of the host-copy time the step hides)
#   decode-hf(200: batch 1 and 32 at the defaults, against transformers' generate)
#   scan-dsf(125: llama3-8b "selective", layer scan, XLA dynamic-slice fusion on)
#   decode-ab(180: decode-exp's second half alone) fsdp-80(280, 2-GPU kind: the big FSDP row, 50 layers =
#   44.9B, 89.8 GB of bf16, at 80 GB a GPU)
#   multi-gpu(540, on a 2-GPU kind: llama3-8b on 1 GPU and data=2, and a model too big for one GPU
#   under FSDP; each row has 250 s)
# (default: tests memory matmul attention anchors)
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/fastft_out}; mkdir -p "$OUT"
WORK=${WORK:-/tmp/fastft_work}; mkdir -p "$WORK"
# LOG_DIR=$WORK packs the part logs into results.tgz (bench/gpu_pair.sh does, to stay within the
# device tool's 8 files for two GPUs); SITE: where the peers' wheels are installed.
LOG_DIR=${LOG_DIR:-$OUT}; mkdir -p "$LOG_DIR"
SITE=${SITE:-/tmp/site}
BUDGET=${BUDGET:-560}
PEERS=${PEERS:-.peers}
call_start=$(date +%s)
parts=${*:-tests memory matmul attention anchors}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
  python3 -c "import jax, flax, optax, torch, triton; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, 'triton', triton.__version__, jax.devices())"
  date -u
} > "$OUT/gpu.txt" 2>&1

install_wheels() {  # the peers' wheels (liger, bitsandbytes, unsloth ...) into $SITE, once
  [ -d "$SITE" ] || python3 -m pip install -q --no-index --no-deps --target "$SITE" "$PEERS"/wheels/*.whl
}

layer_matmul_ab() {  # llama3-8b "selective" b2x2048, one e2e.py run per kernels.layer_matmul value: PREFIX VALUE...
  local prefix=$1 variant; shift
  for variant in "$@"; do
    echo "== llama3-8b selective $variant" >> "$log"
    timeout 95 python3 bench/e2e.py --model llama3-8b --checkpointing selective --extra "" --steps 5 --warmup 1 \
      --deadline 90 --config-timeout 85 --ops layer_matmul=$variant --out "$dir/$prefix$variant" >> "$log" 2>&1
  done
}

limit_of() {
  case $1 in
    tests) echo 240 ;; memory) echo 90 ;; memory-sweep) echo 240 ;; matmul) echo 240 ;;
    attention) echo 300 ;; attention-sweep) echo 150 ;; anchors) echo 200 ;; dequant) echo 120 ;;
    dequant-sweep) echo 300 ;; qlora-layer) echo 120 ;; decode) echo 200 ;; qlora-step) echo 130 ;; e2e-llama) echo 260 ;;
    e2e-qwen) echo 200 ;; unsloth4) echo 110 ;; loss-parity) echo 480 ;; loss-bisect) echo 540 ;; lora-ab) echo 535 ;; lora-ab-flags) echo 250 ;; loss-parity-qlora) echo 540 ;; loss-parity-hopper) echo 480 ;; long-qlora) echo 540 ;;
    long-bf16) echo 330 ;; multi-gpu) echo 540 ;; fsdp-80) echo 280 ;; decode-ab) echo 180 ;; scan-dsf) echo 125 ;; decode-hf) echo 200 ;; unroll-ab) echo 360 ;; grad-parity) echo 330 ;; attention-tests) echo 200 ;; hopper-check) echo 240 ;; scan-flags) echo 250 ;; e2e-hopper) echo 240 ;; stacked-gemm-check) echo 250 ;; stacked-gemm-speed) echo 200 ;; e2e-stacked) echo 200 ;; e2e-stacked-profile) echo 240 ;; stacked-hlo) echo 200 ;; hopper-ab) echo 520 ;; loss-parity-short) echo 300 ;; stacked-gemm-low) echo 300 ;; e2e-low-rank) echo 200 ;; decode-exp) echo 330 ;; offload) echo 200 ;; *) echo 0 ;;
  esac
}

for part in $parts; do
  limit=$(limit_of "$part")
  left=$(( BUDGET - ($(date +%s) - call_start) ))
  if [ "$limit" -eq 0 ]; then echo "== unknown part $part" | tee -a "$OUT/parts.log"; continue; fi
  if [ "$limit" -gt "$left" ]; then
    echo "== $part skipped: needs ${limit} s, ${left} s left" | tee -a "$OUT/parts.log"; continue
  fi
  start=$(date +%s)
  log="$LOG_DIR/$part.log"
  dir="$WORK/$part"; mkdir -p "$dir"
  case $part in
    tests)
      # float32 references on the GPU would otherwise run their matmuls in TF32.
      JAX_DEFAULT_MATMUL_PRECISION=highest timeout $limit python3 -m pytest -q -p no:cacheprovider \
        tests/test_rms_norm.py tests/test_swiglu.py tests/test_rope.py tests/test_lora_linear.py \
        tests/test_cross_entropy.py tests/test_attention.py > "$log" 2>&1 ;;
    memory) OUT="$dir" timeout $limit python3 bench/kernels_memory_bound.py --no-sweep --iters 20 --models llama3-8b > "$log" 2>&1 ;;
    memory-sweep) OUT="$dir" timeout $limit python3 bench/kernels_memory_bound.py --iters 20 --models llama3-8b \
      --ops rms_norm,rope_qk > "$log" 2>&1 ;;
    matmul) OUT="$dir" timeout $limit python3 bench/kernels_matmul.py --no-sweep --no-peak --iters 15 > "$log" 2>&1 ;;
    attention) OUT="$dir" timeout $limit python3 bench/attention.py --no-sweep --iters 10 --warmup 2 > "$log" 2>&1 ;;
    attention-sweep) OUT="$dir" timeout $limit python3 bench/attention.py --sweep-only --iters 10 --warmup 2 > "$log" 2>&1 ;;
    anchors) install_wheels
      PYTHONPATH=$SITE:$PYTHONPATH timeout $limit python3 "$PEERS"/kernel_anchors.py > "$log" 2>&1 ;;
    dequant) install_wheels  # the dequant kernel, the fused dequant-matmul, bitsandbytes parity
      PYTHONPATH=$SITE:$PYTHONPATH timeout $limit python3 bench/qlora.py --skip-step --iters 20 \
        --out "$dir" > "$log" 2>&1 ;;
    dequant-sweep) install_wheels
      PYTHONPATH=$SITE:$PYTHONPATH timeout $limit python3 bench/qlora.py --skip-step --sweep --iters 20 \
        --out "$dir" > "$log" 2>&1 ;;
    qlora-layer)  # one QLoRA layer's fwd+bwd: absmax decoded in the kernel vs by XLA, transposed copies
      timeout $limit python3 bench/qlora.py --skip-step --layer --iters 20 --out "$dir" > "$log" 2>&1 ;;
    decode) timeout $limit python3 bench/decode.py --batches 1,32 --variants lora --decode-matmul pallas,reference \
      --budget $(( limit - 10 )) --out "$dir" > "$log" 2>&1 ;;
    qlora-step) timeout $limit python3 bench/qlora.py --checkpointing unsloth --steps 6 --warmup 1 \
      --out "$dir" > "$log" 2>&1 ;;
    e2e-llama) timeout $limit python3 bench/e2e.py --model llama3-8b --checkpointing selective,unsloth --extra "" \
      --steps 6 --warmup 1 --peers unsloth --peers-dir "$PEERS" --deadline $(( limit - 15 )) \
      --out "$dir" > "$log" 2>&1 ;;
    e2e-qwen) timeout $limit python3 bench/e2e.py --model qwen2.5-1.5b --checkpointing selective --extra "" \
      --steps 6 --warmup 1 --peers unsloth --peers-dir "$PEERS" --deadline $(( limit - 15 )) \
      --out "$dir" > "$log" 2>&1 ;;
    unsloth4) OUT="$dir" timeout $limit bash "$PEERS"/peer_bench.sh --model llama3-8b --batch 2 --seq 2048 \
      --steps 5 --warmup 2 --modes unsloth4 > "$log" 2>&1 ;;
    loss-parity) timeout $limit python3 bench/loss_parity.py --deadline $(( limit - 20 )) --out "$dir" \
      > "$log" 2>&1 ;;
    loss-bisect)  # which op's bf16 rounding moves the kernel path's curve from float32's (one op swapped a run)
      timeout $limit python3 bench/loss_parity.py --bisect --steps 10 --deadline $(( limit - 20 )) --out "$dir" \
      > "$log" 2>&1 ;;
    long-qlora) timeout $limit python3 bench/long_context.py --configs qlora --deadline $(( limit - 20 )) \
      --out "$dir" > "$log" 2>&1 ;;
    multi-gpu) OUT="$dir" timeout $limit python3 bench/multi_gpu.py --rows 8b-1,8b-data,big-fsdp --timeout 250 \
      > "$log" 2>&1 ;;
    fsdp-80)  # issue 9's "2 x 80 GB": each GPU capped at an H100 80GB's memory, the big model under FSDP
      # (Before 58c956c the step copied every stacked weight shard to a gather-friendly layout before
      # the layer loop, and XLA's autotuner failed to allocate those copies; FSDP_AUTOTUNE=0 adds
      # --xla_gpu_autotune_level=0 should autotuning still run out of memory.)
      XLA_FLAGS="${XLA_FLAGS:-}$([ "${FSDP_AUTOTUNE:-1}" = 0 ] && echo ' --xla_gpu_autotune_level=0')" OUT="$dir" \
        timeout $limit python3 bench/multi_gpu.py --rows big-fsdp --device-memory 80 --big-layers 50 --timeout 260 \
        > "$log" 2>&1 ;;
    decode-hf) timeout $limit python3 bench/decode.py --batches 1,32 --variants "" \
      --budget $(( limit - 10 )) --out "$dir" > "$log" 2>&1 ;;
    scan-dsf)  # the layer scan (not unrolled) with XLA's dynamic-slice fusion: the weight-slice copies without unrolling?
      timeout 118 python3 bench/e2e.py --model llama3-8b --checkpointing selective --extra "" --steps 5 --warmup 1 \
        --deadline 110 --config-timeout 105 --xla-flags=--xla_gpu_enable_dynamic_slice_fusion=true \
        --out "$dir" > "$log" 2>&1 ;;
    decode-ab)  # batch-1 decode: the layer loop against the straight-line step, with and without grouped projections
      timeout $limit python3 bench/decode.py --sides jax --batches 1 --variants "" --decode-matmul pallas \
        --layer-unroll 1,0 --grouped 0,1 --budget $(( limit - 12 )) --out "$dir" > "$log" 2>&1 ;;
    long-bf16) timeout $limit python3 bench/long_context.py --configs bf16 --deadline $(( limit - 20 )) \
      --out "$dir" > "$log" 2>&1 ;;
    decode-exp)  # where batch-1 decode loses its 35 %: GEMV per shape, profile, then unrolled layers
      OUT="$dir" timeout 150 python3 bench/decode_kernels.py --budget 100 > "$log" 2>&1
      timeout 175 python3 bench/decode.py --sides jax --batches 1 --variants "" --decode-matmul pallas \
        --layer-unroll 1,0 --grouped 0,1 --budget 165 --out "$dir/unroll" >> "$log" 2>&1 ;;
    offload)  # issue 11: the share of the "unsloth" offload copies that overlaps compute
      timeout 170 python3 bench/e2e.py --model llama3-8b --checkpointing full,unsloth --extra "" \
        --ops mlp_tile_tokens=2048 --steps 6 --warmup 1 --deadline 160 --out "$dir" > "$log" 2>&1
      timeout 25 python3 bench/offload_overlap.py --e2e-json "$dir/e2e.json" --out "$dir" >> "$log" 2>&1 ;;
    scan-flags)  # the layer scan's weight-slice copies under XLA flags: dynamic-slice fusion is
      # switched off where command buffers (CUDA graphs) run the loop (openxla/xla#19467), so try it
      # with them off, them off alone, and the while loop's double buffering.
      for variant in dsf-nocb nocb double-buffer; do
        case $variant in
          dsf-nocb) flags="--xla_gpu_enable_dynamic_slice_fusion=true --xla_gpu_enable_command_buffer=" ;;
          nocb) flags="--xla_gpu_enable_command_buffer=" ;;
          double-buffer) flags="--xla_gpu_enable_while_loop_double_buffering=true" ;;
        esac
        echo "== $variant: $flags" >> "$log"
        timeout 80 python3 bench/e2e.py --model llama3-8b --checkpointing selective --extra "" --steps 5 \
          --warmup 1 --deadline 75 --config-timeout 70 --xla-flags="$flags" --out "$dir/$variant" >> "$log" 2>&1
      done ;;
    e2e-hopper)  # llama3-8b "selective" steps, padded and packed rows, with the default attention
      # (cuDNN / Triton flash) and with the Mosaic GPU one
      timeout $limit python3 bench/e2e.py --model llama3-8b --checkpointing selective --extra "" --rows padded,packed \
        --attention preset,hopper --steps 5 --warmup 1 --deadline $(( limit - 15 )) --config-timeout 100 \
        --out "$dir" > "$log" 2>&1 ;;
    stacked-gemm-check)  # the Mosaic GPU GEMM that reads one layer of a stacked weight in place (the scan's slice copies)
      OUT="$dir" timeout $limit python3 bench/stacked_matmul_hopper_check.py --deadline $(( limit - 20 )) > "$log" 2>&1 ;;
    stacked-gemm-speed)  # the same GEMM's speed rows alone (its correctness compiles filled stacked-gemm-check)
      OUT="$dir" timeout $limit python3 bench/stacked_matmul_hopper_check.py --skip-correctness \
        --deadline $(( limit - 20 )) > "$log" 2>&1 ;;
    e2e-stacked)  # llama3-8b "selective" with each layer's kernels read in place by the Hopper GEMM, against the slices
      layer_matmul_ab "" slice hopper ;;
    e2e-stacked-profile)  # e2e-stacked with two traced steps each: where the in-place path's time goes.
      # The traces stay on the card; their per-kernel split (80 kernels) comes back as JSON.
      for variant in slice hopper; do
        echo "== $variant" >> "$log"
        timeout 115 python3 bench/e2e.py --model llama3-8b --checkpointing selective --extra "" --steps 3 --warmup 1 \
          --deadline 110 --config-timeout 105 --ops layer_matmul=$variant --profile --out "$dir/$variant" >> "$log" 2>&1
        python3 bench/profile_summary.py "$dir/$variant/profile" --top 80 --json "$dir/$variant/profile_top80.json" >> "$log" 2>&1
        rm -rf "$dir/$variant/profile"
      done ;;
    stacked-hlo)  # layer_matmul=hopper: XLA's optimised HLO of the step (which computations call the Mosaic
      # GEMM, and from which jax op), then a traced run without command buffers
      timeout 100 python3 bench/e2e.py --model llama3-8b --checkpointing selective --extra "" --steps 2 --warmup 1 \
        --deadline 95 --config-timeout 90 --ops layer_matmul=hopper --out "$dir/dump" \
        --xla-flags="--xla_dump_to=$WORK/stacked-dump --xla_dump_hlo_module_re=.*train_step.*" > "$log" 2>&1
      python3 bench/collect_dumps.py "$WORK/stacked-dump" "$dir/hlo" --max 4 >> "$log" 2>&1
      rm -rf "$WORK/stacked-dump"
      timeout 95 python3 bench/e2e.py --model llama3-8b --checkpointing selective --extra "" --steps 3 --warmup 1 \
        --deadline 90 --config-timeout 85 --ops layer_matmul=hopper --profile --xla-flags="--xla_gpu_enable_command_buffer=" \
        --out "$dir/nocb" >> "$log" 2>&1
      rm -rf "$dir/nocb/profile" ;;
    hopper-ab)  # kernels.layer_matmul=hopper (the Mosaic GEMM, the adapter's term as its epilogue addend)
      # across the step's modes, after the barrier that stops XLA cloning it: llama3-8b "selective"
      # against the slices in the same part; "unsloth", qwen2.5-1.5b and QLoRA against earlier parts
      layer_matmul_ab llama-selective- slice hopper
      echo "== llama3-8b unsloth hopper" >> "$log"
      timeout 100 python3 bench/e2e.py --model llama3-8b --checkpointing unsloth --extra "" --steps 5 --warmup 1 \
        --deadline 95 --config-timeout 90 --ops layer_matmul=hopper --out "$dir/llama-unsloth-hopper" >> "$log" 2>&1
      echo "== qwen2.5-1.5b selective hopper" >> "$log"
      timeout 90 python3 bench/e2e.py --model qwen2.5-1.5b --checkpointing selective --extra "" --steps 6 --warmup 1 \
        --deadline 85 --config-timeout 80 --ops layer_matmul=hopper --out "$dir/qwen-selective-hopper" >> "$log" 2>&1
      echo "== qlora llama3-8b unsloth hopper" >> "$log"
      timeout 130 python3 bench/qlora.py --checkpointing unsloth --steps 6 --warmup 1 --ops layer_matmul=hopper \
        --out "$dir/qlora-hopper" >> "$log" 2>&1 ;;
    stacked-gemm-low)  # the Mosaic GEMM with the adapter's rank-r term in its accumulator (low=): correctness, then speed
      OUT="$dir" timeout $limit python3 bench/stacked_matmul_hopper_check.py --only low --deadline $(( limit - 20 )) \
        > "$log" 2>&1 ;;
    e2e-low-rank)  # llama3-8b "selective": layer_matmul hopper (addend) against hopper_low_rank (rank-r in the kernel)
      layer_matmul_ab "" hopper hopper_low_rank ;;
    hopper-check)  # the Mosaic GPU (sm90) flash attention: correctness against the reference, then speed beside cuDNN
      OUT="$dir" timeout $limit python3 bench/attention_hopper_check.py --deadline $(( limit - 20 )) > "$log" 2>&1 ;;
    attention-tests)  # the attention tests one by one (a hang or a failure names its test), float32 at full precision
      for t in $(python3 -m pytest -q --collect-only -p no:cacheprovider tests/test_attention.py 2>/dev/null | grep ::); do
        echo "== $t" >> "$log"
        JAX_DEFAULT_MATMUL_PRECISION=highest timeout 40 python3 -m pytest -q -p no:cacheprovider --tb=short "$t" \
          2>&1 | grep -v -i warn | tail -25 >> "$log"
      done ;;
    grad-parity)  # which op's gradient parts "auto" from the reference (loss-parity failed at step 3)?
      OUT="$dir" timeout $limit python3 bench/grad_parity.py --model qwen2.5-1.5b --layers 4 --dtype float32,bfloat16 \
        --checkpointing unsloth --runs auto,singles > "$log" 2>&1 ;;
    lora-ab)  # the LoRA GEMM's rounding: base + adapter rounded once ("xla", the default since the
      # seventh session), PEFT's rounded base ("xla_rounded_base", the default before), the Pallas epilogue
      for variant in xla xla_rounded_base pallas; do
        echo "== llama3-8b lora_linear=$variant" >> "$log"
        timeout 118 python3 bench/e2e.py --model llama3-8b --checkpointing selective --extra "" --steps 5 \
          --warmup 1 --deadline 110 --config-timeout 105 --ops lora_linear=$variant --out "$dir/llama-$variant" >> "$log" 2>&1
      done
      for variant in xla xla_rounded_base; do
        echo "== qwen2.5-1.5b lora_linear=$variant" >> "$log"
        timeout 88 python3 bench/e2e.py --model qwen2.5-1.5b --checkpointing selective --extra "" --steps 6 \
          --warmup 1 --deadline 82 --config-timeout 78 --ops lora_linear=$variant --out "$dir/qwen-$variant" >> "$log" 2>&1
      done ;;
    lora-ab-flags)  # the exact LoRA rounding with XLA free to put the add+convert in a Triton GEMM's epilogue
      for flags in "" "--xla_gpu_triton_gemm_any=true"; do
        echo "== llama3-8b lora_linear=xla xla-flags='$flags'" >> "$log"
        timeout 118 python3 bench/e2e.py --model llama3-8b --checkpointing selective --extra "" --steps 5 \
          --warmup 1 --deadline 110 --config-timeout 105 --xla-flags="$flags" --out "$dir/llama${flags:+-triton-any}" >> "$log" 2>&1
      done ;;
    loss-parity-short)  # loss-parity's verdicts over 25 steps (10 exact), for a call with ~5 device minutes left
      timeout $limit python3 bench/loss_parity.py --steps 25 --exact-steps 10 --deadline $(( limit - 15 )) --out "$dir" \
        > "$log" 2>&1 ;;
    loss-parity-qlora)  # the same verdicts with every run on NF4 weights (QLoRA)
      timeout $limit python3 bench/loss_parity.py --load-in-4bit --deadline $(( limit - 20 )) --out "$dir" \
        > "$log" 2>&1 ;;
    loss-parity-hopper)  # the kernel path with the Mosaic GPU attention on its packed rows
      timeout $limit python3 bench/loss_parity.py --kernels auto,attention=hopper --deadline $(( limit - 20 )) \
        --out "$dir" > "$log" 2>&1 ;;
    unroll-ab)  # the layer scan against every layer unrolled, free (XLA overlaps the layers) and tied
      for variant in scan unrolled unrolled-tied; do
        ops=""
        [ "$variant" = unrolled ] && ops="--ops layer_unroll=0"
        [ "$variant" = unrolled-tied ] && ops="--ops layer_unroll=0,unrolled_backward=tied"
        echo "== $variant" >> "$log"
        timeout 118 python3 bench/e2e.py --model llama3-8b --checkpointing selective --extra "" --steps 5 \
          --warmup 1 --deadline 110 --config-timeout 105 $ops --out "$dir/$variant" >> "$log" 2>&1
      done ;;
  esac
  echo "== $part rc=$? took $(( $(date +%s) - start )) s" | tee -a "$OUT/parts.log"
  tar -C "$WORK" -czf "$OUT/results.tgz" .
done
