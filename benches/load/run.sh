#!/usr/bin/env bash
# Load comparison (PERF-NOTES.md method): marketgate proxy against nginx and haproxy on the
# same machine, each pinned to core 0 with one worker, in front of the same nginx backend on
# core 1, loaded by wrk on core 1. Prints a markdown table of medians over RUNS runs.
#
# Decision it informs: whether full enforcement (HMAC auth + purchase + quota) on one core
# keeps up with nginx's plain proxy_pass per core (target >= 1.0x requests/s, p99 no worse),
# what enforcement costs against marketgate's own plain forwarding (target <= 10%), and what
# quota leases cost against a local-only quota cell (row leased_enforced: the same signed call
# on a `marketgate proxy` with `proxy.control_url`, its purchase bought through a
# `marketgate control` on core 1; target <= 5% throughput), and what `marketgate serve` on
# its defaults costs against the proxy (row serve_enforced: a `marketgate serve` with no
# config file, pinned to core 0 like the proxy, its purchase bought through its own market
# API; it binds 127.0.0.1:8080-8082, so the script holds /tmp/marketgate-ports.lock; its
# stdout, the access log at the default level, goes to /dev/null), and what TLS costs (rows
# marketgate_tls and nginxtls: the same signed call over HTTPS with keep-alive, SNI
# tls.bench.local, a seller's bound domain whose certificate marketgate serves by SNI from
# its snapshot, against nginx terminating TLS with the same certificate and key; wrk's
# handshakes are a few per run, the per-request cost is the record layer), and what a request
# throttling policy costs (row marketgate_throttled: the same signed call on the same proxy to
# a second API of the group, /throttled, bound to a policy with an API and an app limit of
# 2,147,483,647 calls per second, Huawei's largest, so every call is admitted and the row
# measures the policy's counters, not refusals; issue 13, target <= 100 ns of decision added).
#
# Like with like: nginx (and haproxy) get the very request the enforced row sends (its Host,
# X-Sdk-Date and Authorization headers), keep-alive upstream connections that are never
# recycled (nginx's upstream `keepalive_requests` defaults to 1000; marketgate's pool has no
# such limit), access logs off as in the proxy rows (the serve row keeps serve's default log,
# to /dev/null), and one worker pinned to core 0 like marketgate's.
#
# Usage: benches/load/run.sh [RUNS]
#   RUNS (3), DURATION (10s), CONNS (32), MARKETGATE_BIN (target/release/marketgate),
#   JOURNAL_BLOCK: gateway.quota_journal_block of the marketgate proxies (unset: the default),
#   COMPARE_BIN: a second marketgate build (e.g. before a change) run side by side, rows
#   compare_plain / compare_enforced / compare_serve (the latter on 18011-18013 through
#   MARKETGATE_* overrides, otherwise on its defaults), interleaved in every round;
#   RESULTS: a directory to keep the raw "req/s p99_ms cpu_us" lines in;
#   PERF_OUT: after the rounds, record a `perf` profile of marketgate under the enforced load
#   into this file (`perf report -i FILE`), and of nginx's worker under the same call into
#   FILE.nginx; PERF_ROW=serve profiles the serve_enforced row instead; PERF_FREQ (2999) and
#   PERF_CALL_GRAPH (fp; dwarf for inlined Rust frames) are perf's sampling settings.   (needs wrk, nginx, haproxy: apt-get install wrk nginx-light haproxy)
# Binds 127.0.0.1:18000-18015 and 8080-8082 for its duration; everything it starts is
# stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
# serve's default ports are shared with tests/quickstart.sh and others: hold their lock.
exec 9>/tmp/marketgate-ports.lock
flock 9
RUNS=${RUNS:-${1:-3}}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-32}
BIN=${MARKETGATE_BIN:-target/release/marketgate}
WORK=$(mktemp -d /tmp/mg-load.XXXXXX)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

for tool in wrk nginx haproxy taskset curl jq openssl; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install wrk nginx-light haproxy jq)"; exit 2; }
done
[[ -x $BIN ]] || cargo build --release --bin marketgate

BODY='{"status":"ok","service":"backend","payload":"0123456789abcdef"}'
cat > "$WORK/backend.conf" <<CONF
worker_processes 1; daemon off; pid $WORK/backend.pid; error_log $WORK/backend.err;
events { worker_connections 4096; }
http { access_log off;
  server { listen 127.0.0.1:18000 reuseport backlog=4096; keepalive_requests 1000000;
    location / { default_type application/json; return 200 '$BODY'; } } }
