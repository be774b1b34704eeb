"""The AF_PACKET engine: TPACKET_V3 rings on one device, pure Python, one or more worker processes.

    engine.py     AfPacketEngine: the rusty_rail.dataplane.Engine protocol (state in, counters out)
    pool.py       forked workers, one PACKET_FANOUT group, requests over pipes
    worker.py     one socket + rings + Balancer + next-hop resolution: the packet loop
    walker.py     the ring walker: RX block -> BlockProcessor -> TX ring (the only per-packet I/O code)
    bulk.py       the engine's BlockProcessor: the common case of a block as numpy arrays, the rest decide()
    local.py      the in-process Balancer: apply only what changed, counters, explain
    ring.py       the socket, the mmap and the ring geometry (<linux/if_packet.h> mirrors)
    cbpf.py       classic BPF: the GRE-only socket filter and the inner-flow fanout program

All packet logic is the balancer's (rusty_rail.core); this package only moves bytes and state. It never
imports the control plane.
"""

from rusty_rail.engines.afpacket.engine import AfPacketEngine

__all__ = ["AfPacketEngine"]
