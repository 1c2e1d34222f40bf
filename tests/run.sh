#!/usr/bin/env bash
# The project's test command (README): Rust unit and integration tests (SQLite and, when it
# answers on 127.0.0.1:5432, PostgreSQL), the Python suites that drive marketgate with
# Huawei's own SDK, the live metrics check of deploy/, and README's quickstart verbatim.
set -euo pipefail
cd "$(dirname "$0")/.."

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
