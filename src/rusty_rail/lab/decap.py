"""`rusty-rail decap --device IF attach|detach|status`: a GRE receiver for backends without a GRE module.

Attaches bpf/gre_decap.c on IF's tc ingress (clsact, direct action): GRE v0 carrying IPv4 is
stripped to the inner packet, which the stack then delivers to the VIP held on `lo`. Only our own
filter (pref 49, handle 1) is added or removed; other clsact filters on IF are left alone.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from .bpfobj import bpf_object
from .netns import ns_exec

PREF = "49"
SECTION = "tc"
_NAME = "gre_decap"


@dataclass(frozen=True)
class DecapStatus:
    device: str
    attached: bool
    program_id: int | None


def _tc(args: Sequence[str], ns: str | None, check: bool = True) -> subprocess.CompletedProcess[str]:
    prefix = ns_exec(ns) if ns else []
    return subprocess.run([*prefix, "tc", *args], check=check, capture_output=True, text=True)


def attach(device: str, ns: str | None = None) -> DecapStatus:
    """Attach (or replace) the decap program on device's ingress, in ns or the current namespace."""
    obj = bpf_object(_NAME)
    _tc(["qdisc", "replace", "dev", device, "clsact"], ns)
    _tc(["filter", "replace", "dev", device, "ingress", "pref", PREF, "handle", "1",
         "bpf", "direct-action", "object-file", str(obj), "section", SECTION], ns)
    return status(device, ns)


def detach(device: str, ns: str | None = None) -> DecapStatus:
    if status(device, ns).attached:
        _tc(["filter", "del", "dev", device, "ingress", "pref", PREF], ns)
    return status(device, ns)


def status(device: str, ns: str | None = None) -> DecapStatus:
    out = _tc(["filter", "show", "dev", device, "ingress"], ns, check=False).stdout
    for line in out.splitlines():
        if f"pref {PREF} " in line and _NAME in line:
            m = re.search(r"\bid (\d+)", line)
            return DecapStatus(device, True, int(m.group(1)) if m else None)
    return DecapStatus(device, False, None)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rusty-rail decap", description=__doc__.splitlines()[0])
    p.add_argument("--device", required=True, help="interface receiving the GRE traffic")
    p.add_argument("--netns", default=None, help="network namespace of the device (default: current)")
    p.add_argument("action", choices=["attach", "detach", "status"])
    a = p.parse_args(argv)
    try:
        st = {"attach": attach, "detach": detach, "status": status}[a.action](a.device, a.netns)
    except subprocess.CalledProcessError as e:
        print(f"tc failed: {' '.join(e.cmd)}\n{e.stderr}", file=sys.stderr)
        return 1
    state = f"attached (prog id {st.program_id})" if st.attached else "not attached"
    print(f"{st.device}: GRE decap {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
