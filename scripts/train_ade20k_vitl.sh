#!/usr/bin/env bash
# STEP from the published Segmenter ViT-L/16 (mask transformer, ADE20K, 640 px), on one CUDA GPU.
#
#   ADE20K_ROOT=/data/ADEChallengeData2016 scripts/train_ade20k_vitl.sh
#
# Phase 1 trains the exit heads and the dCTS policy on the frozen segmenter (cheap: no gradient
# through the ViT). Phase 2 fine-tunes everything with supertokens (ground-truth partitions with a
# random share of merges withheld) and deep supervision; its last steps let the exits really drop
# tokens, which the demo showed is what keeps the tokens that stay accurate. Phase 3 scores the
# validation split with Segmenter's protocol (short side 640, 640-px windows, stride 608),
# with and without reduction, and phase 4 shows where the tokens go on the whole split.
#
# Schedule: Segmenter trained 160k iterations at batch 8 (SGD, lr 1e-3, poly); fine-tuning from its
# weights needs far fewer. The step counts below are ESTIMATES, not measured: 8k + 40k steps of
# batch 8 at 640 px. Cost, ESTIMATED from FLOPs (ViT-L, 1600 tokens: ~1.6 TFLOP forward, x3 with
# backward, x8 images = ~39 TFLOP a step) at ~40% of an H100's bf16 peak: ~0.1 s/step, so phase 2
# is ~1-2 GPU-hours and phase 1 well under one; memory, scaled from mmsegmentation's 16.6 GB at
# batch 1 in fp32: ~45-55 GB at batch 8 in bf16 (use --crops 640x4 on 40 GB cards).
# Known gap: no random rescaling (0.5-2x) augmentation as in Segmenter's training; crops are cut
# from images at their stored size.
set -euo pipefail
cd "$(dirname "$0")/.."
ts=.venv/bin/tokenscope
root=${ADE20K_ROOT:?set ADE20K_ROOT to the folder that holds ADEChallengeData2016}
out=outputs/train
mkdir -p "$out"
$ts models --fetch segmenter-vit-l-mask-ade20k
# 0. the published model without reduction: should reproduce its published 52.16 mIoU (single scale)
$ts evaluate --model segmenter-vit-l-mask-ade20k --policy none --exits none --data ade20k --root "$root" \
  --split val --device cuda --json "$out/ade20k_vitl_published.json"
# 1. exit heads + policy on the frozen segmenter
$ts train --init segmenter-vit-l-mask-ade20k --freeze encoder,decoder --data ade20k --root "$root" \
  --out "$out/ade20k_vitl_heads" --steps 8000 --crops 640x8 --lr 1e-3 --warmup 500 --save-every 1000 \
  --device cuda --seed 0
# 2. everything, with supertokens and (in the last 8k steps) real exits
$ts train --init "$out/ade20k_vitl_heads.json" --data ade20k --root "$root" --out "$out/ade20k_vitl_step" \
  --steps 40000 --crops 640x8 --lr 6e-5 --warmup 1500 --exit-aware-steps 8000 --save-every 2000 \
  --device cuda --seed 1
# 3. STEP vs the same weights without reduction, Segmenter's sliding-window protocol
$ts evaluate --weights "$out/ade20k_vitl_step.json" --data ade20k --root "$root" --split val --device cuda \
  --json "$out/ade20k_vitl_step_val.json"
# 4. where the tokens go on the validation split (tables, figures, report)
$ts run --dataset ade20k --data-root "$root" --split val --weights "$out/ade20k_vitl_step.json" --device cuda \
  --no-animation
$ts report
