#!/usr/bin/env bash
# The CPU rows of benchmarks/RESULTS.md: STEP (dCTS only, 2.5x token budget) against the same
# network without reduction, 2 threads, random weights (speed does not depend on their values).
# Each row takes minutes (ViT-L at 1024 px, batch 8: about an hour). Run on an idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
ts=.venv/bin/tokenscope
common=(--random-init --budget 2.5 --exits none --size 1024 --device cpu --threads 2)
$ts bench --model vitb "${common[@]}" --batch 1 --repeats 5 --warmup 1 --loop --json benchmarks/results/cpu_vitb_1024_b1.json
$ts bench --model vitb "${common[@]}" --batch 8 --repeats 2 --warmup 1 --json benchmarks/results/cpu_vitb_1024_b8.json
$ts bench --model vitl "${common[@]}" --batch 1 --repeats 3 --warmup 1 --json benchmarks/results/cpu_vitl_1024_b1.json
$ts bench --model vitl "${common[@]}" --batch 8 --repeats 2 --warmup 1 --json benchmarks/results/cpu_vitl_1024_b8.json
# the shipped demo model, full STEP (learned policy + exits) at 512 px
$ts bench --model demo --size 512 --device cpu --threads 2 --batch 1 --repeats 10 --warmup 2 --loop --json benchmarks/results/cpu_demo_512_b1.json
$ts bench --model demo --size 512 --device cpu --threads 2 --batch 8 --repeats 5 --warmup 1 --loop --json benchmarks/results/cpu_demo_512_b8.json
# recorder overhead with more on/off pairs, and padded batch against a loop without exits (ViT-B, 512 px, batch 8)
small=(--random-init --budget 2.5 --exits none --size 512 --device cpu --threads 2)
$ts bench --model vitb "${small[@]}" --batch 8 --repeats 8 --warmup 1 --json benchmarks/results/cpu_vitb_512_b8.json
$ts bench --model vitb "${small[@]}" --batch 8 --repeats 3 --warmup 1 --loop --json benchmarks/results/cpu_vitb_512_b8_loop.json
# ToMe (training-free, r = 5% of the tokens per block, proportional attention) on ViT-B at 1024 px, batch 8
$ts bench --model vitb --random-init --method tome --size 1024 --device cpu --threads 2 --batch 8 --repeats 2 --warmup 1 --json benchmarks/results/cpu_vitb_1024_b8_tome.json
$ts bench --model vitb --random-init --method tome --size 1024 --device cpu --threads 2 --batch 1 --repeats 3 --warmup 1 --json benchmarks/results/cpu_vitb_1024_b1_tome.json
# ALGM and CTS at their defaults (random weights make ALGM merge far more than on a trained model)
$ts bench --model vitb --random-init --method algm --size 1024 --device cpu --threads 2 --batch 1 --repeats 3 --warmup 1 --json benchmarks/results/cpu_vitb_1024_b1_algm.json
$ts bench --model vitb --random-init --method cts --size 1024 --device cpu --threads 2 --batch 1 --repeats 3 --warmup 1 --json benchmarks/results/cpu_vitb_1024_b1_cts.json
# EoMT-L (the published ADE20K 512 architecture, random weights): ALGM, ToMe and EViT at their defaults
for m in algm tome evit; do
  $ts bench --model eomt-l-ade20k-512 --random-init --method $m --size 512 --device cpu --threads 2 --batch 1 --repeats 5 --warmup 1 --json benchmarks/results/cpu_eomt-l-ade20k-512_512_b1_$m.json
done
# every built-in method side by side against one baseline: ViT-B at 1024 px, batch 8 of different scenes (about 40 minutes)
$ts bench --model vitb --random-init --size 1024 --batch 8 --device cpu --threads 2 --repeats 3 --warmup 1 \
  --methods tome,algm,cts,cubist,evit,hourglass,pitome,dcts:budget=2.5,step:budget=2.5,dtop \
  --json benchmarks/results/cpu_vitb_1024_b8_methods.json
