#!/usr/bin/env bash
# STEP ViT-L/16 with a mask-transformer decoder on Cityscapes (19 classes), on one CUDA GPU.
#
#   CITYSCAPES_ROOT=/data/cityscapes VIT_L_WEIGHTS=/weights/vit_large_patch16_384.safetensors \
#     scripts/train_cityscapes_vitl.sh
#
# No Segmenter ViT-L trained on Cityscapes is published in a form this script can fetch, so the
# encoder starts from an ImageNet-21k ViT-L/16 (timm's vit_large_patch16_384 weights, a local
# file: nothing is downloaded here) and the whole segmenter is trained: decoder, exit heads and
# dCTS policy together, with supertokens, then exit-aware steps. The position embedding is resized
# to the 768-px crops. Segmenter's Cityscapes recipe: 768 px crops, batch 8, 216 epochs (~80k
# iterations), SGD lr 1e-2, poly; evaluated at the native 1024x2048 with 768-px windows, stride 512.
#
# The step counts below are ESTIMATES, not measured: 80k steps of batch 8 at 768 px. Cost,
# ESTIMATED from FLOPs (ViT-L, 2304 tokens: ~2.3 TFLOP forward, x3 with backward, x8 = ~56 TFLOP
# a step) at ~40% of an H100's bf16 peak: ~0.14 s/step, ~3-6 GPU-hours in all; memory ~60-70 GB
# at batch 8 in bf16 (use --crops 768x4 and more steps on smaller cards).
set -euo pipefail
cd "$(dirname "$0")/.."
ts=.venv/bin/tokenscope
root=${CITYSCAPES_ROOT:?set CITYSCAPES_ROOT to the folder with leftImg8bit/ and gtFine/}
vit=${VIT_L_WEIGHTS:?set VIT_L_WEIGHTS to a local timm vit_large_patch16_384 weights file}
out=outputs/train
mkdir -p "$out"
$ts train --model vitl --backbone-weights "$vit" --decoder mask --data cityscapes --root "$root" \
  --out "$out/cityscapes_vitl" --steps 80000 --crops 768x8 --lr 1e-4 --warmup 1500 \
  --exit-aware-steps 10000 --save-every 2000 --device cuda --seed 0 --no-eval
# the checkpoint records Segmenter's Cityscapes protocol: short side 1024 (native), 768-px windows, stride 512
$ts evaluate --weights "$out/cityscapes_vitl.json" --data cityscapes --root "$root" --split val --device cuda \
  --json "$out/cityscapes_vitl_val.json"
$ts run --dataset cityscapes --data-root "$root" --split val --weights "$out/cityscapes_vitl.json" \
  --device cuda --no-animation
$ts report
