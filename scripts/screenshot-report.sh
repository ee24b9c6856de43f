#!/usr/bin/env bash
# Renders a run's report.html in headless Chromium (Debian's `chromium` package) and saves a full-page PNG, to
# look at what a user sees. Usage: scripts/screenshot-report.sh RUN_DIR [OUT.png] [HEIGHT_PX]
set -euo pipefail
run_dir="${1:?usage: $0 RUN_DIR [OUT.png] [HEIGHT_PX]}"
out="${2:-$run_dir/report.png}"
height="${3:-6000}"
html="$(cd "$run_dir" && pwd)/report.html"
[ -f "$html" ] || { echo "error: $html not found (run \`pairuni report $run_dir\` first)" >&2; exit 1; }
command -v chromium >/dev/null || { echo "error: chromium not installed (apt-get install chromium)" >&2; exit 1; }
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
# The flags keep Chromium off the network (this machine has none) and out of the user's profile.
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir="$profile" --window-size="1280,$height" \
    --screenshot="$out" "file://$html" 2>/dev/null
[ -s "$out" ] || { echo "error: chromium wrote no screenshot" >&2; exit 1; }
echo "wrote $out"
