#!/usr/bin/env bash
# Runs README.md's two newcomer commands as written: starts `cargo run --release -- serve` on
# built-in defaults on a clean data dir, pastes the quickstart block verbatim into bash twice
# (the second run must work on the same data: names and the order id are unique per run), then
# stops serve and runs the block once more, which must fail loudly (a FAILED line naming the
# address, a non-zero exit) instead of printing nothing.
#
# It binds 8080-8082 (the built-in defaults), so run it under the ports lock on a shared
# machine: `flock /tmp/marketgate-ports.lock tests/quickstart.sh` (tests/run.sh does not take
# the lock itself: a nested flock on the same file would wait for its own parent).
#
# Data goes to a temporary directory (MARKETGATE_DATA_DIR) so that a developer's
# ./marketgate-data is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d /tmp/mg-quickstart.XXXXXX)
serve_pid=
stop_serve() {
  if [[ -n $serve_pid ]]; then
    kill "$serve_pid" 2>/dev/null || true
    wait "$serve_pid" 2>/dev/null || true
    serve_pid=
  fi
}
cleanup() {
  stop_serve
  rm -rf "$work"
}
trap cleanup EXIT

run_cmd=$(awk '/^## Run the gateway/{s=1} s&&/^```sh$/{f=1;next} f&&/^```$/{exit} f{print}' README.md)
awk '/^### Quickstart/{q=1} q&&/^```sh$/{f=1;next} f&&/^```$/{exit} f{print}' README.md > "$work/quickstart.sh"
[[ $run_cmd == "cargo run --release -- serve" ]] || { echo "README's run command changed: update tests/quickstart.sh"; exit 1; }
[[ -s $work/quickstart.sh ]] || { echo "no quickstart block found in README.md"; exit 1; }

ports_free() {
  local port
  for port in 8080 8081 8082; do
    if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then
      echo "port $port is taken: $1"
      return 1
    fi
  done
}
ports_free "the quickstart needs the built-in defaults 8080-8082 free" || exit 1

cargo build --release --quiet
# serve starts and the quickstart is pasted at once: the block's own wait for /readyz is what
# keeps it from racing the start.
MARKETGATE_DATA_DIR=$work/data bash -c "$run_cmd" > "$work/serve.log" 2>&1 &
serve_pid=$!

# run N: pastes the block once; a failure shows its output and serve's log.
run() {
  local out=$work/out-$1.txt
  if ! READY_TIMEOUT=120 bash "$work/quickstart.sh" > "$out" 2>&1; then
    cat "$out"; echo "--- serve log"; tail -50 "$work/serve.log"
    echo "quickstart run $1: FAILED"; exit 1
  fi
  echo "--- quickstart run $1"
  cat "$out"
  local expect
  for expect in '^0\. serve is ready' '^1\. created group' '^2\. published' '^3\. listed' \
    '^4\. bought 100 calls' '200 OK' 'Beijing' '"quota_used": 1' '"quota_left": 99'; do
    grep -q -- "$expect" "$out" || { echo "quickstart run $1: no line matching $expect"; exit 1; }
  done
  if grep -q FAILED "$out"; then echo "quickstart run $1: a step said FAILED"; exit 1; fi
}
run 1
run 2

# Against a serve that is not up: it must say so and exit non-zero, not print nothing.
stop_serve
ports_free "serve did not release it on SIGTERM" || exit 1
set +e
READY_TIMEOUT=2 bash "$work/quickstart.sh" > "$work/out-down.txt" 2>&1
status=$?
set -e
echo "--- quickstart with serve down (exit $status)"
cat "$work/out-down.txt"
[[ $status -ne 0 ]] || { echo "quickstart with serve down: exited 0"; exit 1; }
grep -q 'FAILED: serve is not ready on http://127.0.0.1:8082' "$work/out-down.txt" \
  || { echo "quickstart with serve down: no FAILED line naming the admin address"; exit 1; }
if grep -q '^1\.' "$work/out-down.txt"; then echo "quickstart with serve down: went on past step 0"; exit 1; fi
echo "quickstart: 3 passed, 0 failed"
