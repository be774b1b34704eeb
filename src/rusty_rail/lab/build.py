"""Building a topology's plan (topology.py) out of namespaces: links, addresses and routes of both
families, sysctls. Called by Lab.up() on freshly created namespaces; nothing here runs in the host's
namespace (veth pairs are created in the lab's net namespace with the peer placed directly in the
host's namespace).
"""

from __future__ import annotations

import socket
from pathlib import Path

from pyroute2 import IPRoute

from . import netns
from .topology import (
    C6_NET,
    C_BRIDGE,
    C_NET,
    C_PREFIXLEN,
    PREFIXLEN6,
    ROUTER_C,
    ROUTER_C6,
    ROUTER_T,
    STANDARD_MTU,
    T_PREFIXLEN,
    V_BRIDGE,
    V_PREFIXLEN,
    Plan,
    tunnel_mtus,
)

BRIDGE_PORT_QUEUE = 1000
"""Frames the qdisc on a balancer's bridge port holds while the balancer's ring is full (links())."""
IFA_F_NODAD = 0x02  # include/uapi/linux/if_addr.h: usable at once, no duplicate address detection (~1 s)


def links(p: Plan, core_mtu: int = STANDARD_MTU) -> None:
    """The two bridges in the net namespace and a veth from each host's device to its bridge; the router's
    and the balancers' veths (both ends) with `core_mtu`."""
    bridged = [(V_BRIDGE, h) for h in (p.router, *p.balancers, *p.servers)]
    bridged += [(C_BRIDGE, h) for h in (*p.clients, p.router_c)]
    with IPRoute(netns=p.net_ns) as ipr:
        for br in (V_BRIDGE, C_BRIDGE):
            ipr.link("add", ifname=br, kind="bridge")
            ipr.link("set", index=ipr.link_lookup(ifname=br)[0], state="up")
        for br, h in bridged:
            # The peer is created directly in the host's namespace: no link ever exists in ours.
            ipr.link("add", ifname=h.bridge_port, kind="veth",
                     peer={"ifname": h.device, "net_ns_fd": h.namespace, "address": h.mac})
            core = h is p.router or h in p.balancers
            ipr.link("set", index=ipr.link_lookup(ifname=h.bridge_port)[0],
                     master=ipr.link_lookup(ifname=br)[0], state="up", mtu=core_mtu if core else STANDARD_MTU)
    # A veth delivers what an XDP program sends with XDP_TX only when its peer runs XDP too:
    # give the balancers' bridge ports an XDP_PASS program, so an XDP balancer works here.
    from ..engines.xdp import attach_pass

    for lb in p.balancers:
        attach_pass(lb.bridge_port, mode="native", netns=p.net_ns)
    # A veth whose peer runs native XDP hands frames over through the peer's ring of 256; a burst
    # beyond it is dropped, unless the sending veth has a qdisc (a veth has none by default): then the
    # kernel (6.16+) stops the queue and the qdisc holds the burst. Measured: 162-1039 frames per 5 s
    # dropped on the way to a native XDP balancer in a wire-like iperf3 upload, none with this qdisc.
    with IPRoute(netns=p.net_ns) as ipr:
        for lb in p.balancers:
            ipr.tc("replace", "pfifo", ipr.link_lookup(ifname=lb.bridge_port)[0], limit=BRIDGE_PORT_QUEUE)


