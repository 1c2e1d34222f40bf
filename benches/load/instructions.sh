#!/usr/bin/env bash
# Instructions per request (noise-free, for a busy machine): each proxy runs under
# `valgrind --tool=callgrind` with instrumentation off; after a warm-up it is switched on for
# a fixed number of seconds of `wrk -c8` keep-alive load and off again, and the instructions
# executed (Ir, every thread of the process) are divided by the requests wrk got answered.
#
# Decision it informs: where a request's CPU goes and whether a change cut it, for
# marketgate's enforced path (HMAC-signed call, purchase, quota, forward) as `marketgate
# proxy` and as `marketgate serve` on its defaults, against nginx proxying the same request
# (the same headers sent, keep-alive upstream, access log off: ../PERF-NOTES.md's setup).
#
# SHA-256: valgrind hides SHA-NI from the CPU flags, so sha2 runs its portable compression
# under callgrind (~3.5k instructions per 64-byte block) where the real CPU runs SHA-NI at a
# small fraction of that. Each marketgate row is therefore also given without the
# instructions inside `sha2::sha256::compress256` (Ir "w/o sha256") and with the number of
# compressions per request, so that the HMAC path is neither over- nor under-counted.
# Allocations per request: the calls into the allocator (glibc's malloc/calloc/realloc, or
# mimalloc's entry points in a binary built with it) ÷ requests answered, every thread.
#
# Syscalls per request (`COUNT=syscalls`): the same rows with each server run bare (no
# valgrind) and `perf stat` counting its system calls (tracepoints `raw_syscalls:sys_enter`
# and `syscalls:sys_enter_*` for the I/O and wake-up calls), context switches and CPU time
# over the measured seconds, each divided by the requests answered. Kernel work per request
# that callgrind does not see: reads split in two, writes flushed apart, extra epoll_waits.
# Counts per request at `CONNS=1` hardly move with the machine's load; at more connections
# requests share wake-ups, so compare only runs of similar rates.
#
# Usage: benches/load/instructions.sh
#   MARKETGATE_BIN (target/release/marketgate), SECONDS_MEASURED (8), CONNS (8), ROWS ("nginx
#   enforced plain serve"), COUNT (instructions or syscalls), OUT (a directory to keep the
#   callgrind files in; default: a temporary one).
# Binds 127.0.0.1:18100-18104 and, for the serve row, 8080-8082 (holds /tmp/marketgate-ports.lock).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${MARKETGATE_BIN:-target/release/marketgate}
[[ $BIN == /* ]] || BIN=$PWD/$BIN
MEASURE=${SECONDS_MEASURED:-8}
CONNS=${CONNS:-8}
COUNT=${COUNT:-instructions}
ROWS=${ROWS:-nginx enforced plain serve}
WORK=$(mktemp -d /tmp/mg-instr.XXXXXX)
OUT=${OUT:-$WORK/out}
mkdir -p "$OUT"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK/serve" "$WORK/mg-data" "$WORK"/*.conf "$WORK"/*.lua
}
trap cleanup EXIT
case $COUNT in
  instructions) TOOLS=(valgrind callgrind_control callgrind_annotate) ;;
  syscalls) TOOLS=(perf) ;;
  *) echo "COUNT is instructions or syscalls"; exit 2 ;;
esac
for tool in "${TOOLS[@]}" wrk nginx taskset curl jq; do
  command -v "$tool" >/dev/null || { echo "missing $tool"; exit 2; }
done

BODY='{"status":"ok","service":"backend","payload":"0123456789abcdef"}'
cat > "$WORK/backend.conf" <<CONF
worker_processes 1; daemon off; pid $WORK/backend.pid; error_log $WORK/backend.err;
events { worker_connections 4096; }
http { access_log off;
  server { listen 127.0.0.1:18100 reuseport backlog=4096; keepalive_requests 1000000;
    location / { default_type application/json; return 200 '$BODY'; } } }
CONF
# nginx as in run.sh, but one process (no master) so that valgrind follows the worker.
cat > "$WORK/nginx.conf" <<CONF
worker_processes 1; master_process off; daemon off; pid $WORK/nginx.pid; error_log $WORK/nginx.err;
events { worker_connections 4096; }
http { access_log off;
  upstream backend { server 127.0.0.1:18100; keepalive 64; keepalive_requests 1000000; }
  server { listen 127.0.0.1:18101 backlog=4096; keepalive_requests 1000000;
    location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
CONF
cat > "$WORK/marketgate.toml" <<CONF
data_dir = "$WORK/mg-data"
[gateway]
listen = "127.0.0.1:18102"
workers = 1
[admin]
listen = "127.0.0.1:18103"
token = "bench-admin-token"
[log]
level = "warn"
CONF
NOW=$(date +%s)
cat > "$WORK/snapshot.json" <<JSON
{"version": 1,
 "groups": [{"id": "g1", "name": "bench", "sl_domain": "plain.bench.local", "url_domain": "market.bench.local",
   "market_state": "on_sale",
   "apis": [
     {"id": "a1", "name": "enforced", "type": 1, "req_protocol": "BOTH", "req_method": "GET", "req_uri": "/enforced",
      "match_mode": "NORMAL", "auth_type": "APP", "backend": {"type": "HTTP", "req_protocol": "HTTP", "req_method": "GET",
      "req_uri": "/", "url_domain": "127.0.0.1:18100", "timeout_ms": 5000}},
     {"id": "a2", "name": "plain", "type": 1, "req_protocol": "HTTP", "req_method": "GET", "req_uri": "/plain",
      "match_mode": "NORMAL", "auth_type": "NONE", "backend": {"type": "HTTP", "req_protocol": "HTTP", "req_method": "GET",
      "req_uri": "/", "url_domain": "127.0.0.1:18100", "timeout_ms": 5000}}]}],
 "apps": [{"id": "app1", "app_key": "benchkey0001", "app_secret": "benchsecret0001", "app_codes": [], "creator": "MARKET"}],
 "purchases": [{"id": "p1", "group_id": "g1", "app_id": "app1", "state": "active", "start_time": $((NOW - 60)),
   "expire_time": $((NOW + 86400)), "quota_limit": 1000000000000}]}
JSON

wait_port() { for _ in $(seq 600); do curl -s -o /dev/null "http://127.0.0.1:$1/" && return 0; sleep 0.1; done; echo "port $1 never answered"; exit 1; }
# sign_lua KEY SECRET HOST URL OUT: a pre-signed request (valid for the 15-minute window).
sign_lua() {
  local signed
  signed=$("$BIN" sign --key "$1" --secret "$2" -H "Host: $3" "$4")
  cat > "$5" <<LUA
wrk.headers["Host"] = "$3"
wrk.headers["X-Sdk-Date"] = "$(grep -o "x-sdk-date: [0-9TZ]*" <<<"$signed" | cut -d' ' -f2)"
wrk.headers["Authorization"] = "$(grep -o "authorization: SDK-HMAC-SHA256[^']*" <<<"$signed" | sed 's/^authorization: //')"
LUA
}

taskset -c 1 nginx -c "$WORK/backend.conf" & PIDS+=($!)
wait_port 18100

# The system calls counted per request in COUNT=syscalls (besides all of them).
SYSCALLS=(epoll_wait epoll_pwait read readv recvfrom write writev sendto futex)
PERF_EVENTS=raw_syscalls:sys_enter,context-switches,task-clock
for call in "${SYSCALLS[@]}"; do PERF_EVENTS+=",syscalls:sys_enter_$call"; done

# count_syscalls NAME PID URL LUA -> prints "NAME requests, then per request: syscalls, each
# counted call, context switches, CPU µs"
count_syscalls() {
  local name=$1 pid=$2 url=$3 lua=$4
  taskset -c 1 wrk -t1 "-c$CONNS" -d3s -s "$lua" "$url" >/dev/null # warm-up
  perf stat -x, -e "$PERF_EVENTS" -p "$pid" -o "$WORK/perf.txt" & local perf=$!
  sleep 0.2 # perf attached before the first measured request
  taskset -c 1 wrk -t1 "-c$CONNS" "-d${MEASURE}s" -s "$lua" "$url" > "$WORK/wrk.txt"
  kill -INT "$perf"; wait "$perf" || true
  kill "$pid"; wait "$pid" 2>/dev/null || true
  if grep -q "Non-2xx" "$WORK/wrk.txt"; then echo "$name: non-2xx answers"; cat "$WORK/wrk.txt"; exit 1; fi
  awk -F, -v n="$name" -v r="$(awk '/requests in/ {print $1}' "$WORK/wrk.txt")" '
    /^#/ || NF < 3 { next }
    { event = $3; sub(/^(raw_)?syscalls:sys_enter_?/, "", event); v[event] = $1 }
    END {
      printf "%-9s %7d req  syscalls %5.2f/req", n, r, v[""] / r
      split("epoll_wait epoll_pwait read readv recvfrom write writev sendto futex", calls, " ")
      for (i = 1; i in calls; i++) if (v[calls[i]] > 0) printf "  %s %.2f", calls[i], v[calls[i]] / r
      printf "  cs %.2f  cpu %.1f us/req\n", v["context-switches"] / r, v["task-clock"] * 1000 / r
    }' "$WORK/perf.txt"
}

# measure NAME PID URL LUA -> prints "NAME Ir/request Ir-w/o-sha256/request sha256-blocks/request requests"
measure() {
  if [[ $COUNT == syscalls ]]; then count_syscalls "$@"; return; fi
  local name=$1 pid=$2 url=$3 lua=$4
  taskset -c 1 wrk -t1 "-c$CONNS" -d3s -s "$lua" "$url" >/dev/null # warm-up (pool, caches, lazy init)
  callgrind_control -i on "$pid" >/dev/null
  taskset -c 1 wrk -t1 "-c$CONNS" "-d${MEASURE}s" -s "$lua" "$url" > "$WORK/wrk.txt"
  callgrind_control -i off "$pid" >/dev/null
  if grep -q "Non-2xx" "$WORK/wrk.txt"; then echo "$name: non-2xx answers"; cat "$WORK/wrk.txt"; exit 1; fi
  rm -f "$OUT/$name".callgrind*
  callgrind_control -d "$name" "$pid" >/dev/null
  kill "$pid"; wait "$pid" 2>/dev/null || true
  local requests file total sha blocks
  requests=$(awk '/requests in/ {print $1}' "$WORK/wrk.txt")
  file=$(ls -t "$OUT/$name".callgrind.*.* | head -1)
  total=$(awk '/^totals:/ {print $2}' "$file")
  # Self cost of the SHA-256 compression functions (sha2's soft backend: compress256, and
  # whatever of it the compiler kept out of line).
  sha=$(callgrind_annotate --inclusive=no --threshold=100 "$file" 2>/dev/null \
    | awk '/sha2::sha256::/ {gsub(",","",$1); s+=$1} END {print s+0}')
  # Calls of the compression entry point (each call compresses one or more whole blocks;
  # sha2 0.10.9 names it `soft::compress`, older ones `compress256`).
  blocks=$({ grep -A1 -E '^cfn=.*sha2::sha256::(compress256|soft::compress)( |$)' "$file" || true; } \
    | awk '/^calls=/ {split($1,a,"="); s+=a[2]} END {print s+0}')
  # Heap allocations: calls into the allocator's entry points, glibc's or mimalloc's (the
  # binary's global allocator), from every caller.
  allocs=$({ grep -A1 -E '^cfn=(.*[ :])?(malloc|calloc|realloc|mi_malloc|mi_malloc_aligned|mi_zalloc|mi_zalloc_aligned|mi_realloc|mi_realloc_aligned)( |$)' "$file" || true; } \
    | awk '/^calls=/ {split($1,a,"="); s+=a[2]} END {print s+0}')
  awk -v n="$name" -v t="$total" -v s="$sha" -v b="$blocks" -v a="$allocs" -v r="$requests" \
    'BEGIN {printf "%-10s %8.0f Ir/req  %8.0f Ir/req w/o sha256  %5.2f compress calls/req  %5.2f allocations/req  (%d requests)\n", n, t/r, (t-s)/r, b/r, a/r, r}'
}
# The process under test: under callgrind, or bare for COUNT=syscalls.
CG=(valgrind --tool=callgrind --instr-atstart=no --dump-instr=no --compress-strings=no "--callgrind-out-file=$OUT/%q{CG_NAME}.callgrind.%p")
[[ $COUNT == syscalls ]] && CG=(env)

for row in $ROWS; do
  case $row in
    nginx)
      CG_NAME=nginx taskset -c 0 "${CG[@]}" nginx -c "$WORK/nginx.conf" 2>"$WORK/nginx.vg" & pid=$!; PIDS+=($pid)
      wait_port 18101
      sign_lua benchkey0001 benchsecret0001 market.bench.local http://127.0.0.1:18101/enforced "$WORK/nginx.lua"
      measure nginx "$pid" http://127.0.0.1:18101/enforced "$WORK/nginx.lua" ;;
    enforced | plain)
      rm -rf "$WORK/mg-data"
      CG_NAME=$row taskset -c 0 "${CG[@]}" "$BIN" proxy --config "$WORK/marketgate.toml" 2>"$WORK/$row.vg" & pid=$!; PIDS+=($pid)
      wait_port 18103
      curl -sf -X PUT -H 'Authorization: Bearer bench-admin-token' -H 'Content-Type: application/json' \
        --data-binary @"$WORK/snapshot.json" http://127.0.0.1:18103/v1/snapshot >/dev/null
      if [[ $row == enforced ]]; then
        sign_lua benchkey0001 benchsecret0001 market.bench.local http://127.0.0.1:18102/enforced "$WORK/$row.lua"
      else
        echo 'wrk.headers["Host"] = "plain.bench.local"' > "$WORK/$row.lua"
      fi
      measure "$row" "$pid" "http://127.0.0.1:18102/$row" "$WORK/$row.lua" ;;
    serve)
      exec 9>/tmp/marketgate-ports.lock
      flock 9
      mkdir -p "$WORK/serve"
      (cd "$WORK/serve" && CG_NAME=serve exec env $(env | grep -o '^MARKETGATE_[A-Z_]*' | sed 's/^/-u /') \
        taskset -c 0 "${CG[@]}" "$BIN" serve >/dev/null 2>"$WORK/serve.vg") & pid=$!; PIDS+=($pid)
      wait_port 8081
      wait_port 8082
      control=http://127.0.0.1:8081
      v2=$control/v2/seller-project/apigw/instances/default
      seller=(-H "X-Auth-Token: trial-seller-token" -H 'Content-Type: application/json')
      market=(-H "X-Auth-Token: trial-market-token" -H 'Content-Type: application/json')
      group=$(curl -sf "${seller[@]}" -X POST "$v2/api-groups" -d '{"name": "bench_bought"}' | jq -r .id)
      api=$(curl -sf "${seller[@]}" -X POST "$v2/apis" -d '{"name": "enforced", "group_id": "'"$group"'",
        "type": 1, "req_protocol": "HTTP", "req_method": "GET", "req_uri": "/enforced", "auth_type": "APP",
        "backend_type": "HTTP", "backend_api": {"req_protocol": "HTTP", "req_method": "GET", "req_uri": "/",
        "url_domain": "127.0.0.1:18100", "timeout": 5000}}' | jq -r .id)
      curl -sf "${seller[@]}" -X POST "$v2/apis/action" \
        -d '{"action": "online", "api_id": "'"$api"'", "env_id": "DEFAULT_ENVIRONMENT_RELEASE_ID"}' >/dev/null
      curl -sf "${market[@]}" -H "X-Domain-Id: seller-domain" -X PUT \
        "$control/v1/seller-project/apigw/instances/default/market/api-groups/onsell/$group" \
        -d '{"url_domain": "serve.bench.local"}' >/dev/null
      purchase=$(curl -sf "${market[@]}" -H 'X-Domain-Id: bench-buyer' -X POST \
        "$control/v1/bench-buyer-project/apigw/instances/default/market/api-groups/purchase" \
        -d '{"order_id": "bench-order", "group_id": "'"$group"'", "order_type": 1, "req_quota": 1000000000000,
             "start_time": "'$((NOW - 60))'", "expire_time": "'$((NOW + 86400))'"}')
      key=$(jq -r .app_key <<<"$purchase"); secret=$(jq -r .app_secret <<<"$purchase")
      served=
      for _ in $(seq 300); do
        "$BIN" call --key "$key" --secret "$secret" -H 'Host: serve.bench.local' http://127.0.0.1:8080/enforced \
          >/dev/null 2>&1 && { served=1; break; }
        sleep 0.2
      done
      [[ -n $served ]] || { echo "serve never served the bench purchase"; exit 1; }
      sign_lua "$key" "$secret" serve.bench.local http://127.0.0.1:8080/enforced "$WORK/serve.lua"
      measure serve "$pid" http://127.0.0.1:8080/enforced "$WORK/serve.lua"
      flock -u 9 ;;
    *) echo "unknown row $row"; exit 2 ;;
  esac
done
