#!/usr/bin/env bash
# bench/gpu.sh STAGE[:SECONDS] ...: one device-machine call of the GPU work, each stage under its
# own time limit, logs and results under $OUT/r, packed into $OUT/results.tgz at the end (the
# device tool returns at most 8 files). Stages: tests, tests-gpu, gemv-tests, linear, linear-m1, linear-bits, linear-spot,
# tests-new (siblings, llama, w4a8), scaled, scaled-quick, scaled-new (w4a8, outliers), attention, attention-quick, kv-tests, int4-tests (the Gluon int4 kernel's), bipolar, decode, decode-w4,
# decode-b16, decode-w2, decode-profile (kernel time per name), decode-w4-all (lm_head quantized too), scaled-w4a8,
# tests-scaled, linear-sweep (widths x M x bf16/fp16 on two shapes), compile_time, compile_time-regional,
# attention-extra (prefill, masked static-cache tail, fused append), attention-sweep (every
# candidate tile of the KV decode kernel), attention-ab (that sweep for the package's kernel and each
# file in $KV_KERNELS, other versions of codegen/kv_attention.py, V's codes row-contiguous),
# attention-ab-vt (the same with V's codes token-contiguous), attention-ab-cache (V's codes as the
# cache stores them; KV_DTYPE=bf16 for bf16, KV_WIDTHS=int8 for one width, KV_TILES
# for tiles the tuner does not try: --tiles), attention-bf16 (the decode table in bf16), attention-gqa8 (64 query heads on the 8 KV heads), attention-prefill (the causal prefill rows alone), attention-ab-rows (the two Gluon int4 kernels' tiles, KV_QHEADS=64 for GQA 8, KV_WIDTHS=int4-g128 for whole-head groups: the rows kernel's alone; KV_KERNELS too), attention-ab-b1 (batch 1, both Gluon kernels at 4 and 8 programs an SM, then int8's Triton tiles; KV_KERNELS too), sass (bench.sass: the machine code's static profile, with the machine's Triton),
# attention-ncu (Nsight Compute of it, batch 1 and 8 at 16k), attention-ncu-int4 (of the Gluon int4 kernels with stall reasons, batch KV_BATCH, 8 by default, KV_TILES' tiles), kv-kernel-times (batch 1, KV_WIDTHS, int8 by default, KV_TILES: the attention and the merge kernels' times apart), kv-bandwidth (the cache's read speed per layout of V), attention-v-blocks (the int8 kernel with V token-contiguous, then in blocks of 64 tokens), accuracy-rounding (eager under
# jitter and plain Inductor, for the activation-quantized formats),
# profile (Nsight Compute of the tuned W4 kernels), gguf-part and accuracy (the 98 MB model file, split in
# two parts under .gguf/ that two back-to-back calls carry: the device tool carries 64 MiB a call). README "GPU runs" says more.
#   device run: bash bench/gpu.sh tests:300 linear-m1:200     (carry .whl: the wheels below)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; R=$OUT/r; mkdir -p "$R/w2"
export TRITON_CACHE_DIR=/tmp/qc-triton QCOMPILE_CACHE_DIR=/tmp/qc-cache QCOMPILE_TUNE_BUDGET_S=${QCOMPILE_TUNE_BUDGET_S:-4}
# carried wheels: pytest-xdist and execnet, and a setuptools new enough for the package-dir
# mapping in editable installs (the machine's own maps only qcompile/, not qcompile.runtime)
PIP="pip --python $(command -v python)"  # the PATH's pip may belong to another Python
$PIP install -q --no-deps .whl/*.whl >"$R/install.log" 2>&1
$PIP install -q --no-deps --no-build-isolation -e . >>"$R/install.log" 2>&1 || cat "$R/install.log"
python -c "import qcompile.runtime, torch, triton; print(torch.__version__, triton.__version__)" || exit 1
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader | tee "$R/gpu.txt"

stage() {
  case $1 in
    tests) python -m pytest -v -n 16 --dist loadgroup --tb=short -rfEs -p no:cacheprovider --durations=20 ;;
    linear-m1) python -m bench.linear --m 1,4,16 --configs affine:4:128 --dtypes fp16 --inductor "" --no-tinygemm --name linear-m1 --out "$R"
        stage linear-bits ;;
    linear-bits) python -m bench.linear --m 1 --configs affine:2:128,affine:3:128,affine:8:128,bipolar:4:128 --dtypes fp16 --inductor "" \
          --no-tinygemm --name linear-m1-bits --out "$R" ;;
    gemv-tests) python -m pytest -q -n 16 --tb=short -p no:cacheprovider tests/test_wq_gemm.py ;;
    linear) python -m bench.linear --out "$R"; python -m bench.plot "$R"/*-linear.json ;;
    linear-sweep) python -m bench.linear --shapes 4096x4096,14336x4096 --m 1,16,128,1024 --dtypes bf16,fp16 --inductor "" \
        --configs affine:4:128,affine:2:128,affine:3:128,affine:8:128,bipolar:4:128,affine:4:-1 --name linear-sweep --out "$R" ;;
    linear-spot) python -m bench.linear --shapes 4096x4096,28672x8192 --m 1,16,128,1024 --dtypes fp16 --inductor "" --no-tinygemm \
        --configs affine:2:128,affine:3:128,affine:8:128,bipolar:2:128,bipolar:3:128,affine:4:-1,affine:1:128,affine:5:128,affine:6:128,affine:7:128,bcq:3:128 \
        --name linear-spot --out "$R" ;;
    compile_time) python -m bench.compile_time --out "$R" ;;
    compile_time-regional) python -m bench.compile_time --regional --out "$R" ;;
    decode) python -m bench.decode --out "$R" ;;
    decode-w4) python -m bench.decode --bits 4 --batches 1 --tokens 48 --name decode-w4 --out "$R" ;;
    decode-b16) python -m bench.decode --bits 4,2 --batches 16 --tokens 32 --name decode-b16 --out "$R" ;;
    decode-profile) python -m bench.decode --bits 0,4 --batches 1,16 --tokens 40 --check 6 --profile --name decode-profile --out "$R" ;;
    decode-w4-all) python -m bench.decode --bits 4 --batches 1,16 --tokens 40 --check 6 --skip "" --name decode-w4-all --out "$R" ;;
    decode-w2) python -m bench.decode --bits 2 --batches 1 --tokens 32 --logits --out "$R/w2" ;;
    tests-gpu) python -m pytest -v -n 16 --dist loadgroup --tb=short -rfEs -p no:cacheprovider tests/test_compile.py tests/test_autotune_cache.py \
        tests/test_cli.py tests/test_scaled.py tests/test_kv_attention.py tests/test_wq_gemm.py::test_small_batches_tune_between_gemm_and_gemv_alternately ;;
    scaled) python -m bench.scaled --out "$R" ;;
    gguf-part) mkdir -p /tmp/gguf && cp .gguf/* /tmp/gguf/ && ls -la /tmp/gguf ;;  # a call carries half the model file
    accuracy) [ -f /tmp/smol.gguf ] || cat /tmp/gguf/* .gguf/* > /tmp/smol.gguf; sha256sum /tmp/smol.gguf && \
        python -m bench.accuracy --gguf /tmp/smol.gguf --spread 4 --inductor --out "$R" ;;
    scaled-quick) python -m bench.scaled --shapes 4096x4096,14336x4096,28672x8192 --m 1,16,128,1024,4096,8192 --out "$R" ;;
    attention) python -m bench.attention --out "$R" ;;
    attention-extra) python -m bench.attention --prefill 1024,4096,16384 --tail 32768 --contexts 4096,16384 --batches 1,8 \
        --append --name attention-extra --out "$R" ;;
    accuracy-rounding) [ -f /tmp/smol.gguf ] || cat /tmp/gguf/* .gguf/* > /tmp/smol.gguf; python -m bench.accuracy --gguf /tmp/smol.gguf --configs w8a8,fp8,w4a8 --spread 4 --inductor --out "$R" ;;
    attention-quick) python -m bench.attention --contexts 4096,16384,32768 --batches 1,8 ${KV_WIDTHS:+--kv "$KV_WIDTHS"} \
        --name attention-quick --out "$R" ;;
    attention-prefill) python -m bench.attention --prefill 1024,4096,16384 --name attention-prefill --out "$R" ;;
    attention-ab-rows) python -m bench.attention --sweep --kv ${KV_WIDTHS:-int4} --q-heads ${KV_QHEADS:-32} --contexts 16384,32768 \
        ${KV_KERNELS:+--kernels "$KV_KERNELS"} \
        --batches 1,8,32 --tiles "int4:64,8,1,2;int4:64,4,1,2;rows:64,8,1,2;rows:64,4,1,2;rows:64,8,1,3;rows:64,4,1,3" \
        --name attention-ab-rows-${KV_QHEADS:-32}${KV_WIDTHS:+-${KV_WIDTHS//,/_}} --out "$R" ;;
    attention-ab-b1) python -m bench.attention --sweep --kv int4,int4-g128 --contexts 16384,32768,131072 --batches 1 \
          ${KV_KERNELS:+--kernels "$KV_KERNELS"} --tiles "int4:64,4,1,2;int4:64,8,1,2;int4:64,8,1,3;rows:64,4,1,2;rows:64,8,1,2;rows:64,8,1,3" \
          --name attention-ab-b1 --out "$R"
        python -m bench.attention --sweep --kv int8 --contexts 16384,32768,131072 --batches 1 --tiles "64,4,1,3;64,8,1,3;64,2,1,3" \
          --name attention-ab-b1-int8 --out "$R" ;;
    attention-gqa8) python -m bench.attention --q-heads 64 --contexts 4096,16384,32768 --batches 1,8,32 \
        --name attention-gqa8 --out "$R" ;;
    attention-bf16) python -m bench.attention --dtype bf16 --contexts 4096,16384,32768,131072 --batches 1,8,32 \
        --name attention-bf16 --out "$R" ;;
    attention-sweep) python -m bench.attention --sweep --contexts 4096,16384 --batches 1,8 --name attention-sweep --out "$R" ;;
    attention-ab) python -m bench.attention --sweep ${KV_KERNELS:+--kernels "$KV_KERNELS"} --v-layout rows --contexts 16384 --batches 1,8 \
        --name attention-ab --out "$R" ;;
    attention-ab-vt) python -m bench.attention --sweep ${KV_KERNELS:+--kernels "$KV_KERNELS"} --v-layout tokens \
        --contexts 16384 --batches 1,8 --name attention-ab-vt --out "$R" ;;
    attention-ab-cache) python -m bench.attention --sweep ${KV_KERNELS:+--kernels "$KV_KERNELS"} --dtype ${KV_DTYPE:-fp16} \
        ${KV_WIDTHS:+--kv "$KV_WIDTHS"} ${KV_TILES:+--tiles "$KV_TILES"} --contexts 16384 --batches 1,8 \
        --name attention-ab-cache${KV_DTYPE:+-$KV_DTYPE} --out "$R" ;;
    sass) python -m bench.sass --gpu h200 --v-layout rows --out "$R/sass.json"
        python -m bench.sass --gpu h200 --v-layout tokens --out "$R/sass-vt.json" ;;
    attention-ncu) for batch in 1 8; do  # 16k: int8, then int4, V as the cache stores it
        QCOMPILE_AUTOTUNE=0 ncu -k regex:kv_attention_kernel --launch-skip 1 --launch-count 4 --section SpeedOfLight \
          --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy --section WarpStateStats \
          --section SourceCounters python -m bench.attention --ncu --contexts 16384 --batches $batch; done ;;
    attention-ncu-int4) QCOMPILE_AUTOTUNE=0 ncu -k regex:kv_int4 --launch-skip 1 --launch-count 8 --section SpeedOfLight \
          --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats --section SchedulerStats \
          --section InstructionStats --section SourceCounters \
          --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
          python -m bench.attention --ncu --contexts 16384 \
          --batches ${KV_BATCH:-8} --kv ${KV_WIDTHS:-int4} ${KV_TILES:+--tiles "$KV_TILES"} ;;
    kv-bandwidth) python -m bench.kv_bandwidth --out "$R" ;;
    kv-kernel-times) QCOMPILE_AUTOTUNE=0 ncu -k regex:kv_ --cache-control none --metrics gpu__time_duration.sum \
        python -m bench.attention --ncu --kv ${KV_WIDTHS:-int8} --contexts 1024,16384,32768 --batches 1 \
          ${KV_TILES:+--tiles "$KV_TILES"} ;;
    attention-v-blocks) for layout in tokens blocks; do  # the int8 kernel on V token-contiguous, then in blocks
        python -m bench.attention --sweep --kv int8 --v-layout $layout --tiles "64,4,1,3;64,8,1,3;64,4,1,2;128,2,4,3" \
          --contexts 16384,32768 --batches 1,8,32 --name attention-v-$layout --out "$R"; done ;;
    int4-tests) python -m pytest -q -n 8 --tb=short -p no:cacheprovider tests/test_kv_int4_attention.py ;;
    kv-tests) python -m pytest -q -n 16 --tb=short -p no:cacheprovider tests/test_kv_attention.py tests/test_kv_int4_attention.py tests/test_kv_cache.py ;;
    scaled-new) python -m bench.scaled --shapes 4096x4096,14336x4096,28672x8192 --m 1,16,1024,4096 --formats w4a8,w8a8-outliers \
        --profile --out "$R" ;;
    scaled-w4a8) python -m bench.scaled --shapes 4096x4096,14336x4096,28672x8192 --m 1,16,128,1024,4096 --formats w4a8 \
        --profile --name scaled-w4a8 --out "$R" ;;
    tests-scaled) python -m pytest -q -n 8 --tb=short -p no:cacheprovider tests/test_scaled.py tests/test_siblings.py ;;
    tests-new) python -m pytest -q -n 8 --tb=short -p no:cacheprovider tests/test_siblings.py tests/test_llama.py \
        tests/test_scaled.py -k "w4a8 or sibling or llama or siblings" ;;
    bipolar) python -m bench.linear --m 1 --configs affine:4:128,bipolar:4:128,bipolar:2:128 --dtypes fp16 --inductor "" \
          --no-tinygemm --name linear-bipolar --out "$R" ;;
    profile) for case in "4096x4096 1" "28672x8192 1" "4096x4096 16" "14336x4096 16"; do
        python -m bench.profile $case >/dev/null  # tunes and fills the autotune cache
        ncu -k regex:wq_ --launch-skip 2 --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis \
          --section LaunchStats --section Occupancy --section WarpStateStats python -m bench.profile $case
      done ;;
    *) echo "unknown stage $1"; return 2 ;;
  esac
}

for s in "$@"; do
  name=${s%%:*}; limit=${s#*:}; [ "$limit" = "$s" ] && limit=540
  start=$(date +%s)
  set -m  # the stage gets its own process group, so the time limit stops all of it
  ( stage "$name" ) >"$R/$name.log" 2>&1 &
  pid=$!
  ( sleep "$limit"; kill -TERM -- -$pid; sleep 10; kill -KILL -- -$pid ) 2>/dev/null &
  killer=$!
  set +m
  wait $pid; rc=$?
  kill -- -$killer 2>/dev/null
  echo "== $name rc=$rc $(( $(date +%s) - start ))s"; tail -n 15 "$R/$name.log"
done
tar czf "$OUT/results.tgz" -C "$R" .
