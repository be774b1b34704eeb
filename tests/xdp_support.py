"""Shared by the XDP tests: the Python verdict's XDP action, and a program holding what a Balancer holds."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address, IPv6Address, ip_address

from rusty_rail.core.balancer import Balancer
from rusty_rail.core.ethernet import mac_to_bytes
from rusty_rail.core.maglev import build_table
from rusty_rail.core.options import ENVIRONMENT_OPTIONS
from rusty_rail.core.service import Service, ServiceKey
from rusty_rail.core.verdict import Action
from rusty_rail.dataplane import DataplaneState
from rusty_rail.engines.xdp import XdpAction, XdpProgram, counters
from rusty_rail.engines.xdp.planner import Desired

VERDICT = {Action.FORWARD: XdpAction.TX, Action.REPLY: XdpAction.TX, Action.PASS: XdpAction.PASS,
           Action.DROP: XdpAction.DROP}


def mirror(program: XdpProgram, balancer: Balancer) -> None:
    """Make the program's maps hold the balancer's services, neighbours, address, seed and timeouts."""
    program.sync(Desired.mirror(balancer, program.max_table_size))


def catch_all_state(backends: Iterable[str], size: int, weights: Mapping[str, int] | None = None) -> DataplaneState:
    """The environment form: one catch-all service."""
    return DataplaneState((Service(ServiceKey.catch_all(), build_table(list(backends), size, weights), ENVIRONMENT_OPTIONS),),
                          size)


def desired(state: DataplaneState, address: str, mac: str | bytes, macs: Mapping[str, str | bytes],
            address6: str | None = None, mtu: int = 1500) -> Desired:
    """`state` served from (address, address6, mac), next hops `macs` (backend -> MAC; absent: unknown)."""
    def raw(x: str | bytes) -> bytes:
        return x if isinstance(x, bytes) else mac_to_bytes(x)

    return Desired(state, IPv4Address(address), raw(mac), {int(ip_address(b)): raw(v) for b, v in macs.items()},
                   local_address6=None if address6 is None else IPv6Address(address6), mtu=mtu)


def nonzero(program: XdpProgram) -> dict[str, int]:
    """The program's rr_stats counters that are not zero, by name."""
    return {k: v for k, v in counters.named(program).items() if v}


def backend_of(program: XdpProgram, frame: bytes) -> str:
    """Where the program forwards `frame` (one BPF_PROG_TEST_RUN): the IPv4 backend the output is
    addressed to; the run must end in XDP_TX."""
    action, out = program.test_run(frame)
    assert action == XdpAction.TX, nonzero(program)
    return str(IPv4Address(out[30:34]))


def backend_index(program: XdpProgram, backend: str | IPv4Address | IPv6Address) -> int | None:
    return program.image.backend_index.get(int(ip_address(backend)))
