#!/usr/bin/env python3
"""Sets the EEVDF time slice (sched_setattr's sched_runtime for SCHED_OTHER, Linux 6.12+;
the default is the kernel's base slice) of every thread of a running bench's processes
(choreo nodes, sim, bench, nats-server), keeping each thread's nice value. Threads start
during a run (tokio's blocking pool, sled's I/O pool), so it sets them again every 2 s until
killed. Needs CAP_SYS_NICE. A measurement tool: bench/PROFILE.md, "Run-queue wait".

Usage: python3 bench/ab/sched-slice/slice.py MICROSECONDS
"""
import ctypes
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from ctxsw import process_name  # noqa: E402

SYS_SCHED_SETATTR = 314  # x86_64
SYS_SCHED_GETATTR = 315


class SchedAttr(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("sched_policy", ctypes.c_uint32),
        ("sched_flags", ctypes.c_uint64),
        ("sched_nice", ctypes.c_int32),
        ("sched_priority", ctypes.c_uint32),
        ("sched_runtime", ctypes.c_uint64),
        ("sched_deadline", ctypes.c_uint64),
        ("sched_period", ctypes.c_uint64),
        ("sched_util_min", ctypes.c_uint32),
        ("sched_util_max", ctypes.c_uint32),
    ]


libc = ctypes.CDLL(None, use_errno=True)


def set_slice(tid, runtime_ns):
    attr = SchedAttr()
    size = ctypes.sizeof(SchedAttr)
    if libc.syscall(SYS_SCHED_GETATTR, tid, ctypes.byref(attr), size, 0) != 0:
        return False
    if attr.sched_policy != 0 or attr.sched_runtime == runtime_ns:
        return attr.sched_runtime == runtime_ns
    attr.size = size
    attr.sched_flags = 0
    attr.sched_runtime = runtime_ns
    return libc.syscall(SYS_SCHED_SETATTR, tid, ctypes.byref(attr), 0) == 0


def main():
    runtime_ns = int(float(sys.argv[1]) * 1000)
    while True:
        done = failed = 0
        for pid in filter(str.isdigit, os.listdir("/proc")):
            if process_name(pid) is None:
                continue
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in tids:
                if set_slice(int(tid), runtime_ns):
                    done += 1
                else:
                    failed += 1
        print(f"{time.strftime('%H:%M:%S')} slice {runtime_ns} ns: {done} threads, {failed} failed", flush=True)
        time.sleep(2)


if __name__ == "__main__":
    main()
