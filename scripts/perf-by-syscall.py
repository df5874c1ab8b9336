#!/usr/bin/env python3
"""Where a process's CPU time goes, by system call: reads `perf script` output of a recording
made with call graphs (`perf record -g`) and, for each process name (comm) asked for, prints
the share of its samples under each system call (the outermost `__x64_sys_*`/`__do_sys_*`
frame of the sample's kernel stack), under page faults, or in user space (by leaf function).

    perf script -i target/profile/execd.data -F comm,pid,tid,ip,sym | \
        python3 scripts/perf-by-syscall.py execbox tokio-rt-worker

Used by scripts/profile.sh. The comm of a forked child is its parent's until it execs, so a
child's work before exec counts under the parent's name.
"""
import collections
import re
import sys

FRAME = re.compile(r"(__x64_sys_\w+|__do_sys_\w+|asm_exc_page_fault)")


def samples(lines):
    block = []
    for line in lines:
        if not line.strip():
            continue
        if line[0] not in " \t":
            if block:
                yield block
            block = [line]
        else:
            block.append(line)
    if block:
        yield block


def main():
    wanted = set(sys.argv[1:])
    per_comm = collections.defaultdict(collections.Counter)
    totals = collections.Counter()
    for block in samples(sys.stdin):
        comm = block[0].split()[0]
        totals[comm] += 1
        if wanted and comm not in wanted:
            continue
        key = None
        for frame in block[1:]:
            m = FRAME.search(frame)
            if m:
                key = m.group(1)  # the outermost one wins: frames go from leaf to root
        if key is None:
            parts = block[1].split() if len(block) > 1 else []
            key = "user: " + (parts[1] if len(parts) > 1 else "?")
        per_comm[comm][key] += 1
    everything = sum(totals.values()) or 1
    for comm, counts in sorted(per_comm.items(), key=lambda kv: -totals[kv[0]]):
        n = totals[comm]
        print(f"{comm}: {n} samples, {100 * n / everything:.1f}% of all")
        for key, c in counts.most_common(15):
            print(f"  {100 * c / n:5.1f}%  {key}")


if __name__ == "__main__":
    main()
