#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what the tests need, then runs them.
# Arguments go to `cargo test` (e.g. `bash scripts/test.sh --test network`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/toolchain.sh
bash scripts/test-deps.sh
cargo test --workspace --no-fail-fast "$@"
# The README's install path, checked with the build the tests just made (the debug profile, so
# nothing is compiled again): the installed binary runs and knows its commands.
install_root=$(mktemp -d)
trap 'rm -rf "$install_root"' EXIT
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}" \
    cargo install --quiet --path crates/execbox --root "$install_root" --debug --locked
"$install_root/bin/execbox" --version
# Read whole before matching: `grep -q` closing the pipe early would fail the pipeline.
completions=$("$install_root/bin/execbox" completions bash)
[[ "$completions" == *serve* ]] || { echo "install check: no completions" >&2; exit 1; }
shown=$("$install_root/bin/execbox" config show)
[[ "$shown" == *"listen = "* ]] || { echo "install check: config show failed" >&2; exit 1; }
echo "install check: cargo install --path crates/execbox works"
