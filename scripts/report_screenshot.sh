#!/usr/bin/env bash
# Render a tokenscope HTML report in headless Chromium and save a full-page screenshot.
#   scripts/report_screenshot.sh outputs/run-.../report.html shot.png [width] [height]
# Needs Debian's chromium (apt-get install chromium). The flags keep Chromium off the network.
set -euo pipefail
report=$(realpath "$1")
shot=$(realpath -m "$2")
width=${3:-1280}
height=${4:-4000}
browser=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$browser" ]; then
  echo "chromium not found: apt-get install chromium" >&2
  exit 2
fi
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$profile" \
  --window-size="${width},${height}" --screenshot="$shot" "file://$report" >/dev/null 2>&1
test -s "$shot"
echo "$shot"
