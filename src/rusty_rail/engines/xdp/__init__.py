"""The XDP engine: bpf/xdp_balancer.c decides per packet in the kernel; this package is its control plane.

- maps.py: ctypes mirrors of bpf/rr_structs.h and the map names (checked against C by a test);
- planner.py: what the maps must hold, as a pure function of the wanted state (no libbpf, no I/O);
- program.py: `XdpProgram`, one loaded program and its maps: load, write, attach, hand over, test runs;
- counters.py: the program's figures as `rusty_rail.dataplane.Counters`;
- mode.py: native or generic attach, decided per device (engine auto's veth rule);
- engine.py: `XdpEngine`, the `rusty_rail.dataplane.Engine`.
"""

from __future__ import annotations

import os
from pathlib import Path

from rusty_rail.dataplane import EngineOptions
from rusty_rail.engines.xdp.engine import XdpEngine, handover_dir
from rusty_rail.engines.xdp.mode import AttachChoice, attach_mode
from rusty_rail.engines.xdp.program import XdpAction, XdpProgram, attach_pass, default_object_path, detach_all

__all__ = ["AttachChoice", "XdpAction", "XdpEngine", "XdpProgram", "attach_mode", "attach_pass", "default_object_path",
           "detach_all", "handover_dir", "xdp_available"]


def xdp_available(options: EngineOptions | None = None, *,
                  object_path: str | os.PathLike | None = None) -> tuple[bool, str]:
    """Can the XDP program be loaded here? (yes/no, and why) — for engine `auto`.

    Loading is the honest test: it needs the compiled object, privileges (CAP_BPF/CAP_SYS_ADMIN), a
    kernel with the helpers the program uses and a verifier that accepts it. Attaching to the device is
    checked by XdpEngine.start(). `options` is accepted for the device (not looked at yet)."""
    path = Path(object_path) if object_path is not None else default_object_path()
    if not path.exists():
        return False, f"{path.name} is not built (run `make bpf`)"
    try:
        # Small maps: this is a probe, it must not allocate the production connection table.
        with XdpProgram(path, table_size=251, conn_capacity=64, max_services=1):
            pass
    except OSError as exc:  # LibbpfError is an OSError; EPERM without privileges
        first = (exc.strerror or str(exc)).splitlines()[0]
        return False, f"the XDP program does not load here: {first}"
    return True, f"the XDP program loads here (kernel {os.uname().release})"
