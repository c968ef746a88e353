#!/usr/bin/env python3
"""CPU used by each part of a SQL benchmark run, from /proc: sleeps SECONDS, then prints one
JSON object with the CPU each group of processes used, in CPU-seconds per second, and how
busy the whole machine was. Groups: PostgreSQL backends of database "bench", the background
worker, other PostgreSQL processes, pgbench, each tob-sequencer node (its threads and children
together), everything else. Usage: cpu-split.py SECONDS"""
import json
import os
import sys
import time

HZ = os.sysconf("SC_CLK_TCK")


def group(cmdline):
    if "tob-sequencer" in cmdline:
        args = cmdline.split()
        if "--node-id" in args:
            return "node " + args[args.index("--node-id") + 1]
        return "node"
    if cmdline.startswith("postgres: postgres bench"):
        return "backends"
    if cmdline.startswith("postgres: tob"):
        return "worker"
    if "pgbench" in cmdline:
        return "pgbench"
    if cmdline.startswith("postgres") or "/postgresql/" in cmdline:
        return "postgres other"
    return "other"


def sample():
    cpu = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # utime, stime, and the children's that were waited for (a node's snapshot child).
        cpu[pid] = (group(cmdline), sum(int(x) for x in fields[11:15]))
    with open("/proc/stat") as f:
        times = [int(x) for x in f.readline().split()[1:]]
    return cpu, sum(times), times[3] + times[4]


seconds = float(sys.argv[1])
before, total_before, idle_before = sample()
time.sleep(seconds)
after, total_after, idle_after = sample()
used = {}
for pid, (name, ticks) in after.items():
    if pid in before:
        used[name] = used.get(name, 0) + (ticks - before[pid][1]) / HZ / seconds
busy = 1 - (idle_after - idle_before) / max(1, total_after - total_before)
print(json.dumps({"cpu": used, "busy": busy}))
