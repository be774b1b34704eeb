"""The addressing plan of the original's four test topologies, dual-stack, as data (no I/O here).

    clients --C-- router --V-- balancers
                         \\--V-- servers (VIPs on lo, GRE decap, replies straight back: DSR)

V is a bridge joining router, balancers and servers; C is a second bridge joining the clients and the
router (so two clients share one subnet); S holds the VIPs; T is the tunnel subnet. Every network has an
IPv6 twin next to the original's IPv4 one, inside the documentation prefix 2001:db8::/32 (RFC 3849),
whose last group repeats the IPv4 address's last octet (192.168.137.11 is 2001:db8:137::11):

    V  192.168.137.0/24   2001:db8:137::/64     router .1 / ::1, balancers .11- / ::11-, servers .21- / ::21-
    C  10.0.0.0/24        2001:db8:c::/64       clients .1- / ::1-, router .254 / ::fe
    S  10.1.0.0/24        2001:db8:1::/64       the VIPs 10.1.0.1 and 2001:db8:1::1
    T  172.16.0.0/22                            the router's 172.16.0.1

The router's routes to S come from BIRD: BGP from the balancers (AS BALANCER_AS, the router AS
ROUTER_AS), or static ones the lab sets; the IPv6 routes' next hops are the hosts' IPv6 addresses on V.
"""

from __future__ import annotations

from dataclasses import dataclass

# (clients, servers, balancers) of the original's topologies 1-4, and 5, ours: topology 2 with a third
# server (a backend to add at run time, or to lose while two others keep serving).
TOPOLOGIES: dict[int, tuple[int, int, int]] = {1: (1, 1, 1), 2: (1, 2, 1), 3: (1, 2, 2), 4: (2, 2, 2), 5: (1, 3, 1)}

V_NET = "192.168.137.0/24"
V_PREFIXLEN = 24
C_NET = "10.0.0.0/24"
C_PREFIXLEN = 24
S_NET = "10.1.0.0/24"
VIP = "10.1.0.1"
T_NET = "172.16.0.0/22"
T_PREFIXLEN = 22
ROUTER_V = "192.168.137.1"
ROUTER_C = "10.0.0.254"
ROUTER_T = "172.16.0.1"
TUNNEL_MTU = 1476  # 1500 - 20 (outer IPv4) - 4 (GRE)

V6_NET = "2001:db8:137::/64"
C6_NET = "2001:db8:c::/64"
S6_NET = "2001:db8:1::/64"
PREFIXLEN6 = 64
VIP6 = "2001:db8:1::1"
ROUTER_V6 = "2001:db8:137::1"
ROUTER_C6 = "2001:db8:c::fe"
TUNNEL_MTU6 = 1456
"""The clients' IPv6 route MTU: room for the larger tunnel header, 40 (outer IPv6) + 4 (GRE), whichever
outer family the router's tunnels for IPv6 use, so one client setting serves both."""

STANDARD_MTU = 1500
"""Every lab link's MTU, unless Lab(core_mtu=...) raises the router's and balancers' (tunnel_mtus)."""


def tunnel_mtus(core_mtu: int = STANDARD_MTU) -> tuple[int, int]:
    """The clients' (and the router's tunnel routes') IPv4 and IPv6 route MTUs when the router's and the
    balancers' links on V have `core_mtu`: room for the tunnel's header, at most the clients' own links'."""
    extra = core_mtu - STANDARD_MTU
    return min(STANDARD_MTU, TUNNEL_MTU + extra), min(STANDARD_MTU, TUNNEL_MTU6 + extra)


ROUTER_AS = 65000
BALANCER_AS = 65001  # every balancer the same AS: their routes to a VIP are equal, and BIRD merges them
V_BRIDGE = "brv"
C_BRIDGE = "brc"


def _mac(net: int, last_octet: int) -> str:
    # Fixed MACs make the permanent neighbour entries (and packet captures) predictable.
    return f"02:72:72:{net:02x}:00:{last_octet:02x}"


@dataclass(frozen=True)
class Host:
    """One end of a link: the namespace, the device inside it, its addresses and MAC."""

    name: str  # "client1", "router", "lb1", "server2"
    namespace: str
    device: str
    address: str
    mac: str
    bridge_port: str  # the veth peer's name on the bridge, in the net namespace
    address6: str  # the IPv6 twin of address (the module's docstring)


@dataclass(frozen=True)
class Plan:
    topology: int
    prefix: str
    net_ns: str  # holds the two bridges
    clients: tuple[Host, ...]
    router_c: Host  # the router's leg on C (eth1)
    router: Host  # the router's leg on V (eth0): GRE source address, encap program
    balancers: tuple[Host, ...]
    servers: tuple[Host, ...]
    vip: str = VIP
    vip6: str = VIP6

    @property
    def namespaces(self) -> tuple[str, ...]:
        hosts = (*self.clients, self.router, *self.balancers, *self.servers)
        return (self.net_ns, *(h.namespace for h in hosts))

    def host(self, name: str) -> Host:
        for h in (*self.clients, self.router, *self.balancers, *self.servers):
            if h.name == name:
                return h
        raise KeyError(name)


def plan(topology: int, prefix: str = "rr-") -> Plan:
    """The namespaces, devices and addresses of a topology; all namespace names start with prefix."""
    if topology not in TOPOLOGIES:
        raise ValueError(f"topology must be one of {sorted(TOPOLOGIES)}, not {topology}")
    n_clients, n_servers, n_balancers = TOPOLOGIES[topology]

    def v_host(name: str, octet: int) -> Host:
        return Host(name, prefix + name, "eth0", f"192.168.137.{octet}", _mac(0, octet), f"v-{name}",
                    f"2001:db8:137::{octet}")

    clients = tuple(
        Host(f"client{i}", f"{prefix}client{i}", "eth0", f"10.0.0.{i}", _mac(1, i), f"c-client{i}", f"2001:db8:c::{i}")
        for i in range(1, n_clients + 1)
    )
    return Plan(
        topology=topology,
        prefix=prefix,
        net_ns=f"{prefix}net",
        clients=clients,
        router_c=Host("router", f"{prefix}router", "eth1", ROUTER_C, _mac(1, 254), "c-router", ROUTER_C6),
        router=v_host("router", 1),
        balancers=tuple(v_host(f"lb{i}", 10 + i) for i in range(1, n_balancers + 1)),
        servers=tuple(v_host(f"server{i}", 20 + i) for i in range(1, n_servers + 1)),
    )
