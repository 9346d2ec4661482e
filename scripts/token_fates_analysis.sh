#!/usr/bin/env bash
# The worked analysis of docs/analysis.md, regenerated on the demo: where every token of step, evit, algm
# and tome goes on the 100 held-out scenes (per-class fate figures and tables), how often an early decision
# differs from the unreduced model (agreement table), where merges, prunes and exits happen relative to class
# boundaries (boundary table and figure), and how the reduction grows with the input size (512, 1024, 2048 px).
#
#   bash scripts/token_fates_analysis.sh            # 512 px part, about 21 minutes on 2 CPU cores
#   SIZES=1 bash scripts/token_fates_analysis.sh    # also the sizes part (about 18 minutes on 2 cores:
#                                                   # the unreduced model takes ~45 s per image at 2048 px)
#   ONLY_SIZES=1 bash scripts/token_fates_analysis.sh   # the sizes part alone
# Figures go to docs/analysis/ as PNG (for the README) with a PDF beside each; tables as Markdown and LaTeX.
set -euo pipefail
cd "$(dirname "$0")/.."
ts=${TS:-.venv/bin/tokenscope}
py=${PY:-.venv/bin/python}
dest=${DEST:-docs/analysis}
seeds=${SEEDS:-100000:100100}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$dest"
methods=(step evit algm tome)

if [ -z "${ONLY_SIZES:-}" ]; then
# 1. per-class fates of each method on the held-out scenes (a run of the data set, figures from its tables)
for m in "${methods[@]}"; do
  $ts run --dataset synthetic --seeds "$seeds" --method "$m" --no-figures --device "${DEVICE:-cpu}" --out "$tmp/run_$m" >/dev/null
  run=$(ls -d "$tmp/run_$m"/run-*)
  rm -f "$dest/class_fates_$m.png" "$dest/class_fates_$m.pdf" "$dest/classes_$m.md"
  $ts table "$run" --kind classes --figure "$dest/class_fates_$m.png" > "$dest/classes_$m.md"
  $ts table "$run" --kind classes --figure "$dest/class_fates_$m.pdf" --format latex > "$dest/classes_$m.tex"
done

# 2. the same scenes as image files with their labels, compared with every method beside the unreduced model
$py - "$tmp/scenes" "$seeds" <<'EOF'
import sys
from pathlib import Path

import cv2
import numpy as np

from tokenscope.data.synthetic import synthetic_scene

out = Path(sys.argv[1])
(out / "labels").mkdir(parents=True)
first, last = (int(v) for v in sys.argv[2].split(":"))
for seed in range(first, last):
    scene = synthetic_scene(seed)
    rgb = (scene.image * 255).round().astype(np.uint8)
    cv2.imwrite(str(out / f"scene_{seed}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(out / "labels" / f"scene_{seed}.png"), scene.labels.astype(np.uint8))
EOF
$ts compare "$tmp/scenes" --labels "$tmp/scenes/labels" --methods "$(IFS=,; echo "${methods[*]}")" --repeats 1 \
  --warmup 0 --device "${DEVICE:-cpu}" --out "$tmp/cmp" >/dev/null
cmp=$(ls -d "$tmp/cmp"/compare-*)
rm -f "$dest"/boundary.png "$dest"/boundary.pdf
$ts table "$cmp" --kind agreement > "$dest/agreement.md"
$ts table "$cmp" --kind agreement --format latex > "$dest/agreement.tex"
$ts table "$cmp" --kind boundary --figure "$dest/boundary.png" > "$dest/boundary.md"
$ts table "$cmp" --kind boundary --figure "$dest/boundary.pdf" --format latex > "$dest/boundary.tex"
$ts table "$cmp" > "$dest/methods_512.md"
fi

# 3. reduction against input size: each size against its own unreduced model (a subset of the scenes:
#    the unreduced model at 2048 px is the slow part)
if [ -n "${SIZES:-}${ONLY_SIZES:-}" ]; then
  $ts sweep --methods "step:merge=0.5:exit=0.95,evit:rate=0.7,algm:threshold=0.88,tome:r=0.05" --seeds "${SIZE_SEEDS:-100000:100010}" \
    --sizes 512,1024,2048 --device "${DEVICE:-cpu}" --format pdf --out "$tmp/sizes" >/dev/null
  sweep=$(ls -d "$tmp/sizes"/sweep-*)
  cp "$sweep/scaling.pdf" "$sweep/sweep.csv" "$dest/" && mv "$dest/sweep.csv" "$dest/sizes.csv"
  $py -c "import sys, pandas as pd; from tokenscope.render.pareto import size_scaling_figure; \
size_scaling_figure(pd.read_csv(sys.argv[1])).savefig(sys.argv[2], dpi=110)" "$dest/sizes.csv" "$dest/scaling.png"
  $ts table "$sweep" > "$dest/sizes.md"
fi
echo "analysis outputs: $dest"