CONF
cat > "$WORK/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $WORK/nginx.pid; error_log $WORK/nginx.err;
events { worker_connections 4096; }
http { access_log off;
  upstream backend { server 127.0.0.1:18000; keepalive 64; keepalive_requests 1000000; }
  server { listen 127.0.0.1:18001 backlog=4096; keepalive_requests 1000000;
    location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
CONF
cat > "$WORK/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend fe
  bind 127.0.0.1:18002
  default_backend be
backend be
  server s1 127.0.0.1:18000
CONF

# TLS: the bound domain's certificate (served by SNI from the snapshot, and by nginx) and the
# proxy's default one (what any other name gets).
for name in tls default; do
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 -subj "/CN=$name.bench.local" \
    -addext "subjectAltName=DNS:$name.bench.local" -keyout "$WORK/$name.key" -out "$WORK/$name.pem" 2>/dev/null
done
cat > "$WORK/nginxtls.conf" <<CONF
worker_processes 1; daemon off; pid $WORK/nginxtls.pid; error_log $WORK/nginxtls.err;
events { worker_connections 4096; }
http { access_log off;
  upstream backend { server 127.0.0.1:18000; keepalive 64; keepalive_requests 1000000; }
  server { listen 127.0.0.1:18015 ssl backlog=4096; keepalive_requests 1000000;
    ssl_certificate $WORK/tls.pem; ssl_certificate_key $WORK/tls.key; ssl_protocols TLSv1.2 TLSv1.3;
    location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
CONF

cat > "$WORK/marketgate.toml" <<CONF
data_dir = "$WORK/mg-data"
[gateway]
listen = "127.0.0.1:18003"
tls_listen = "127.0.0.1:18014"
tls_cert = "$WORK/default.pem"
tls_key = "$WORK/default.key"
workers = 1
# Only so that the AppCode row can run over plain HTTP on loopback (off by default).
appcode_over_http = true
${JOURNAL_BLOCK:+quota_journal_block = $JOURNAL_BLOCK}
[admin]
listen = "127.0.0.1:18004"
token = "bench-admin-token"
[log]
level = "warn"
CONF

# The leased proxy: same settings, its quota leased from a control plane (core 1, beside the
# backend and wrk: it answers an exchange at most every 20 ms, off the proxy's core).
sed -e 's/18003/18007/; s/18004/18008/; s/mg-data/mg-data-leased/; /^tls_/d' "$WORK/marketgate.toml" > "$WORK/leased.toml"
cat >> "$WORK/leased.toml" <<CONF
[proxy]
node_id = "bench-leased"
control_url = "http://127.0.0.1:18010"
CONF
cat > "$WORK/control.toml" <<CONF
instance_id = "default"
data_dir = "$WORK/control-data"
database_url = "sqlite://$WORK/control.db"
[control]
listen = "127.0.0.1:18009"
[[control.tokens]]
token = "bench-market-token"
domain_id = "market"
project_id = "market"
role = "market"
[[control.tokens]]
token = "bench-seller-token"
domain_id = "bench-seller"
project_id = "bench-seller-project"
role = "tenant"
[admin]
listen = "127.0.0.1:18010"
token = "bench-admin-token"
[log]
level = "warn"
CONF

taskset -c 1 nginx -c "$WORK/backend.conf" & PIDS+=($!); PID_direct=$!
taskset -c 0 nginx -c "$WORK/nginx.conf" & PIDS+=($!); PID_nginx=$!
taskset -c 0 haproxy -f "$WORK/haproxy.cfg" & PIDS+=($!); PID_haproxy=$!
taskset -c 0 nginx -c "$WORK/nginxtls.conf" & PIDS+=($!); PID_nginxtls=$!
taskset -c 0 "$BIN" proxy --config "$WORK/marketgate.toml" & PIDS+=($!); PID_marketgate=$!
taskset -c 0 "$BIN" proxy --config "$WORK/leased.toml" & PIDS+=($!); PID_leased=$!
taskset -c 1 "$BIN" control --config "$WORK/control.toml" & PIDS+=($!)
# marketgate serve with no config file (its defaults), in its own directory (its data dir is
# ./marketgate-data); no MARKETGATE_* variable reaches it but those named here.
serve_on() { # BIN DIR [VAR=VALUE...] -> starts it on core 0, prints its pid
  local bin=$1 dir=$2; shift 2
  mkdir -p "$dir"
  (cd "$dir" && exec env $(env | grep -o '^MARKETGATE_[A-Z_]*' | sed 's/^/-u /') "$@" taskset -c 0 "$bin" serve >/dev/null 2>"$dir/stderr") &
  echo $!
}
if [[ ${#BIN} -gt 0 && $BIN != /* ]]; then BIN_ABS=$PWD/$BIN; else BIN_ABS=$BIN; fi
PID_serve=$(serve_on "$BIN_ABS" "$WORK/serve"); PIDS+=("$PID_serve")
if [[ -n ${COMPARE_BIN:-} ]]; then
  PID_compareserve=$(serve_on "$COMPARE_BIN" "$WORK/compare-serve" MARKETGATE_GATEWAY__LISTEN=127.0.0.1:18011 \
    MARKETGATE_CONTROL__LISTEN=127.0.0.1:18012 MARKETGATE_ADMIN__LISTEN=127.0.0.1:18013); PIDS+=("$PID_compareserve")
  wait_serve_compare="18012 18013"
  sed -e 's/18003/18005/; s/18004/18006/; s/mg-data/mg-data-compare/; /^tls_/d' "$WORK/marketgate.toml" > "$WORK/compare.toml"
  taskset -c 0 "$COMPARE_BIN" proxy --config "$WORK/compare.toml" & PIDS+=($!); PID_compare=$!
  wait_compare=18006
fi

wait_port() { for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$1/" && return 0; sleep 0.1; done; echo "port $1 never answered"; exit 1; }
for port in 18000 18001 18002 18004 18008 18010 8081 8082 ${wait_compare:-} ${wait_serve_compare:-}; do wait_port "$port"; done

# One group with two APIs on the same backend: /enforced (APP auth, bought with a huge
# quota) and /plain (NONE auth on the seller's sl_domain: marketgate's own plain forwarding).
NOW=$(date +%s)
cat > "$WORK/snapshot.json" <<JSON
{"version": 1,
 "groups": [{"id": "g1", "name": "bench", "sl_domain": "plain.bench.local", "url_domain": "market.bench.local",
   "market_state": "on_sale",
   "apis": [
     {"id": "a1", "name": "enforced", "type": 1, "req_protocol": "BOTH", "req_method": "GET", "req_uri": "/enforced",
      "match_mode": "NORMAL", "auth_type": "APP", "app_code_auth": true, "backend": {"type": "HTTP", "req_protocol": "HTTP", "req_method": "GET",
      "req_uri": "/", "url_domain": "127.0.0.1:18000", "timeout_ms": 5000}},
     {"id": "a3", "name": "throttled", "type": 1, "req_protocol": "BOTH", "req_method": "GET", "req_uri": "/throttled",
      "match_mode": "NORMAL", "auth_type": "APP", "app_code_auth": true, "backend": {"type": "HTTP", "req_protocol": "HTTP", "req_method": "GET",
      "req_uri": "/", "url_domain": "127.0.0.1:18000", "timeout_ms": 5000}},
     {"id": "a2", "name": "plain", "type": 1, "req_protocol": "HTTP", "req_method": "GET", "req_uri": "/plain",
      "match_mode": "NORMAL", "auth_type": "NONE", "backend": {"type": "HTTP", "req_protocol": "HTTP", "req_method": "GET",
      "req_uri": "/", "url_domain": "127.0.0.1:18000", "timeout_ms": 5000}}]}],
 "apps": [{"id": "app1", "app_key": "benchkey0001", "app_secret": "benchsecret0001",
   "app_codes": ["benchappcode0123456789abcdef0123456789abcdef0123456789abcdef0123"], "creator": "MARKET"}],
 "purchases": [{"id": "p1", "group_id": "g1", "app_id": "app1", "state": "active", "start_time": $((NOW - 60)),
   "expire_time": $((NOW + 86400)), "quota_limit": 1000000000000}],
 "throttling": {"policies": [{"id": "t1", "name": "bench_throttle", "api_call_limits": 2147483647,
   "app_call_limits": 2147483647, "time_interval": 1, "time_unit": "SECOND", "api_ids": ["a3"]}]}}
JSON
# The seller's bound domain tls.bench.local (another name of g1's market domain) and its
# certificate, as the control plane publishes them.
jq --rawfile cert "$WORK/tls.pem" --rawfile key "$WORK/tls.key" \
  '. + {domains: [{domain: "tls.bench.local", group_id: "g1"}],
        certificates: [{domains: ["tls.bench.local"], cert_pem: $cert, key_pem: $key}]}' \
  "$WORK/snapshot.json" > "$WORK/snapshot-tls.json"
mv "$WORK/snapshot-tls.json" "$WORK/snapshot.json"
for admin in 18004 ${wait_compare:-}; do
  curl -sf -X PUT -H 'Authorization: Bearer bench-admin-token' -H 'Content-Type: application/json' \
    --data-binary @"$WORK/snapshot.json" "http://127.0.0.1:$admin/v1/snapshot" >/dev/null
done

# The leased proxy's purchase, bought as the market buys: a seller's group with one HTTP API
# on the same backend, published and listed; 10^12 calls bought. The control plane pushes the
# snapshot to the leased proxy and leases it calls.
# buy CONTROL SELLER_TOKEN SELLER_DOMAIN SELLER_PROJECT MARKET_TOKEN URL_DOMAIN -> "key secret"
buy() {
  local control=$1 seller_domain=$3 project=$4 url_domain=$6
  local v2=$control/v2/$project/apigw/instances/default
  local market_api=$control/v1/$project/apigw/instances/default/market
  local seller=(-H "X-Auth-Token: $2" -H 'Content-Type: application/json')
  local market=(-H "X-Auth-Token: $5" -H 'Content-Type: application/json')
  local group api purchase
  group=$(curl -sf "${seller[@]}" -X POST "$v2/api-groups" -d '{"name": "bench_bought"}' | jq -r .id)
  api=$(curl -sf "${seller[@]}" -X POST "$v2/apis" -d '{"name": "enforced", "group_id": "'"$group"'",
    "type": 1, "req_protocol": "HTTP", "req_method": "GET", "req_uri": "/enforced", "auth_type": "APP",
    "backend_type": "HTTP", "backend_api": {"req_protocol": "HTTP", "req_method": "GET", "req_uri": "/",
    "url_domain": "127.0.0.1:18000", "timeout": 5000}}' | jq -r .id)
  curl -sf "${seller[@]}" -X POST "$v2/apis/action" \
    -d '{"action": "online", "api_id": "'"$api"'", "env_id": "DEFAULT_ENVIRONMENT_RELEASE_ID"}' >/dev/null
  curl -sf "${market[@]}" -H "X-Domain-Id: $seller_domain" -X PUT "$market_api/api-groups/onsell/$group" \
    -d '{"url_domain": "'"$url_domain"'"}' >/dev/null
  purchase=$(curl -sf "${market[@]}" -H 'X-Domain-Id: bench-buyer' -X POST \
    "$control/v1/bench-buyer-project/apigw/instances/default/market/api-groups/purchase" \
    -d '{"order_id": "bench-order", "group_id": "'"$group"'", "order_type": 1, "req_quota": 1000000000000,
         "start_time": "'$((NOW - 60))'", "expire_time": "'$((NOW + 86400))'"}')
  local key secret
  key=$(jq -r .app_key <<<"$purchase")
  secret=$(jq -r .app_secret <<<"$purchase")
  [[ -n $key && $key != null ]] || { echo "the bench purchase on $control failed: $purchase" >&2; exit 1; }
  echo "$key $secret"
}
read -r LEASED_KEY LEASED_SECRET < <(buy http://127.0.0.1:18009 bench-seller-token bench-seller bench-seller-project \
  bench-market-token leased.bench.local)
# serve on its defaults: the trial credentials of Config::builtin (README).
read -r SERVE_KEY SERVE_SECRET < <(buy http://127.0.0.1:8081 trial-seller-token seller-domain seller-project \
  trial-market-token serve.bench.local)
if [[ -n ${COMPARE_BIN:-} ]]; then
  read -r CSERVE_KEY CSERVE_SECRET < <(buy http://127.0.0.1:18012 trial-seller-token seller-domain seller-project \
    trial-market-token serve.bench.local)
fi

# Pre-sign the requests: a fixed signature stays valid inside the 15-minute window, so they
# are signed again before each enforced run (a long series of runs outlives one window).
# sign_lua KEY SECRET HOST URL OUT
sign_lua() {
  local signed date auth
  signed=$("$BIN" sign --key "$1" --secret "$2" -H "Host: $3" "$4")
  date=$(grep -o "x-sdk-date: [0-9TZ]*" <<<"$signed" | cut -d' ' -f2)
  auth=$(grep -o "authorization: SDK-HMAC-SHA256[^']*" <<<"$signed" | sed 's/^authorization: //')
  [[ -n $date && -n $auth ]] || { echo "cannot read the signed request from: $signed"; exit 1; }
  cat > "$5" <<LUA
wrk.headers["Host"] = "$3"
wrk.headers["X-Sdk-Date"] = "$date"
wrk.headers["Authorization"] = "$auth"
LUA
}
# wrk sends the URL's host as SNI and connects where wrk.resolve says: tls.bench.local,
# resolved here to loopback (no /etc/hosts entry needed).
RESOLVE_LOOPBACK='function wrk.resolve(host, service) wrk.addrs = wrk.lookup("127.0.0.1", service) end'
sign_all() {
  sign_lua benchkey0001 benchsecret0001 market.bench.local http://127.0.0.1:18003/enforced "$WORK/enforced.lua"
  sign_lua benchkey0001 benchsecret0001 market.bench.local http://127.0.0.1:18003/throttled "$WORK/throttled.lua"
  sign_lua benchkey0001 benchsecret0001 tls.bench.local https://tls.bench.local:18014/enforced "$WORK/tls.lua"
  echo "$RESOLVE_LOOPBACK" >> "$WORK/tls.lua"
  sign_lua "$LEASED_KEY" "$LEASED_SECRET" leased.bench.local http://127.0.0.1:18007/enforced "$WORK/leased.lua"
  sign_lua "$SERVE_KEY" "$SERVE_SECRET" serve.bench.local http://127.0.0.1:8080/enforced "$WORK/serve.lua"
  # nginx and haproxy get the very request marketgate's enforced row gets (its Host, X-Sdk-Date
  # and Authorization), so that each proxy reads and forwards the same bytes.
  cp "$WORK/enforced.lua" "$WORK/peer.lua"
  if [[ -n ${COMPARE_BIN:-} ]]; then
    sign_lua "$CSERVE_KEY" "$CSERVE_SECRET" serve.bench.local http://127.0.0.1:18011/enforced "$WORK/compareserve.lua"
  fi
}
sign_all
DATE=$(grep -o '"X-Sdk-Date"\] = "[0-9TZ]*' "$WORK/enforced.lua" | grep -o '[0-9TZ]*$')
AUTH=$(grep -o 'SDK-HMAC-SHA256[^"]*' "$WORK/enforced.lua")
cat > "$WORK/appcode.lua" <<LUA
wrk.headers["Host"] = "market.bench.local"
wrk.headers["X-Apig-AppCode"] = "benchappcode0123456789abcdef0123456789abcdef0123456789abcdef0123"
LUA
cat > "$WORK/plain.lua" <<LUA
wrk.headers["Host"] = "plain.bench.local"
LUA
echo "$RESOLVE_LOOPBACK" > "$WORK/nginxtls.lua"
# Over HTTPS: the bound domain's certificate (trusted alone, so a wrong one fails) and the call
# served; the same certificate from nginx.
TLS_DATE=$(grep -o '"X-Sdk-Date"\] = "[0-9TZ]*' "$WORK/tls.lua" | grep -o '[0-9TZ]*$')
TLS_AUTH=$(grep -o 'SDK-HMAC-SHA256[^"]*' "$WORK/tls.lua")
for _ in $(seq 50); do curl -s -o /dev/null --cacert "$WORK/tls.pem" --resolve tls.bench.local:18015:127.0.0.1 \
  https://tls.bench.local:18015/ && break; sleep 0.1; done
curl -sf --cacert "$WORK/tls.pem" --resolve tls.bench.local:18014:127.0.0.1 -H 'Host: tls.bench.local' -H "X-Sdk-Date: $TLS_DATE" \
  -H "Authorization: $TLS_AUTH" https://tls.bench.local:18014/enforced >/dev/null \
  || { echo "the signed HTTPS bench request on the bound domain is refused by marketgate"; exit 1; }
curl -sf --cacert "$WORK/tls.pem" --resolve tls.bench.local:18015:127.0.0.1 https://tls.bench.local:18015/ >/dev/null \
  || { echo "nginx does not serve HTTPS with the bench certificate"; exit 1; }
curl -sf -H 'Host: market.bench.local' -H "X-Sdk-Date: $DATE" -H "Authorization: $AUTH" http://127.0.0.1:18003/enforced >/dev/null \
  || { echo "the signed bench request is refused by marketgate"; exit 1; }
# The push reaches the leased proxy within the control plane's debounce; wait for it.
leased_ok=
for _ in $(seq 100); do
  "$BIN" call --key "$LEASED_KEY" --secret "$LEASED_SECRET" -H 'Host: leased.bench.local' \
    http://127.0.0.1:18007/enforced >/dev/null 2>&1 && { leased_ok=1; break; }
  sleep 0.1
done
[[ -n $leased_ok ]] || { echo "the leased proxy never served the bench purchase"; exit 1; }
# serve applies its own market within its debounce; wait for it (both builds).
for target in "8080 $SERVE_KEY $SERVE_SECRET" ${COMPARE_BIN:+"18011 $CSERVE_KEY $CSERVE_SECRET"}; do
  read -r port key secret <<<"$target"
  served=
  for _ in $(seq 100); do
    "$BIN" call --key "$key" --secret "$secret" -H 'Host: serve.bench.local' \
      "http://127.0.0.1:$port/enforced" >/dev/null 2>&1 && { served=1; break; }
    sleep 0.1
  done
  [[ -n $served ]] || { echo "marketgate serve on $port never served the bench purchase"; exit 1; }
done
# The throttled API answers, and its policy applies: in debug mode the answer reports the
# app's and the API's calls left in Huawei's format.
TH_DATE=$(grep -o '"X-Sdk-Date"\] = "[0-9TZ]*' "$WORK/throttled.lua" | grep -o '[0-9TZ]*$')
TH_AUTH=$(grep -o 'SDK-HMAC-SHA256[^"]*' "$WORK/throttled.lua")
throttled_headers=$(curl -sf -D - -o /dev/null -H 'Host: market.bench.local' -H "X-Sdk-Date: $TH_DATE" -H "Authorization: $TH_AUTH" \
  -H 'X-Apig-Mode: debug' http://127.0.0.1:18003/throttled) \
  || { echo "the signed throttled bench request is refused by marketgate"; exit 1; }
grep -qi '^x-apig-ratelimit-app: remain:[0-9]*,limit:2147483647,time:1 second' <<<"$throttled_headers" \
  || { echo "no throttling policy applies to /throttled: $throttled_headers"; exit 1; }
curl -sf -H 'Host: plain.bench.local' http://127.0.0.1:18003/plain >/dev/null \
  || { echo "the plain bench request is refused by marketgate"; exit 1; }
curl -sf -H 'Host: market.bench.local' -H 'X-Apig-AppCode: benchappcode0123456789abcdef0123456789abcdef0123456789abcdef0123' \
  http://127.0.0.1:18003/enforced >/dev/null || { echo "the AppCode bench request is refused by marketgate"; exit 1; }

# CPU time of a server, "user+system system" in clock ticks: the process and its children
# (nginx's worker), all threads included.
cpu_ticks() {
  local total=0 system=0 pid
  for pid in $1 $(pgrep -P "$1"); do
    read -r u s < <(awk '{print $14, $15}' "/proc/$pid/stat")
    total=$((total + u + s)) system=$((system + s))
  done
  echo "$total $system"
}

# run NAME URL [LUA] -> appends "rps p99_ms cpu_us_per_request kernel_us_per_request" lines
# to $WORK/NAME.txt (kernel: the system-time part of the CPU time, the sockets' work).
# cpu_us_per_request is the server's own CPU time per answered request: unlike req/s it
# does not depend on how much of core 0 the scheduler left the server (this machine is
# shared), so 1e6 / cpu_us is the server's capacity in requests/s per core.
run() {
  local name=$1 url=$2 lua=${3:-} pidvar
  local args=(-t1 "-c$CONNS" --latency)
  [[ -n $lua ]] && args+=(-s "$lua")
  pidvar=PID_${name%%_*}
  local pid=${!pidvar}
  taskset -c 1 wrk "${args[@]}" -d2s "$url" >/dev/null # warm-up
  local before after
  before=$(cpu_ticks "$pid")
  taskset -c 1 wrk "${args[@]}" "-d$DURATION" "$url" > "$WORK/out.txt"
  after=$(cpu_ticks "$pid")
  if grep -q "Non-2xx" "$WORK/out.txt"; then echo "$name: non-2xx answers"; cat "$WORK/out.txt"; exit 1; fi
  local rps p99 requests cpu_us
  rps=$(awk '/Requests\/sec/ {print $2}' "$WORK/out.txt")
  p99=$(awk '$1=="99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v=v*1000}; print v}' "$WORK/out.txt")
  requests=$(awk '/requests in/ {print $1}' "$WORK/out.txt")
  if [[ -z $requests || $requests == 0 ]] || ! kill -0 "$pid" 2>/dev/null; then
    echo "$name: no answers (server $pid $(kill -0 "$pid" 2>/dev/null && echo running || echo gone))"; cat "$WORK/out.txt"
    for log in "$WORK"/serve/stderr "$WORK"/compare-serve/stderr; do [[ -s $log ]] && { echo "== $log"; tail -20 "$log"; }; done
    exit 1
  fi
  local sys_us
  read -r cpu_us sys_us < <(awk -v t="${after% *}" -v t0="${before% *}" -v s="${after#* }" -v s0="${before#* }" \
    -v hz="$(getconf CLK_TCK)" -v n="$requests" 'BEGIN {printf "%.2f %.2f\n", (t - t0) / hz * 1e6 / n, (s - s0) / hz * 1e6 / n}')
  echo "$rps $p99 $cpu_us $sys_us" >> "$WORK/$name.txt"
  echo "run $i $name: $rps req/s, p99 $p99 ms, server CPU $cpu_us us/request ($sys_us in the kernel)" >&2
}
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

for i in $(seq "$RUNS"); do
  export i
  run direct http://127.0.0.1:18000/
  sign_all
  run nginx http://127.0.0.1:18001/enforced "$WORK/peer.lua"
  run haproxy http://127.0.0.1:18002/enforced "$WORK/peer.lua"
  run marketgate_plain http://127.0.0.1:18003/plain "$WORK/plain.lua"
  run marketgate_enforced http://127.0.0.1:18003/enforced "$WORK/enforced.lua"
  run marketgate_throttled http://127.0.0.1:18003/throttled "$WORK/throttled.lua"
  run leased_enforced http://127.0.0.1:18007/enforced "$WORK/leased.lua"
  run serve_enforced http://127.0.0.1:8080/enforced "$WORK/serve.lua"
  run marketgate_appcode http://127.0.0.1:18003/enforced "$WORK/appcode.lua"
  run nginxtls https://tls.bench.local:18015/ "$WORK/nginxtls.lua"
  run marketgate_tls https://tls.bench.local:18014/enforced "$WORK/tls.lua"
  if [[ -n ${COMPARE_BIN:-} ]]; then
    run compare_plain http://127.0.0.1:18005/plain "$WORK/plain.lua"
    run compare_enforced http://127.0.0.1:18005/enforced "$WORK/enforced.lua"
    run compareserve_enforced http://127.0.0.1:18011/enforced "$WORK/compareserve.lua"
  fi
done

if [[ -n ${PERF_OUT:-} ]]; then
  sign_all
  if [[ ${PERF_ROW:-} == serve ]]; then perf_pid=$PID_serve perf_url=http://127.0.0.1:8080/enforced perf_lua=serve.lua
  else perf_pid=$PID_marketgate perf_url=http://127.0.0.1:18003/enforced perf_lua=enforced.lua; fi
  taskset -c 1 wrk -t1 "-c$CONNS" -s "$WORK/$perf_lua" -d8s "$perf_url" >/dev/null &
  load=$!
  sleep 1
  perf record -F "${PERF_FREQ:-2999}" --call-graph "${PERF_CALL_GRAPH:-fp}" -p "$perf_pid" -o "$PERF_OUT" -- sleep 6 2>/dev/null
  wait "$load"
  # nginx's worker under the same signed call, for the kernel side's like-for-like.
  taskset -c 1 wrk -t1 "-c$CONNS" -s "$WORK/peer.lua" -d8s http://127.0.0.1:18001/enforced >/dev/null &
  load=$!
  sleep 1
  perf record -F 2999 -g -p "$(pgrep -P "$PID_nginx" | head -1)" -o "$PERF_OUT.nginx" -- sleep 6 2>/dev/null
  wait "$load"
fi

# Ratios are taken run by run (each run of a proxy against nginx's run of the same round, a
# minute apart at most) and their median reported: on a shared machine the load from other
# work drifts between rounds far more than within one.
ratio_median() { # NAME BASE COLUMN -> median over runs of NAME[col] / BASE[col]
  paste -d' ' "$WORK/$1.txt" "$WORK/$2.txt" | awk -v c="$3" '{n=split($0,f," "); h=n/2; printf "%.4f\n", f[c]/f[c+h]}' | median
}
echo "| path | req/s (median of $RUNS) | p99 ms (median) | req/s ÷ nginx (median of per-round ratios) | p99 ÷ nginx | req/s ÷ marketgate_plain | server CPU µs/request (median) | of which kernel µs | CPU/request ÷ nginx |"
echo "|---|---|---|---|---|---|---|---|---|"
for name in direct nginx haproxy marketgate_plain marketgate_enforced marketgate_throttled leased_enforced serve_enforced marketgate_appcode nginxtls marketgate_tls ${COMPARE_BIN:+compare_plain compare_enforced compareserve_enforced}; do
  rps=$(cut -d' ' -f1 "$WORK/$name.txt" | median)
  p99=$(cut -d' ' -f2 "$WORK/$name.txt" | median)
  cpu=$(cut -d' ' -f3 "$WORK/$name.txt" | median)
  sys=$(cut -d' ' -f4 "$WORK/$name.txt" | median)
  printf "| %s | %s | %s | %.2fx | %.2fx | %.2fx | %s | %s | %.2fx |\n" "$name" "$rps" "$p99" \
    "$(ratio_median "$name" nginx 1)" "$(ratio_median "$name" nginx 2)" "$(ratio_median "$name" marketgate_plain 1)" \
    "$cpu" "$sys" "$(ratio_median "$name" nginx 3)"
done
# The lease cost: the leased proxy against the standalone one, run by run (same round).
echo
printf 'Leases, leased_enforced ÷ marketgate_enforced (median of per-round ratios): req/s %.3fx, p99 %.2fx, server CPU/request %.3fx\n' \
  "$(ratio_median leased_enforced marketgate_enforced 1)" "$(ratio_median leased_enforced marketgate_enforced 2)" \
  "$(ratio_median leased_enforced marketgate_enforced 3)"
printf 'Throttling, marketgate_throttled ÷ marketgate_enforced (median of per-round ratios): req/s %.3fx, p99 %.2fx, server CPU/request %.3fx\n' \
  "$(ratio_median marketgate_throttled marketgate_enforced 1)" "$(ratio_median marketgate_throttled marketgate_enforced 2)" \
  "$(ratio_median marketgate_throttled marketgate_enforced 3)"
printf 'TLS, marketgate_tls ÷ nginxtls (median of per-round ratios): req/s %.3fx, p99 %.2fx, server CPU/request %.3fx\n' \
  "$(ratio_median marketgate_tls nginxtls 1)" "$(ratio_median marketgate_tls nginxtls 2)" "$(ratio_median marketgate_tls nginxtls 3)"
printf 'TLS, marketgate_tls ÷ marketgate_enforced (median of per-round ratios): req/s %.3fx, p99 %.2fx, server CPU/request %.3fx\n' \
  "$(ratio_median marketgate_tls marketgate_enforced 1)" "$(ratio_median marketgate_tls marketgate_enforced 2)" \
  "$(ratio_median marketgate_tls marketgate_enforced 3)"
printf 'serve, serve_enforced ÷ marketgate_enforced (median of per-round ratios): req/s %.3fx, p99 %.2fx, server CPU/request %.3fx\n' \
  "$(ratio_median serve_enforced marketgate_enforced 1)" "$(ratio_median serve_enforced marketgate_enforced 2)" \
  "$(ratio_median serve_enforced marketgate_enforced 3)"
if [[ -n ${COMPARE_BIN:-} ]]; then
  for pair in "marketgate_enforced compare_enforced" "marketgate_plain compare_plain" "serve_enforced compareserve_enforced"; do
    read -r new old <<<"$pair"
    printf 'A/B, %s ÷ %s (median of per-round ratios): req/s %.3fx, p99 %.2fx, server CPU/request %.3fx\n' "$new" "$old" \
      "$(ratio_median "$new" "$old" 1)" "$(ratio_median "$new" "$old" 2)" "$(ratio_median "$new" "$old" 3)"
  done
fi
if [[ -n ${RESULTS:-} ]]; then mkdir -p "$RESULTS" && cp "$WORK"/*.txt "$RESULTS"/; fi
