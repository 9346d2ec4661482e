#!/usr/bin/env bash
# How the shipped demo model (tokenscope/weights/demo.*) was trained, on 2 CPU cores:
#   1. 3000 steps of joint training (encoder, decoder, exit heads with deep supervision, dCTS
#      policy) on synthetic scenes 0..1999, seed 0: about 60 minutes;
#   2. 600 exit-aware fine-tuning steps from that checkpoint (the gates really drop confident
#      tokens, so the later blocks learn to work without them), seed 1: about 10 minutes.
# Then the held-out test: 200 scenes whose seeds were never used in training.
set -euo pipefail
cd "$(dirname "$0")/.."
ts=.venv/bin/tokenscope
$ts train --out outputs/train/demo_pre --device cpu --seed 0
$ts train --init outputs/train/demo_pre.json --out outputs/train/demo --device cpu \
  --steps 600 --lr 3e-4 --warmup 50 --exit-aware-steps 600 --seed 1 --save-every 100
$ts evaluate --weights outputs/train/demo.json --seeds 100000:100200 --device cpu --json outputs/train/demo_test.json
# to ship: cp outputs/train/demo.safetensors outputs/train/demo.json tokenscope/weights/
