#!/usr/bin/env bash
# The project's test command (README): Rust unit and integration tests (SQLite and, when it
# answers on 127.0.0.1:5432, PostgreSQL), the Python suites that drive marketgate with
# Huawei's own SDK, the live metrics check of deploy/, and README's quickstart verbatim.
set -euo pipefail
cd "$(dirname "$0")/.."

# The Rust tests name their PostgreSQL databases mg_<epoch>_<MG_TEST_RUN><id>: when this run
# ends, passed or failed, it drops its own (and leaves any other run's alone).
export MG_TEST_RUN="run$$t$(date +%s)"
drop_test_databases() {
  command -v psql >/dev/null || return 0
  local db
  for db in $(psql -h 127.0.0.1 -U postgres -Atc \
    "SELECT datname FROM pg_database WHERE datname LIKE 'mg\_%\_${MG_TEST_RUN}%'" 2>/dev/null); do
    psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null || true
  done
}
trap drop_test_databases EXIT

cargo test --all-targets

# Python suites: Huawei's SDK as the client, against the real binary.
cargo build --bin marketgate
if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -r tests/python/requirements.txt
export MARKETGATE_BIN=${CARGO_TARGET_DIR:-target}/debug/marketgate
set +e
.venv/bin/python -m pytest -q tests/python
status=$?
set -e
# pytest exits 5 when it collected nothing; that is a failure of this suite too.
if [[ $status -ne 0 ]]; then echo "python suites failed (pytest exit $status)"; exit "$status"; fi

bash deploy/check-metrics-live.sh "$MARKETGATE_BIN"
bash tests/quickstart.sh
