#!/usr/bin/env bash
# Every marketgate_* metric named in the alert rules and the Grafana dashboard must be
# declared in deploy/metrics.txt and, given a /metrics text dump, be exported.
#
#   bash deploy/check-metrics.sh                 # rules + dashboard vs deploy/metrics.txt
#   bash deploy/check-metrics.sh metrics.txt     # ... and vs a dump of a running serve:
#   curl -fsS -H "Authorization: Bearer $TOKEN" http://127.0.0.1:8082/metrics > m.txt
#   bash deploy/check-metrics.sh m.txt
#
# A metric counts as exported when the dump has a sample of it or a `# TYPE` line for it
# (a labelled metric with no series yet). Histogram series (_bucket, _sum, _count) count
# for the histogram's name.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
rules="$here/prometheus/alerts.yml"
dashboard="$here/grafana/dashboards/marketgate.json"
declared_file="$here/metrics.txt"

strip() { sed -E 's/_(bucket|sum|count)$//' | sort -u; }

used="$(grep -ohE 'marketgate_[a-z0-9_]+' "$rules" "$dashboard" | strip)"
declared="$(grep -vE '^\s*(#|$)' "$declared_file" | cut -d'|' -f1 | tr -d ' ' | sort -u)"

status=0
undeclared="$(comm -23 <(echo "$used") <(echo "$declared"))"
if [ -n "$undeclared" ]; then
    echo "used in rules/dashboard but not declared in deploy/metrics.txt:" >&2
    echo "$undeclared" | sed 's/^/  /' >&2
    status=1
fi

if [ $# -ge 1 ]; then
    dump="$1"
    [ -r "$dump" ] || { echo "cannot read metrics dump: $dump" >&2; exit 2; }
    exported="$( { grep -E '^# TYPE ' "$dump" || true; } | awk '{print $3}';
                 { grep -vE '^\s*(#|$)' "$dump" || true; } | sed -E 's/[{ ].*//'; )"
    exported="$(echo "$exported" | strip)"
    missing="$(comm -23 <(echo "$used") <(echo "$exported"))"
    if [ -n "$missing" ]; then
        echo "used in rules/dashboard but absent from $dump:" >&2
        echo "$missing" | sed 's/^/  /' >&2
        status=1
    fi
fi

if [ $status -eq 0 ]; then
    echo "check-metrics: $(echo "$used" | wc -l) metric names used, all declared${1:+ and exported}"
fi
exit $status
