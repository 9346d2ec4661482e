#!/usr/bin/env bash
# The published numbers, reproduced: every published Segmenter model on ADE20K val (2000 images,
# its own sliding-window protocol), with reduction off and with the training-free methods at the
# operating points their papers report. For a CUDA machine with network access (the data set is
# 923 MB, the five models about 2.3 GB); a few hours on one GPU, most of it ViT-L.
#
#   bash scripts/reproduce_published.sh            # all five models
#   bash scripts/reproduce_published.sh segmenter-vit-s-mask-ade20k
#
# Results: benchmarks/results/published/MODEL.csv (one row per operating point, from `sweep`);
# then `python benchmarks/published_table.py` prints README's "published vs tokenscope" table.
set -euo pipefail
cd "$(dirname "$0")/.."
ts=${TS:-.venv/bin/tokenscope}
device=${DEVICE:-cuda}
models=("$@")
if [ ${#models[@]} -eq 0 ]; then
  models=(segmenter-vit-t-mask-ade20k segmenter-vit-s-linear-ade20k segmenter-vit-s-mask-ade20k
          segmenter-vit-b-mask-ade20k segmenter-vit-l-mask-ade20k)
fi
# the operating points (see benchmarks/published_table.py for where each comes from):
#   algm:threshold=0.88  ALGM's ViT-S/16 setting (layers 1 and 5 of 12, 1 and 7 of 24), training-free here
#   cts:groups=0.4       CTS's 30% token reduction (103 of 256 2x2 groups at 512 px), uniformity scores
#   tome:r=0.05          5% of the tokens merged per block (ToMe publishes no segmentation figure)
methods=${METHODS:-algm:threshold=0.88,cts:groups=0.4,tome:r=0.05}
out=benchmarks/results/published
mkdir -p "$out"
$ts data fetch ade20k
for m in "${models[@]}"; do
  $ts models --fetch "$m"
  tmp=$(mktemp -d)
  $ts sweep --model "$m" --data ade20k --split val --methods "$methods" --device "$device" --out "$tmp"
  cp "$tmp"/sweep-*/sweep.csv "$out/$m.csv"
  rm -rf "$tmp"
  echo "$m: $out/$m.csv"
done
.venv/bin/python benchmarks/published_table.py
