#!/usr/bin/env python3
"""Context switches, CPU and run-queue wait per thread group of a running bench (choreo
nodes, sim, bench, nats-server), from /proc/<pid>/task/*/{status,stat,schedstat}, over N
seconds (default 10).

Columns per group (process, thread name with its trailing digits folded):
  vol/s, invol/s  voluntary and involuntary context switches a second;
  cpu%            CPU time (utime + stime, in clock ticks) as % of one core;
  wait ms/s       time its threads spent runnable but waiting for a CPU (schedstat's
                  run-queue delay), milliseconds a second: 1000 is one thread always waiting;
  slices/s        times its threads were put on a CPU;
  wait us/slice   the mean wait before each of those.

Usage: python3 bench/ctxsw.py [seconds]   (while `choreo-bench` runs; bench/PROFILE.md)
"""
import collections
import os
import re
import sys
import time


def process_name(pid):
    try:
        cmd = open(f"/proc/{pid}/cmdline").read().split("\0")
    except OSError:
        return None
    if not cmd or not cmd[0]:
        return None
    exe = os.path.basename(cmd[0])
    if exe == "nats-server":
        return "nats-server"
    if exe == "choreo-bench":
        return "bench"
    if exe == "choreo" and len(cmd) > 1:
        if cmd[1] == "node" and "--context" in cmd:
            return cmd[cmd.index("--context") + 1]
        return cmd[1]
    return None


def snap():
    r = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        name = process_name(pid)
        if name is None:
            continue
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for t in tids:
            base = f"/proc/{pid}/task/{t}"
            try:
                st = open(f"{base}/status").read()
                comm = open(f"{base}/comm").read().strip()
                stat = open(f"{base}/stat").read().rsplit(")", 1)[1].split()
                run_ns, wait_ns, slices = map(int, open(f"{base}/schedstat").read().split())
            except (OSError, ValueError):
                continue
            vol = int(re.search(r"voluntary_ctxt_switches:\s+(\d+)", st).group(1))
            invol = int(re.search(r"nonvoluntary_ctxt_switches:\s+(\d+)", st).group(1))
            cpu = int(stat[11]) + int(stat[12])
            comm = re.sub(r"\d+$", "N", comm)
            r[(name, comm, t)] = (vol, invol, cpu, wait_ns, slices)
    return r


def main():
    d = float(sys.argv[1]) if len(sys.argv) > 1 else 10
    a = snap()
    time.sleep(d)
    b = snap()
    # vol, invol, cpu ticks, wait ns, slices, threads
    agg = collections.defaultdict(lambda: [0, 0, 0, 0, 0, 0])
    for k, now in b.items():
        before = a.get(k, (0, 0, 0, 0, 0))
        g = agg[(k[0], k[1])]
        for i in range(5):
            g[i] += now[i] - before[i]
        g[5] += 1
    tick = os.sysconf("SC_CLK_TCK")
    total = [0, 0, 0, 0]
    print(f"{'process':12s} {'thread':20s} thr   vol/s invol/s   cpu%  wait ms/s slices/s wait us/slice")
    for k, g in sorted(agg.items(), key=lambda x: -(x[1][0] + x[1][1])):
        vol, invol, cpu, wait_ns, slices, threads = g
        total = [total[0] + vol + invol, total[1] + cpu, total[2] + wait_ns, total[3] + slices]
        if vol + invol < d * 50:
            continue
        per_slice = wait_ns / slices / 1e3 if slices else 0.0
        print(
            f"{k[0]:12s} {k[1]:20s} {threads:3d} {vol / d:7.0f} {invol / d:7.0f} "
            f"{cpu * 100 / tick / d:6.1f} {wait_ns / 1e6 / d:10.1f} {slices / d:8.0f} {per_slice:13.0f}"
        )
    per_slice = total[2] / total[3] / 1e3 if total[3] else 0.0
    print(
        f"total: {total[0] / d:.0f} context switches/s, cpu {total[1] * 100 / tick / d:.0f}%, "
        f"run-queue wait {total[2] / 1e6 / d:.0f} ms/s, {total[3] / d:.0f} slices/s, "
        f"{per_slice:.0f} us wait per slice (all groups, rows under 50 switches/s left out)"
    )


if __name__ == "__main__":
    main()
