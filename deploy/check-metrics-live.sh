#!/usr/bin/env bash
# Starts `marketgate serve` on free loopback ports with an empty data dir, takes a /metrics
# dump and runs deploy/check-metrics.sh on it: every metric the alert rules and the
# dashboard use must be exported by a running serve (a `# TYPE` line is enough for a
# labelled metric that has no series yet).
#
#   bash deploy/check-metrics-live.sh [path/to/marketgate]    # default: target/debug/marketgate
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${1:-target/debug/marketgate}"
[ -x "$bin" ] || { echo "no marketgate binary at $bin (cargo build first)" >&2; exit 2; }
work="$(mktemp -d)"
pid=""
cleanup() {
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

read -r gateway control admin < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
for s in socks: s.close()')
token="check-metrics-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"

env MARKETGATE_GATEWAY__LISTEN="127.0.0.1:$gateway" \
    MARKETGATE_CONTROL__LISTEN="127.0.0.1:$control" \
    MARKETGATE_ADMIN__LISTEN="127.0.0.1:$admin" \
    MARKETGATE_ADMIN__TOKEN="$token" \
    MARKETGATE_DATA_DIR="$work/data" \
    "$bin" serve > "$work/serve.log" 2>&1 &
pid=$!

for _ in $(seq 1 100); do
    if curl -fsS -o /dev/null "http://127.0.0.1:$admin/healthz" 2>/dev/null; then break; fi
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "marketgate serve exited early:" >&2; cat "$work/serve.log" >&2; exit 1
    fi
    sleep 0.1
done
curl -fsS -H "Authorization: Bearer $token" "http://127.0.0.1:$admin/metrics" > "$work/metrics.txt" || {
    echo "GET /metrics failed; serve log:" >&2; cat "$work/serve.log" >&2; exit 1; }
bash deploy/check-metrics.sh "$work/metrics.txt"
