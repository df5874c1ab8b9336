#!/usr/bin/env bash
# Every row of the "faster than bare" table (issue 15) in one command: runs the benchmarks that
# measure them (each measures its baselines in the same run), then prints their `TARGET |` rows
# as one table, with the load average before and after. Needs root, like the benchmarks.
#
#   bash scripts/bench-targets.sh            # the full runs
#   QUICK=1 bash scripts/bench-targets.sh    # fewer samples, smaller transfers
#
# The benchmarks' own outputs go to target/bench-targets/<bench>.log.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/toolchain.sh
out=target/bench-targets
mkdir -p "$out"
if [[ -n "${QUICK:-}" ]]; then
    export EXECBOX_BENCH_N=50 EXECBOX_BENCH_PULLS=0 EXECBOX_BENCH_BIG_MIB=0 EXECBOX_BENCH_DD_MIB=0
    export EXECBOX_BENCH_ECHO_N=100 EXECBOX_BENCH_STREAM_MIB=128 EXECBOX_BENCH_CONCURRENT=20
    export EXECBOX_BENCH_CODE_N=100 EXECBOX_BENCH_CTX_N=20 EXECBOX_BENCH_KERNEL_N=3
    export EXECBOX_BENCH_ISOL8_N=100 EXECBOX_BENCH_DENSITY_SAMPLES=100
fi
# 2,000 idle sandboxes is the density target; 1 GiB the transfer size of the table.
export EXECBOX_BENCH_IDLE="${EXECBOX_BENCH_IDLE:-2000}"
export EXECBOX_BENCH_FILE_MIB="${EXECBOX_BENCH_FILE_MIB:-1024}"
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
cargo build --release -p execbox --benches >/dev/null 2>&1 || cargo build --release -p execbox --benches
for bench in isol8 lifecycle density execd code; do
    echo "== cargo bench -p execbox --bench $bench"
    cargo bench -q -p execbox --bench "$bench" 2>&1 | tee "$out/$bench.log" | grep '^TARGET |' || true
done
echo
echo "faster than bare: $(nproc) CPUs, load average before $load_before, after $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%s\n' "row | execbox | baseline (same run) | ratio | target | verdict" "---|---|---|---|---|---"
cat "$out"/{isol8,lifecycle,density,execd,code}.log 2>/dev/null | grep '^TARGET |' | sed 's/^TARGET | //'
