#!/usr/bin/env bash
# Runs README.md's two newcomer commands as written: starts `cargo run --release -- serve` on
# built-in defaults, then pastes the quickstart block verbatim into bash, and checks that the
# signed call was served and counted. Data goes to a temporary directory (MARKETGATE_DATA_DIR)
# so that a developer's ./marketgate-data is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d /tmp/mg-quickstart.XXXXXX)
serve_pid=
cleanup() {
  [[ -n $serve_pid ]] && kill "$serve_pid" 2>/dev/null && wait "$serve_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

run_cmd=$(awk '/^## Run the gateway/{s=1} s&&/^```sh$/{f=1;next} f&&/^```$/{exit} f{print}' README.md)
awk '/^### Quickstart/{q=1} q&&/^```sh$/{f=1;next} f&&/^```$/{exit} f{print}' README.md > "$work/quickstart.sh"
[[ $run_cmd == "cargo run --release -- serve" ]] || { echo "README's run command changed: update tests/quickstart.sh"; exit 1; }
[[ -s $work/quickstart.sh ]] || { echo "no quickstart block found in README.md"; exit 1; }

for port in 8080 8081 8082; do
  if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then
    echo "port $port is taken: the quickstart needs the built-in defaults"; exit 1
  fi
done

cargo build --release --quiet
MARKETGATE_DATA_DIR=$work/data bash -c "$run_cmd" > "$work/serve.log" 2>&1 &
serve_pid=$!
for _ in $(seq 300); do
  curl -sf -o /dev/null http://127.0.0.1:8082/healthz && break
  kill -0 "$serve_pid" 2>/dev/null || { cat "$work/serve.log"; echo "serve exited"; exit 1; }
  sleep 0.2
done

if ! bash -euo pipefail "$work/quickstart.sh" > "$work/out.txt" 2>&1; then
  cat "$work/out.txt"; echo "--- serve log"; tail -50 "$work/serve.log"
  echo "quickstart: FAILED"; exit 1
fi
cat "$work/out.txt"
grep -q '200 OK' "$work/out.txt" || { echo "quickstart: the signed call was not answered 200"; exit 1; }
grep -q 'Beijing' "$work/out.txt" || { echo "quickstart: the MOCK body did not arrive"; exit 1; }
grep -q '"quota_used": 1' "$work/out.txt" || { echo "quickstart: the call was not counted"; exit 1; }
grep -q '"quota_left": 99' "$work/out.txt" || { echo "quickstart: 99 calls should be left"; exit 1; }
echo "quickstart: 1 passed, 0 failed"
