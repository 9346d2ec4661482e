#!/usr/bin/env bash
# Expedit's Segmenter comparison, on tokenscope: the official Segmenter ViT-L/16 ADE20K weights at
# 640 px with reduction off, with Hourglass (Expedit's token clustering and reconstruction) and with
# ToMe and EViT at their own defaults, scored on ADE20K val; our numbers printed beside Expedit's
# published ones. For a CUDA machine with network access (ADE20K 923 MB, ViT-L about 1.3 GB).
#
#   bash scripts/reproduce_expedit_table.sh
#
# Everything is overridable, which is how a test runs it offline on a tiny imported checkpoint:
#   MODEL_ARGS  how the model is named   (default: --model segmenter-vit-l-mask-ade20k)
#   DATA_ARGS   what it is scored on      (default: --data ade20k --split val)
#   METHODS     the operating points      (default: hourglass:side=0.7,tome:r=0.05,evit:rate=0.7)
#   DEVICE, OUT, TS (the tokenscope command), PY (python)
# Results: $OUT/sweep.csv (default benchmarks/results/expedit/) and the table on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
ts=${TS:-.venv/bin/tokenscope}
py=${PY:-.venv/bin/python}
device=${DEVICE:-cuda}
model_args=${MODEL_ARGS:---model segmenter-vit-l-mask-ade20k}
data_args=${DATA_ARGS:---data ade20k --split val}
methods=${METHODS:-hourglass:side=0.7,tome:r=0.05,evit:rate=0.7}
out=${OUT:-benchmarks/results/expedit}
mkdir -p "$out"
case " $data_args " in
  *" ade20k "*) $ts data fetch ade20k ;;
esac
case " $model_args " in
  *" --model segmenter-"*) $ts models --fetch "${model_args##*--model }" ;;
esac
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# shellcheck disable=SC2086  # the argument lists are meant to split
$ts sweep $model_args $data_args --methods "$methods" --device "$device" --out "$tmp"
cp "$tmp"/sweep-*/sweep.csv "$out/sweep.csv"
$py benchmarks/expedit_table.py "$out/sweep.csv"
