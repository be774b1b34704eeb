"""Doing one thing inside another network namespace: setns(2) for the calling thread, and back.

Interfaces, ifindexes, XDP and tc attachments belong to a namespace; the lab and the tools act on
devices of namespaces they are not in. setns changes only the calling thread, so the block runs there
and the thread returns to its own namespace afterwards, also when the block raises.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

NETNS_DIR = "/run/netns"
"""Where `ip netns add` (and pyroute2) put named namespaces."""
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns({what}): {os.strerror(code)}")


@contextlib.contextmanager
def in_netns(netns: int | str | None) -> Iterator[None]:
    """Run the block in a network namespace, then come back (this thread only).

    `netns`: an open fd of a namespace, a name under /run/netns, a path, or None (stay where we are)."""
    if netns is None:
        yield
        return
    if isinstance(netns, str):
        path = netns if "/" in netns else f"{NETNS_DIR}/{netns}"
        there = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # a missing namespace raises here
    else:
        path, there = f"fd {netns}", netns
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.fstat(here).st_ino == os.fstat(there).st_ino:
            yield
            return
        _setns(there, path)
        try:
            yield
        finally:
            _setns(here, "back")
    finally:
        os.close(here)
        if isinstance(netns, str):
            os.close(there)
