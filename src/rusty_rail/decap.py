"""`rusty-rail decap --device IF attach|detach|status [--netns NAME]`: GRE decapsulation on a server.

For backends whose kernel has no GRE or ip6_gre module (no gre0 or ip6gre0 device): bpf/gre_decap.c on
IF's tc ingress (clsact, direct action) strips the outer IPv4 or IPv6 header + GRE from GRE v0 carrying
IPv4 or IPv6 (either in either), and the stack delivers the inner packet to the VIP the server holds on
`lo`; the server answers the client directly (DSR).
Only our own filter (handle 1, priority 49) is added or removed; other clsact filters stay.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from rusty_rail.bpf import libbpf, tc
from rusty_rail.bpf.build import object_path

__all__ = ["DecapStatus", "attach", "detach", "main", "status"]

PROGRAM = "rr_gre_decap"  # the function in gre_decap.c, which is also the name the kernel reports
HANDLE = 1
PRIORITY = 49


@dataclass(frozen=True)
class DecapStatus:
    device: str
    attached: bool
    program_id: int | None  # the kernel's id of the program on our filter, ours or not
    program_name: str | None = None


def attach(device: str, netns: str | None = None) -> DecapStatus:
    """Attach (or replace) the decap program on device's ingress, in netns (a name under /run/netns)
    or in this process's namespace."""
    with libbpf.BpfObject(str(object_path("gre_decap"))) as obj:
        obj.load()
        # The filter holds the program once attached: closing the object afterwards keeps it running.
        tc.attach(device, obj.program(PROGRAM).fd, tc.INGRESS, handle=HANDLE, priority=PRIORITY, netns=netns)
    return status(device, netns)


def detach(device: str, netns: str | None = None) -> DecapStatus:
    """Remove our filter if it runs the decap program; a foreign program on it is left alone."""
    if status(device, netns).attached:
        tc.detach(device, tc.INGRESS, handle=HANDLE, priority=PRIORITY, netns=netns)
    return status(device, netns)


def status(device: str, netns: str | None = None) -> DecapStatus:
    prog = tc.query(device, tc.INGRESS, handle=HANDLE, priority=PRIORITY, netns=netns)
    if prog is None:
        return DecapStatus(device, False, None)
    return DecapStatus(device, prog.name == PROGRAM, prog.id, prog.name)


def describe(st: DecapStatus) -> str:
    if st.attached:
        return f"{st.device}: GRE decap attached (prog id {st.program_id})"
    if st.program_id is not None:
        return f"{st.device}: GRE decap not attached (filter {PRIORITY}:{HANDLE} runs {st.program_name!r}, id {st.program_id})"
    return f"{st.device}: GRE decap not attached"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rusty-rail decap", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--device", required=True, help="interface receiving the GRE traffic")
    p.add_argument("--netns", default=None, help="network namespace of the device, a name under /run/netns "
                                                 "(default: this one)")
    p.add_argument("action", choices=["attach", "detach", "status"])
    a = p.parse_args(argv)
    try:
        st = {"attach": attach, "detach": detach, "status": status}[a.action](a.device, a.netns)
    except OSError as e:  # libbpf's errors are OSErrors too, with the errno
        print(f"rusty-rail decap {a.action}: {e}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as e:  # compiling gre_decap.c on first use failed
        print(f"rusty-rail decap {a.action}: {' '.join(e.cmd)}\n{e.stderr}", file=sys.stderr)
        return 1
    print(describe(st))
    return 0 if st.attached or a.action != "attach" else 1


if __name__ == "__main__":
    sys.exit(main())
