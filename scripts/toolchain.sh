#!/usr/bin/env bash
# Makes the toolchain pinned in rust-toolchain.toml available without a download when the
# machine's rustup has the same release under another name (`stable`): the pinned name is made
# a link to it in rustup's toolchain directory (`rustup toolchain link` refuses release names).
# Does nothing when the pinned toolchain is there or rustup is absent.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v rustup >/dev/null || exit 0
pinned=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
[ -n "$pinned" ] || exit 0
if (cd / && rustup toolchain list) | grep -q "^${pinned}-"; then
    exit 0
fi
# Asked outside the checkout, so that rust-toolchain.toml does not apply to the question.
for candidate in stable $(cd / && rustup toolchain list | awk '{print $1}'); do
    version=$(cd / && rustup run "$candidate" rustc --version 2>/dev/null | awk '{print $2}') || continue
    if [ "$version" = "$pinned" ]; then
        sysroot=$(cd / && rustup run "$candidate" rustc --print sysroot)
        host=$(cd / && rustup run "$candidate" rustc -vV | sed -n 's/^host: //p')
        echo "toolchain: $candidate is $version: linked as $pinned-$host"
        ln -sfn "$sysroot" "$(dirname "$sysroot")/$pinned-$host"
        exit 0
    fi
done
echo "toolchain: $pinned is not installed here; install it with rustup" >&2
