#!/usr/bin/env python3
"""Means and standard deviations of interleaved `choreo-bench` runs, per binary.

usage: python3 bench/ab/stat.py 'bench/ab/relay-in-memory/*.json'

Files are named `<anything>-<binary>.json` (the last `-`-separated part names the binary).
CPU per order is per node: its CPU seconds in the phase over the orders that ended in it;
"node processes" adds up every choreo node, so runs with contexts hosted together
(`choreo-bench --node ...`) compare with runs of one process per context.
"""
import collections
import glob
import json
import statistics
import sys

NODES = ("orders", "nats-server", "payments", "inventory", "shipping")
rows = collections.defaultdict(lambda: collections.defaultdict(list))
for path in sorted(glob.glob(sys.argv[1])):
    binary = path.rsplit("-", 1)[1][: -len(".json")]
    for p in json.load(open(path))["phases"]:
        ended = max(p["completed"] + p["cancelled"], 1)
        row, ph = rows[binary], p["phase"]
        row[f"{ph} orders/s"].append(p["completed_per_second"])
        row[f"{ph} cpu ms/order"].append(1000 * p["cpu_seconds_per_order"])
        cpu = p["cpu_seconds"]
        nodes = sum(v for k, v in cpu.items() if k not in ("nats-server", "sim"))
        row[f"{ph} node processes ms/order"].append(1000 * nodes / ended)
        for node in NODES:
            if node in cpu:
                row[f"{ph} {node} ms/order"].append(1000 * cpu[node] / ended)
        row[f"{ph} p50 ms"].append(p["latency_ms"]["p50"])
        row[f"{ph} p99 ms"].append(p["latency_ms"]["p99"])
        if ph == "max" and "orders" in p["peak_rss_mib"]:
            row["max: orders RSS MiB"].append(p["peak_rss_mib"]["orders"])
if not rows:
    sys.exit(f"no files match {sys.argv[1]}")
binaries = list(rows)
print(f"{'metric':30}" + "".join(f"{b:>20}" for b in binaries))
keys = list(dict.fromkeys(k for b in binaries for k in rows[b]))
for key in keys:
    cells = []
    for b in binaries:
        v = rows[b].get(key)
        if not v:
            cells.append(f"{'-':>20}")
            continue
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        cells.append(f"{statistics.mean(v):11.2f} ±{sd:6.2f} ")
    print(f"{key:30}" + "".join(cells))
