#!/usr/bin/env bash
# The project's test command (README): Rust unit and integration tests, then the Python
# suites that drive marketgate with Huawei's own SDK.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --all-targets
