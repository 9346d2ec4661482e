#!/usr/bin/env bash
# The one command for a CUDA machine, in three tiers:
#
#   scripts/gpu_check.sh --quick      (default) fits one short GPU lease: at most 8 minutes on one H100/H200
#   scripts/gpu_check.sh --full       every GPU row (about 45-90 minutes on one H100)
#   scripts/gpu_check.sh --smoke-cpu  every row of --quick once, at a small size, on the CPU (proves on any
#                                     machine that each command runs; tests/test_gpu_check.py runs it)
#
# It runs with whatever Python has torch: $PYTHON if set, else .venv/bin/python when it exists, else
# python3 (a lent GPU machine has its own python3 with torch, timm, typer, rich, opencv, pandas,
# pyarrow, matplotlib and pytest, and no package registry): the package is imported from this checkout
# (PYTHONPATH=. python -m tokenscope), so nothing is installed.
#
# --quick rows (bf16 autocast, random weights: speed does not depend on their values). The expected
# device time per row is an estimate from the FLOPs it runs (ViT-L/16 at 1024 px: 4131 GFLOPs per
# image unreduced; about 35 forwards per row: warm-up, timed repeats, the recorder-overhead pair and
# the FLOP count) at a few hundred bf16 TFLOP/s, plus about 10 s of Python start-up and model build;
# measured times are written beside each row in the summary, these are not:
#   CUDA tests (tests/test_gpu.py, tests/test_packed_blocks.py: varlen attention)  ~70 s
#   ViT-L 1024 batch 1: dCTS 2.5x, ToMe, ALGM, EViT           ~15 s each
#   ViT-L 1024 batch 8: dCTS 2.5x, ToMe, ALGM, EViT           ~25 s each
#   EoMT-L 512 batch 8: ToMe, ALGM                            ~15 s each
#   DINOv3-L 512 batch 8 (rotary positions): ToMe, ALGM        ~15 s each
#   demo 512 batch 8: full STEP (learned dCTS + exits)         ~15 s
# about 5.5 minutes in all. Results: benchmarks/results/quick/gpu_*.json, gpu_tests.txt, times.tsv and the
# table gpu_summary.md (written from the JSON files by benchmarks/summarise.py, every number read, none typed).
set -uo pipefail
cd "$(dirname "$0")/.."
tier=quick
out=""
for arg in "$@"; do
  case "$arg" in
    --quick) tier=quick ;;
    --full) tier=full ;;
    --smoke-cpu) tier=smoke ;;
    --out=*) out=${arg#--out=} ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (use --quick, --full, --smoke-cpu, --out=DIR)" >&2; exit 2 ;;
  esac
done
if [ -n "${PYTHON:-}" ]; then py=$PYTHON
elif [ -x .venv/bin/python ]; then py=.venv/bin/python
else py=python3
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
ts=("$py" -m tokenscope)
$py -c "import torch" || { echo "gpu_check.sh: $py has no torch (set PYTHON=...)" >&2; exit 2; }
# DINOv3 (rotary positions) came to timm in 1.0.20: an older timm skips those rows and says so
if $py -c "import sys, timm; sys.exit(0 if timm.is_model('vit_large_patch16_dinov3') else 1)" 2>/dev/null; then
  has_dinov3=yes
else
  has_dinov3=no; echo "gpu_check.sh: this timm has no vit_large_patch16_dinov3: the DINOv3-L rows are skipped" >&2
fi

failures=0
row() {  # row NAME BENCH-ARGS...: one `tokenscope bench` row, timed, into $out/gpu_NAME.json
  local name=$1; shift
  local t0 t1 status=ok
  t0=$(date +%s%N)
  echo "+ tokenscope bench $* ($name)"
  if ! "${ts[@]}" bench "$@" "${row_opts[@]}" --json "$out/gpu_${name}.json" >"$out/log_${name}.txt" 2>&1; then
    status=FAILED; failures=$((failures + 1)); tail -n 5 "$out/log_${name}.txt"
  fi
  t1=$(date +%s%N)
  printf 'gpu_%s.json\t%d.%d\t%s\n' "$name" $(((t1 - t0) / 1000000000)) $((((t1 - t0) / 100000000) % 10)) "$status" >>"$out/times.tsv"
  echo "  $status in $(((t1 - t0) / 1000000)) ms"
}

quick_rows() {  # the rows that matter most; $big is the ViT-L size, $eomt EoMT-L's, $demo the demo's, $b8 the big batch
  for batch in 1 "$b8"; do
    row "vitl_${big}_b${batch}_dcts" --model vitl --random-init --size "$big" --batch "$batch" --budget 2.5 --exits none
    for method in tome algm evit; do
      row "vitl_${big}_b${batch}_${method}" --model vitl --random-init --size "$big" --batch "$batch" --method "$method"
    done
  done
  for method in tome algm; do
    row "eomt-l_${eomt}_b${b8}_${method}" --model eomt-l-ade20k-512 --random-init --size "$eomt" --batch "$b8" --method "$method"
    if [ "$has_dinov3" = yes ]; then
      row "dinov3-l_${eomt}_b${b8}_${method}" --model timm:vit_large_patch16_dinov3 --random-init --size "$eomt" --batch "$b8" --method "$method"
    fi
  done
  row "demo_${demo}_b${b8}_step" --model demo --size "$demo" --batch "$b8" --loop
}

summary() {
  "$py" benchmarks/summarise.py --times "$out/times.tsv" "$out"/gpu_*.json >"$out/gpu_summary.md" || failures=$((failures + 1))
  cat "$out/gpu_summary.md"
  echo "gpu_check.sh --$tier: $failures failed row(s); results in $out"
}

case "$tier" in
  smoke)
    out=${out:-$(mktemp -d)}
    mkdir -p "$out"; : >"$out/times.tsv"
    row_opts=(--device cpu --repeats 1 --warmup 1 --threads 2)
    big=128; eomt=128; demo=128; b8=2
    quick_rows
    summary
    [ "$failures" -eq 0 ]
    exit ;;
  quick)
    "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')" || exit 2
    "$py" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name(0))"
    out=${out:-benchmarks/results/quick}
    mkdir -p "$out"; : >"$out/times.tsv"
    t0=$(date +%s%N)
    "$py" -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py tests/test_packed_blocks.py 2>&1 | tee "$out/gpu_tests.txt"
    printf 'tests/test_gpu.py tests/test_packed_blocks.py\t%d\t%s\n' $((($(date +%s%N) - t0) / 1000000000)) "${PIPESTATUS[0]}" >>"$out/times.tsv"
    row_opts=(--device cuda --repeats 10 --warmup 3)
    big=1024; eomt=512; demo=512; b8=8
    quick_rows
    summary
    [ "$failures" -eq 0 ]
    exit ;;
