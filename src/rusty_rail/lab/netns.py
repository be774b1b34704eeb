"""Network-namespace plumbing: create, enter (by subprocess), clean up.

Commands run in a namespace through `ip netns exec`, which also remounts /sys so that
/sys/class/net describes that namespace (the balancer reads its device there). Processes that must
see the host's bpffs (pinned maps) use `nsenter --net` instead, which keeps the mount namespace.
Netlink goes through pyroute2's per-namespace sockets, BPF attachment through functions that take
the namespace's name (bpf/tc.py, the XDP engine's), which enter it for one thread and always come
back (bpf/netns.py).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Mapping, Sequence

from pyroute2 import IPRoute
from pyroute2 import netns as _netns

from rusty_rail.bpf.netns import NETNS_DIR


def ns_exec(ns: str) -> list[str]:
    return ["ip", "netns", "exec", ns]


def ns_enter(ns: str) -> list[str]:
    """Enter only the network namespace (keeps the host's bpffs visible)."""
    return ["nsenter", f"--net={NETNS_DIR}/{ns}"]


def run(ns: str, argv: Sequence[str], *, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run argv inside ns and wait; stdout/stderr captured as text unless overridden."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    return subprocess.run([*ns_exec(ns), *argv], check=check, **kw)  # type: ignore[call-overload]


def popen(ns: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None, host_bpffs: bool = False,
          **kw: object) -> subprocess.Popen[bytes]:
    """Start argv inside ns. env is added to (not replacing) this process's environment.
    host_bpffs: enter with nsenter --net (keeps the host's /sys, so bpffs pins are visible)."""
    full_env = {**os.environ, **(env or {})}
    enter = ns_enter(ns) if host_bpffs else ns_exec(ns)
    return subprocess.Popen([*enter, *argv], env=full_env, **kw)  # type: ignore[call-overload]


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM a process (one popen() started) and reap it; SIGKILL when it has not exited after `timeout`."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def exists(ns: str) -> bool:
    return os.path.exists(f"{NETNS_DIR}/{ns}")


def create(ns: str) -> None:
    _netns.create(ns)


def with_prefix(prefix: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def pids(ns: str) -> list[int]:
    r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(p) for p in r.stdout.split()]


def remove(ns: str, *, timeout: float = 5.0) -> None:
    """Stop every process living in ns (SIGTERM, then SIGKILL at the deadline), then delete ns."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids(ns):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while pids(ns) and time.monotonic() < deadline:
            time.sleep(0.05)  # polling process exit, not synchronising traffic
        if not pids(ns):
            break
    if exists(ns):
        _netns.remove(ns)


def sysctl(ns: str, values: Mapping[str, str | int]) -> None:
    args = [f"{k}={v}" for k, v in values.items()]
    run(ns, ["sysctl", "-q", "-w", *args])


def rx_packets(ns: str, device: str) -> int:
    """What device in ns has received, in frames as its stack took them (IFLA_STATS64 rx_packets): a
    GRO or TSO super-packet counts once, as many MTU segments' worth of bytes."""
    with IPRoute(netns=ns) as ipr:
        return int(ipr.get_links(ifname=device)[0].get_attr("IFLA_STATS64")["rx_packets"])


# Legacy ethtool ioctls (include/uapi/linux/ethtool.h); the kernel maps them onto netdev features.
_SIOCETHTOOL = 0x8946
_ETHTOOL_SET = {"tx-checksum": 0x17, "sg": 0x19, "tso": 0x1F, "gso": 0x24, "gro": 0x2C}
_ETHTOOL_GET = {"tx-checksum": 0x16, "sg": 0x18, "tso": 0x1E, "gso": 0x23, "gro": 0x2B}


def offloads_off(ns: str, device: str, features: Sequence[str] = ("tso", "gso", "tx-checksum")) -> None:
    """Like `ethtool -K device tso off gso off tx off` in ns (ethtool itself may not be installed).

    The socket is created inside ns by pyroute2 (a child process hands it back), so the ioctl
    addresses ns's device, not the host's."""
    with _netns.create_socket(ns, socket.AF_INET, socket.SOCK_DGRAM) as s:
        for feat in features:
            _ethtool_ioctl(s, device, bytearray(struct.pack("II", _ETHTOOL_SET[feat], 0)))


def offload_on(ns: str, device: str, feature: str) -> bool:
    """Like `ethtool -k device` in ns, for one feature: is it on? (Some cannot be changed, e.g. a
    veth's TSO while its peer runs XDP: the kernel keeps it off and refuses the set.)"""
    data = bytearray(struct.pack("II", _ETHTOOL_GET[feature], 0))
    with _netns.create_socket(ns, socket.AF_INET, socket.SOCK_DGRAM) as s:
        _ethtool_ioctl(s, device, data)
    return bool(struct.unpack("II", bytes(data))[1])


def _ethtool_ioctl(s: socket.socket, device: str, data: bytearray) -> None:
    cbuf = (ctypes.c_char * len(data)).from_buffer(data)
    ifreq = struct.pack("16sP", device.encode(), ctypes.addressof(cbuf)).ljust(40, b"\0")
    fcntl.ioctl(s.fileno(), _SIOCETHTOOL, ifreq)
