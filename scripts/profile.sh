#!/usr/bin/env bash
# Where the time of a benchmark goes: runs one benchmark (release build) under a system-wide
# `perf record` and prints the share of CPU time per process and per function, kernel
# functions included. Needs root and `perf` (Debian's linux-perf; scripts/test-deps.sh does not
# install it, as CI does not profile).
#
#   bash scripts/profile.sh execd             # every phase of the execd bench
#   EXECBOX_BENCH_FILE_MIB=0 EXECBOX_BENCH_STREAM_MIB=0 bash scripts/profile.sh execd   # echo only
#   TOP=40 bash scripts/profile.sh code
#
# The release binaries carry no debug information, so user-space frames are named by their
# symbol only, and call chains stop at the first frame without a frame pointer; the per-process
# and per-function flat profiles below do not need either.
set -euo pipefail
cd "$(dirname "$0")/.."
bench=${1:?usage: profile.sh BENCH}
top=${TOP:-30}
command -v perf >/dev/null || { echo "perf is not installed (apt-get install linux-perf)" >&2; exit 1; }
cargo build --release -p execbox --benches >/dev/null 2>&1 || cargo build --release -p execbox --benches
out=target/profile
mkdir -p "$out"
data="$out/$bench.data"
echo "== perf record -a -g: cargo bench -p execbox --bench $bench"
perf record -q -a -g -F 999 -o "$data" -- cargo bench -q -p execbox --bench "$bench" 2>&1 | tee "$out/$bench.log" | grep -E '^TARGET |execbox:|baseline' || true
echo
echo "== CPU time per process (all CPUs, the whole run)"
perf report -i "$data" --no-children --sort comm --stdio 2>/dev/null | grep -v '^#' | grep -v '^$' | head -n 15
echo
echo "== execbox processes (server: tokio-rt-worker threads; agent: execbox), by system call"
perf script -i "$data" -F comm,pid,tid,ip,sym 2>/dev/null | python3 scripts/perf-by-syscall.py execbox tokio-rt-worker
echo
echo "== CPU time per function (top $top)"
perf report -i "$data" --no-children --sort comm,dso,sym --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -n "$top"
