#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what the tests need, then runs them.
# Arguments go to `cargo test` (e.g. `bash scripts/test.sh --test network`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/toolchain.sh
bash scripts/test-deps.sh
cargo test --workspace --no-fail-fast "$@"
