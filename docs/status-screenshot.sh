#!/usr/bin/env bash
# Photographs the status page (docs/status.png) over the fleet of
# examples/status_fleet.rs, with Debian's headless chromium.
#
#   docs/status-screenshot.sh [OUTPUT.png]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-docs/status.png}"
chromium="${CHROMIUM:-/usr/bin/chromium}"
[ -x "$chromium" ] || { echo "no $chromium: apt-get install chromium" >&2; exit 1; }

cargo build --quiet --example status_fleet
fleet="${CARGO_TARGET_DIR:-target}/debug/examples/status_fleet"
work="$(mktemp -d)"
"$fleet" >"$work/fleet.log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null; rm -rf "$work"' EXIT

# The fleet settles in a few seconds (its first health checks, the circuit).
for _ in $(seq 300); do
  grep -q '^ready ' "$work/fleet.log" && break
  kill -0 "$pid" 2>/dev/null || { cat "$work/fleet.log" >&2; exit 1; }
  sleep 0.1
done
url="$(sed -n 's/^ready //p' "$work/fleet.log")"
[ -n "$url" ] || { echo "the fleet did not settle" >&2; exit 1; }

"$chromium" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --hide-scrollbars --user-data-dir="$work/profile" \
  --window-size=1280,900 --virtual-time-budget=3000 \
  --screenshot="$out" "$url" 2>/dev/null
echo "wrote $out from $url"