def addresses_and_routes(p: Plan, core_mtu: int = STANDARD_MTU) -> None:
    """core_mtu > 1500: the router's and the balancers' devices get it (the tunnel fits without lowering
    the clients' path MTU, up to 1500), and the balancers' routes to the servers say 1500, their links'
    MTU: a full-size client packet is then too big only past the balancer (WIRE.md 8b's case)."""
    v_hosts = (p.router, *p.balancers, *p.servers)
    mtu4, mtu6 = tunnel_mtus(core_mtu)
    for h in (*p.clients, p.router_c, *v_hosts):
        plen = C_PREFIXLEN if h in (*p.clients, p.router_c) else V_PREFIXLEN
        with IPRoute(netns=h.namespace) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            idx = ipr.link_lookup(ifname=h.device)[0]
            core = h is p.router or h in p.balancers
            ipr.link("set", index=idx, state="up", mtu=core_mtu if core else STANDARD_MTU)
            ipr.addr("add", index=idx, address=h.address, prefixlen=plen)
            ipr.addr("add", index=idx, address=h.address6, prefixlen=PREFIXLEN6, flags=IFA_F_NODAD)
    for c in p.clients:
        with IPRoute(netns=c.namespace) as ipr:
            # Route MTUs so the client's segments still fit once the router adds its tunnel header (24
            # bytes of IPv4 + GRE; IPv6's up to 44, see TUNNEL_MTU6).
            ipr.route("add", dst="0.0.0.0/0", gateway=ROUTER_C, metrics={"mtu": mtu4})
            ipr.route("add", dst="::/0", gateway=ROUTER_C6, metrics={"mtu": mtu6})
    with IPRoute(netns=p.router.namespace) as ipr:
        idx = ipr.link_lookup(ifname=p.router.device)[0]
        ipr.addr("add", index=idx, address=ROUTER_T, prefixlen=T_PREFIXLEN)
        # No route to S here: BIRD installs it (BGP from the balancers, or the lab's static ones).
    # Permanent neighbours on network V, of both families: the encap program's fib lookup and the
    # balancers' next-hop lookup find every MAC from the first packet, with no ARP or ND race.
    for h in v_hosts:
        with IPRoute(netns=h.namespace) as ipr:
            idx = ipr.link_lookup(ifname=h.device)[0]
            for other in v_hosts:
                if other is not h:
                    for address in (other.address, other.address6):
                        ipr.neigh("add", dst=address, lladdr=other.mac, ifindex=idx, state="permanent")
            if h is not p.router:
                # Replies to clients go to the router as plain IP (DSR), never into a tunnel.
                ipr.route("add", dst=C_NET, gateway=p.router.address)
                ipr.route("add", dst=C6_NET, gateway=p.router.address6)
            if h in p.balancers and core_mtu > STANDARD_MTU:
                for server in p.servers:
                    ipr.route("add", dst=f"{server.address}/32", oif=idx, metrics={"mtu": STANDARD_MTU})
                    ipr.route("add", family=socket.AF_INET6, dst=f"{server.address6}/128", oif=idx,
                              metrics={"mtu": STANDARD_MTU})
    for s in p.servers:
        with IPRoute(netns=s.namespace) as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            ipr.addr("add", index=lo, address=p.vip, prefixlen=32)
            ipr.addr("add", index=lo, address=p.vip6, prefixlen=128, flags=IFA_F_NODAD)


def sysctls(p: Plan) -> None:
    if Path("/proc/sys/net/bridge").is_dir():
        # br_netfilter is loaded (by someone else: the lab needs none of it): keep its hooks out of
        # the lab's bridges, which would otherwise pass every frame through netfilter a second time.
        netns.sysctl(p.net_ns, {f"net.bridge.bridge-nf-call-{t}": 0 for t in ("iptables", "ip6tables", "arptables")})
    no_rpf = {"net.ipv4.conf.all.rp_filter": 0, "net.ipv4.conf.default.rp_filter": 0}
    for c in p.clients:
        netns.sysctl(c.namespace, {**no_rpf, f"net.ipv4.conf.{c.device}.rp_filter": 0})
    # fib_multipath_hash_policy=1: multipath routes hash the L4 5-tuple, so the encapsulator's
    # bpf_fib_lookup (ports filled) spreads flows, and keeps each on one balancer; for both families.
    netns.sysctl(p.router.namespace, {**no_rpf, "net.ipv4.ip_forward": 1, "net.ipv4.fib_multipath_hash_policy": 1,
                                      "net.ipv4.conf.eth0.rp_filter": 0, "net.ipv4.conf.eth1.rp_filter": 0,
                                      "net.ipv6.conf.all.forwarding": 1, "net.ipv6.fib_multipath_hash_policy": 1})
    for lb in p.balancers:
        netns.sysctl(lb.namespace, {**no_rpf, f"net.ipv4.conf.{lb.device}.rp_filter": 0})
    for s in p.servers:
        # arp_ignore/announce: the VIP is on lo; the server must not answer ARP for it on V. (IPv6 needs
        # nothing alike: neighbour discovery answers only for addresses of the interface asked.)
        netns.sysctl(s.namespace, {**no_rpf, f"net.ipv4.conf.{s.device}.rp_filter": 0,
                                   "net.ipv4.conf.all.arp_ignore": 1, "net.ipv4.conf.all.arp_announce": 2})
