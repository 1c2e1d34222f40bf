#!/usr/bin/env bash
# Checks deploy/ and docs/openapi.json without building or running marketgate:
#   systemd units (systemd-analyze verify, any warning fails; security exposure), Prometheus
#   config and rules (promtool check; promtool test rules on alerts_test.yml), the
#   dashboard's queries (promtool, as recording rules), the compose file
#   (docker compose / docker-compose config), example configs against src/config.rs's known
#   keys, the metric names used against deploy/metrics.txt, JSON and OpenAPI validity.
# Installs missing tools (Debian: prometheus, systemd, docker-compose; PyPI:
# openapi-spec-validator). Idempotent; run as root on Debian bookworm: bash deploy/check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failures=0
step() { printf '== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; failures=$((failures + 1)); }

# ---- tools -------------------------------------------------------------------------------
have_compose() { docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null; }
need=()
command -v promtool >/dev/null || need+=(prometheus)
command -v systemd-analyze >/dev/null || need+=(systemd)
have_compose || need+=(docker-compose)
if [ ${#need[@]} -gt 0 ]; then
    step "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if ! python3 -c 'import openapi_spec_validator' 2>/dev/null; then
    step "installing openapi-spec-validator"
    python3 -m pip install -q --disable-pip-version-check 'openapi-spec-validator>=0.7'
fi
compose() {
    if docker compose version >/dev/null 2>&1; then docker compose "$@"; else docker-compose "$@"; fi
}

# ---- systemd units -----------------------------------------------------------------------
# The units run /usr/local/bin/marketgate, which need not exist here: verify copies whose
# ExecStart points at a stub. systemd-analyze exits 0 on unknown keys and bad values (it
# only warns), so any output at all is a failure.
verify_units() { # dir -> 0 if clean
    local out
    out="$(cd "$1" && systemd-analyze verify --man=no ./*.service 2>&1)" || { echo "$out"; return 1; }
    [ -z "$out" ] || { echo "$out"; return 1; }
}
step "systemd-analyze verify deploy/systemd/*.service"
mkdir -p "$work/units" "$work/bin"
printf '#!/bin/sh\nexit 0\n' > "$work/bin/marketgate"
chmod +x "$work/bin/marketgate"
for unit in deploy/systemd/*.service; do
    grep -q '^ExecStart=/usr/local/bin/marketgate ' "$unit" || fail "$unit: ExecStart is not /usr/local/bin/marketgate"
    sed "s#/usr/local/bin/marketgate#$work/bin/marketgate#g" "$unit" > "$work/units/$(basename "$unit")"
done
verify_units "$work/units" || fail "systemd units do not verify cleanly"
# The check itself must catch a broken unit.
mkdir -p "$work/broken"
sed 's/^ProtectSystem=/ProtectSystm=/' "$work/units/marketgate-proxy.service" > "$work/broken/marketgate-proxy.service"
if verify_units "$work/broken" >/dev/null; then fail "systemd check let a misspelt key through"; fi
# Exposure score (0 = locked down, 10 = none): the units score 1.4-1.6; fail above 2.5.
for unit in "$work"/units/*.service; do
    systemd-analyze security --offline=true --threshold=25 --no-pager "$unit" >/dev/null 2>&1 \
        || fail "$(basename "$unit"): systemd-analyze security exposure above 2.5"
done
# Hardening and graceful stop that the units promise.
for unit in deploy/systemd/*.service; do
    for key in User=marketgate NoNewPrivileges=yes ProtectSystem=strict Restart=on-failure KillSignal=SIGTERM; do
        grep -qx "$key" "$unit" || fail "$unit: missing $key"
    done
    stop="$(sed -n 's/^TimeoutStopSec=\([0-9]*\)s$/\1/p' "$unit")"
    # Above the default drain (gateway.drain_timeout_ms = 10000) with margin.
    [ -n "$stop" ] && [ "$stop" -gt 10 ] || fail "$unit: TimeoutStopSec must exceed the 10 s drain"
done

# ---- Prometheus --------------------------------------------------------------------------
step "promtool check config / rules"
promtool check config deploy/prometheus/prometheus.yml >/dev/null || fail "promtool check config"
promtool check rules deploy/prometheus/alerts.yml >/dev/null || fail "promtool check rules"
promtool test rules deploy/prometheus/alerts_test.yml >/dev/null || fail "promtool test rules (alerts_test.yml)"

step "every alert's runbook section exists in docs/operations.md"
for anchor in $(grep -oh 'operations.md#[a-z0-9-]*' deploy/prometheus/alerts.yml | cut -d# -f2 | sort -u); do
    grep -qix "### $anchor" docs/operations.md || fail "docs/operations.md has no section for #$anchor"
done

step "dashboard JSON and its queries"
python3 -m json.tool deploy/grafana/dashboards/marketgate.json >/dev/null || fail "dashboard is not JSON"
python3 - "$work/dashboard-rules.yml" <<'PY' || fail "cannot extract dashboard queries"
import json, sys
d = json.load(open("deploy/grafana/dashboards/marketgate.json"))
exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
assert exprs, "dashboard has no queries"
subst = {"$__rate_interval": "5m", "$__interval": "1m", "$group": ".*", "$node": ".*"}
with open(sys.argv[1], "w") as out:
    out.write("groups:\n  - name: dashboard\n    rules:\n")
    for i, e in enumerate(exprs):
        for k, v in subst.items():
            e = e.replace(k, v)
        out.write(f"      - record: dashboard:query_{i}\n        expr: {json.dumps(e)}\n")
PY
promtool check rules "$work/dashboard-rules.yml" >/dev/null || fail "a dashboard query is not valid PromQL"

step "metric names used vs deploy/metrics.txt"
bash deploy/check-metrics.sh || fail "metric names"

# ---- compose -----------------------------------------------------------------------------
step "compose config"
cp deploy/env.example "$work/compose.env"
compose -f deploy/docker-compose.yml --env-file "$work/compose.env" config -q || fail "compose file does not parse"

# ---- example configs vs src/config.rs ----------------------------------------------------
step "example configs use only known keys"
# The known keys are the config types' fields (serde_ignored finds the others); the unit test
# loads every deploy/config/*.toml through the real loader.
cargo test -q --lib config::tests::the_example_configs_use_only_known_keys >/dev/null \
    || fail "example configs (cargo test --lib config::tests::the_example_configs_use_only_known_keys)"

# ---- OpenAPI -----------------------------------------------------------------------------
step "docs/openapi.json"
python3 -m json.tool docs/openapi.json >/dev/null || fail "docs/openapi.json is not JSON"
python3 - <<'PY' || fail "docs/openapi.json is not a valid OpenAPI 3.0 document"
import json
from openapi_spec_validator import validate
spec = json.load(open("docs/openapi.json"))
assert spec.get("openapi") == "3.0.3", "openapi must be 3.0.3"
validate(spec)
PY
python3 deploy/openapi/generate.py --check >/dev/null || fail "docs/openapi.json differs from deploy/openapi/generate.py's output"

if [ $failures -gt 0 ]; then
    echo "deploy/check.sh: $failures check(s) failed" >&2
    exit 1
fi
echo "deploy/check.sh: all checks passed"
