#!/usr/bin/env bash
# The one command for a CUDA machine: the test suite (tests/test_gpu.py runs only here), then every
# GPU benchmark row into benchmarks/results/gpu_*.json and the table benchmarks/results/gpu_summary.md.
#
# Rows: bf16 autocast, 1024x1024, batch 1 and 8, random weights (speed does not depend on their values):
#   - ViT-B/16 and ViT-L/16 with a linear decoder (vitb, vitl) and the published Segmenter ViT-B/L
#     architectures with their mask-transformer decoder (no download with --random-init);
#   - methods: dCTS at the paper's 2.5x token budget (exits off), the training-free uniform
#     policy, and each with torch.compile on the encoder blocks; the training-free neighbours
#     ToMe (r = 5% of the tokens per block, proportional attention), ALGM (local 0.88 + adaptive
#     global), CTS (40% of the 2x2 groups shared) and EViT (keep rate 0.7 at blocks 4, 7, 10 of 12);
#   - EoMT-L (the two published semantic architectures, 512 and 1024 px) with the dCTS budget, ToMe,
#     ALGM and EViT;
#   - the shipped demo with full STEP (learned dCTS policy + learned exits) at 512 px, also with
#     DToP's keep-per-class rule (K = 5) at the gates;
#   - latency tails of the demo on 200 held-out scenes, and a video clip's frame rate.
# About 45-90 minutes on one H100. Set up first as README.md says (the venv must see the GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
ts=.venv/bin/tokenscope
py=.venv/bin/python
$py -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')"
$py -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
out=benchmarks/results
mkdir -p "$out"

$py -m pytest -q -rs tests 2>&1 | tee "$out/gpu_tests.txt"

common=(--random-init --size 1024 --device cuda --repeats 20 --warmup 5)
for model in vitb vitl segmenter-vit-b-mask-ade20k segmenter-vit-l-mask-ade20k; do
  for batch in 1 8; do
    $ts bench --model "$model" "${common[@]}" --batch "$batch" --budget 2.5 --exits none \
      --json "$out/gpu_${model}_1024_b${batch}_dcts.json"
    $ts bench --model "$model" "${common[@]}" --batch "$batch" --budget 2.5 --exits none --compile \
      --json "$out/gpu_${model}_1024_b${batch}_dcts_compile.json"
    $ts bench --model "$model" "${common[@]}" --batch "$batch" --policy uniform --exits none \
      --json "$out/gpu_${model}_1024_b${batch}_uniform.json"
    for method in tome algm cts evit; do
      $ts bench --model "$model" "${common[@]}" --batch "$batch" --method "$method" \
        --json "$out/gpu_${model}_1024_b${batch}_${method}.json"
    done
  done
done
# EoMT-L (DINOv2, 100 queries in the last 4 blocks) at its two published crops, random weights
for spec in eomt-l-ade20k-512:512 eomt-l-cityscapes-1024:1024; do
  model=${spec%%:*}; size=${spec##*:}
  for batch in 1 8; do
    $ts bench --model "$model" --random-init --size "$size" --device cuda --repeats 20 --warmup 5 --batch "$batch" \
      --budget 2.5 --exits none --json "$out/gpu_${model}_b${batch}_dcts.json"
    for method in tome algm evit; do
      $ts bench --model "$model" --random-init --size "$size" --device cuda --repeats 20 --warmup 5 --batch "$batch" \
        --method "$method" --json "$out/gpu_${model}_b${batch}_${method}.json"
    done
  done
done
for batch in 1 8; do
  $ts bench --model demo --size 512 --device cuda --batch "$batch" --repeats 50 --warmup 10 --loop \
    --json "$out/gpu_demo_512_b${batch}_step.json"
  $ts bench --model demo --size 512 --device cuda --batch "$batch" --repeats 50 --warmup 10 --keep-per-class 5 \
    --json "$out/gpu_demo_512_b${batch}_step_keep5.json"
  for method in dtop tome algm evit; do
    $ts bench --model demo --size 512 --device cuda --batch "$batch" --repeats 50 --warmup 10 --method "$method" \
      --json "$out/gpu_demo_512_b${batch}_${method}.json"
  done
done
# every method's operating points on the demo's held-out scenes, one Pareto plot (mIoU against GFLOPs and GPU throughput)
$ts sweep --methods step,dcts,dtop,cts,tome,algm,evit --seeds 100000:100100 --device cuda --format pdf --out "$out/gpu_sweep"
# its table with each mIoU's 95% interval and the paired change against the unreduced model (GPU throughput)
$ts table "$(ls -d "$out"/gpu_sweep/sweep-* | tail -n 1)" > "$out/gpu_methods_table.md"
# latency tails of the demo on 200 held-out scenes, reduced against unreduced (p50/p95/p99, p99/p50)
$ts evaluate --seeds 100000:100200 --device cuda --json "$out/eval_tails_gpu_demo.json"  # not gpu_*: summarise.py reads bench files only
# a clip traced frame by frame: frames/s of `run` (figures and overlay video on) against the model
# alone on the same frames (decode, forward, label map), three alternating pairs, median ratio
$py benchmarks/clip_bench.py --device cuda --size 512 --frames 240 --out "$out/clip_gpu_512_240.json"
$py benchmarks/clip_bench.py --device cuda --size 1024 --frames 120 --out "$out/clip_gpu_1024_120.json"
$py benchmarks/summarise.py "$out"/gpu_*.json | tee "$out/gpu_summary.md"
