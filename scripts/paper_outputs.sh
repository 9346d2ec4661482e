#!/usr/bin/env bash
# The demo's paper outputs, regenerated: the methods sweep on 100 held-out scenes as vector Pareto
# figures (PDF), its LaTeX and Markdown methods tables, and a PNG of the Pareto figure for the README.
# About 13 minutes on 2 CPU cores (31 operating points x 100 scenes at 512 px).
#
#   bash scripts/paper_outputs.sh            # into docs/paper/
set -euo pipefail
cd "$(dirname "$0")/.."
ts=${TS:-.venv/bin/tokenscope}
py=${PY:-.venv/bin/python}
dest=${DEST:-docs/paper}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
$ts sweep --methods step,dcts,dtop,cts,tome,algm,evit,pitome,hourglass,cubist --seeds 100000:100100 --device "${DEVICE:-cpu}" \
  --format pdf --no-titles --out "$tmp"
sweep=$(ls -d "$tmp"/sweep-*)
mkdir -p "$dest"
cp "$sweep"/pareto_gflops_512.pdf "$sweep"/pareto_throughput_512.pdf "$sweep"/sweep.csv "$sweep"/run.json "$dest"/
$ts table "$sweep" --format latex > "$dest"/methods.tex
$ts table "$sweep" --format markdown > "$dest"/methods.md
$py -c "import sys, tokenscope as ts; ts.plot.pareto(sys.argv[1]).savefig(sys.argv[2], dpi=110)" "$sweep" "$dest"/pareto_gflops_512.png
echo "paper outputs: $dest"