esac

# --full: the long script (about 45-90 minutes on one H100)
set -e
"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')"
"$py" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
out=${out:-benchmarks/results}
mkdir -p "$out"
$py -m pytest -q -rs tests 2>&1 | tee "$out/gpu_tests.txt"
common=(--random-init --size 1024 --device cuda --repeats 20 --warmup 5)
for model in vitb vitl segmenter-vit-b-mask-ade20k segmenter-vit-l-mask-ade20k; do
  for batch in 1 8; do
    "${ts[@]}" bench --model "$model" "${common[@]}" --batch "$batch" --budget 2.5 --exits none \
      --json "$out/gpu_${model}_1024_b${batch}_dcts.json"
    "${ts[@]}" bench --model "$model" "${common[@]}" --batch "$batch" --budget 2.5 --exits none --compile \
      --json "$out/gpu_${model}_1024_b${batch}_dcts_compile.json"
    "${ts[@]}" bench --model "$model" "${common[@]}" --batch "$batch" --policy uniform --exits none \
      --json "$out/gpu_${model}_1024_b${batch}_uniform.json"
    for method in tome algm cts evit; do
      "${ts[@]}" bench --model "$model" "${common[@]}" --batch "$batch" --method "$method" \
        --json "$out/gpu_${model}_1024_b${batch}_${method}.json"
    done
  done
done
# EoMT-L (DINOv2, 100 queries in the last 4 blocks) at its two published crops, random weights
for spec in eomt-l-ade20k-512:512 eomt-l-cityscapes-1024:1024; do
  model=${spec%%:*}; size=${spec##*:}
  for batch in 1 8; do
    "${ts[@]}" bench --model "$model" --random-init --size "$size" --device cuda --repeats 20 --warmup 5 --batch "$batch" \
      --budget 2.5 --exits none --json "$out/gpu_${model}_b${batch}_dcts.json"
    for method in tome algm evit; do
      "${ts[@]}" bench --model "$model" --random-init --size "$size" --device cuda --repeats 20 --warmup 5 --batch "$batch" \
        --method "$method" --json "$out/gpu_${model}_b${batch}_${method}.json"
    done
  done
done
for batch in 1 8; do
  "${ts[@]}" bench --model demo --size 512 --device cuda --batch "$batch" --repeats 50 --warmup 10 --loop \
    --json "$out/gpu_demo_512_b${batch}_step.json"
  "${ts[@]}" bench --model demo --size 512 --device cuda --batch "$batch" --repeats 50 --warmup 10 --keep-per-class 5 \
    --json "$out/gpu_demo_512_b${batch}_step_keep5.json"
  for method in dtop tome algm evit; do
    "${ts[@]}" bench --model demo --size 512 --device cuda --batch "$batch" --repeats 50 --warmup 10 --method "$method" \
      --json "$out/gpu_demo_512_b${batch}_${method}.json"
  done
done
# every method's operating points on the demo's held-out scenes, one Pareto plot (mIoU against GFLOPs and GPU throughput)
"${ts[@]}" sweep --methods step,dcts,dtop,cts,tome,algm,evit --seeds 100000:100100 --device cuda --format pdf --out "$out/gpu_sweep"
# its table with each mIoU's 95% interval and the paired change against the unreduced model (GPU throughput)
"${ts[@]}" table "$(ls -d "$out"/gpu_sweep/sweep-* | tail -n 1)" > "$out/gpu_methods_table.md"
# latency tails of the demo on 200 held-out scenes, reduced against unreduced (p50/p95/p99, p99/p50)
"${ts[@]}" evaluate --seeds 100000:100200 --device cuda --json "$out/eval_tails_gpu_demo.json"  # not gpu_*: summarise.py reads bench files only
# a clip traced frame by frame: frames/s of `run` (figures and overlay video on) against the model
# alone on the same frames (decode, forward, label map), three alternating pairs, median ratio
"$py" benchmarks/clip_bench.py --device cuda --size 512 --frames 240 --out "$out/clip_gpu_512_240.json"
"$py" benchmarks/clip_bench.py --device cuda --size 1024 --frames 120 --out "$out/clip_gpu_1024_120.json"
"$py" benchmarks/summarise.py "$out"/gpu_*.json | tee "$out/gpu_summary.md"
