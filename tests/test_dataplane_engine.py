"""The Engine protocol's options: the AF_PACKET worker default follows the machine."""

from __future__ import annotations

import os
import subprocess
import sys

from rusty_rail.dataplane import EngineOptions, default_workers
from rusty_rail.dataplane.engine import MAX_DEFAULT_WORKERS


def test_default_workers_leave_one_cpu_to_the_kernel() -> None:
    assert [default_workers(n) for n in (1, 2, 3, 4, 9, 64)] == [1, 1, 2, 3, MAX_DEFAULT_WORKERS, MAX_DEFAULT_WORKERS]
    assert default_workers() == default_workers(len(os.sched_getaffinity(0)))
    assert EngineOptions("eth0").workers == default_workers()


def test_default_workers_follow_the_cpus_the_process_may_use() -> None:
    """Not the machine's CPU count: a process pinned to one CPU (taskset, a cgroup's cpuset) gets 1."""
    cpu = min(os.sched_getaffinity(0))
    code = "from rusty_rail.dataplane import default_workers; print(default_workers())"
    out = subprocess.run(["taskset", "-c", str(cpu), sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "1"
