"""What the kernel says a process or CPU spent, from /proc: for the benchmarks' CPU-per-packet figures."""

from __future__ import annotations

import os


def task_ns(pid: int) -> int:
    """CPU time (ns) of all threads of `pid`, from schedstat."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            total += int(open(f"/proc/{pid}/task/{tid}/schedstat").read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def family(pid: int) -> list[int]:
    """`pid` and its descendants (an engine's forked workers), from /proc/PID/task/*/children."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in open(f"/proc/{p}/task/{tid}/children").read().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return found


def cpu_stat(cpu: int) -> dict[str, int]:
    """Jiffies of one CPU from /proc/stat."""
    for line in open("/proc/stat"):
        if line.startswith(f"cpu{cpu} "):
            f = list(map(int, line.split()[1:]))
            return {"user": f[0] + f[1], "system": f[2], "idle": f[3] + f[4], "irq": f[5], "softirq": f[6],
                    "steal": f[7], "busy": f[0] + f[1] + f[2] + f[5] + f[6] + f[7]}
    raise LookupError(cpu)


def napi_threads(dev: str) -> set[int]:
    out = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if open(f"/proc/{pid}/comm").read().startswith(f"napi/{dev}-"):
                    out.add(int(pid))
            except OSError:
                pass
    return out


def jiffies(pid: int) -> tuple[int, int]:
    """utime, stime (clock ticks), minor and major page faults of a process (all threads)."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]), int(f[12]), int(f[7]), int(f[9])
