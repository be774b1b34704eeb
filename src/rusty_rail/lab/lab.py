"""`Lab`: one of the four test topologies, built in network namespaces, with real TCP through it.

    with Lab(topology=2, prefix="rr-") as lab:     # up() on entry, down() on exit
        lab.start_balancers()                      # `python -m rusty_rail` in each balancer namespace
        results = lab.traffic(n=20)                # real HTTP GETs client -> VIP
        results = lab.traffic(n=20, vip=lab.vip6)  # the same over IPv6

Every host is dual-stack (topology.py has the plan). The router wraps IPv4 packets in GRE over IPv4, and
IPv6 packets in GRE over IPv6 by default; Lab(outer6="ipv4") sends those in GRE over IPv4 instead (to
the IPv4 address of the same host as the route's IPv6 next hop: router_encap.c's rr_encap_endpoints).
Past the balancers, the outer family is the backends': a balancer run in the environment form
(balancer_env()) lists the servers' IPv4 addresses, so IPv6 flows reach the servers in GRE over IPv4;
a configuration file may give an IPv6 VIP the servers' IPv6 addresses (GRE over IPv6 all the way).
The servers decapsulate either outer family carrying either inner family (gre_decap.c).

The router is BIRD 2 (bird.py) with a BGP session to every balancer: balancers that announce their VIPs
over BGP (a config file with [bgp]) get the router's ECMP route; `set_targets()` (static routes in BIRD)
serves balancers run without BGP, and the direct mode (router -> servers). The router's GRE goes to the
next hop of its kernel route for each flow (router_encap.c), whichever of the two put it there.

Everything lives in namespaces whose names start with the prefix; nothing is created in the host's
namespace (veth pairs are created in the lab's net namespace with the peer placed directly in the
host's namespace). `down()` deletes every namespace with the prefix, so it also cleans up after a
crashed run. What the lab's long-running processes write (the servers' httpd, balancers started
without explicit stdout/stderr) goes to files in `log_dir`, never to the caller's terminal or pipe.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from pyroute2 import IPRoute
from pyroute2 import netns as _pynetns

from .. import decap
from . import build, netns
from . import router as _router
from .bird import Bird, Family, Peer, StaticRoute
from .topology import (
    BALANCER_AS,
    ROUTER_AS,
    S6_NET,
    S_NET,
    STANDARD_MTU,
    TOPOLOGIES,
    Host,
    Plan,
    plan,
    tunnel_mtus,
)

if TYPE_CHECKING:
    from . import keepalive as _keepalive
    from . import pool as _pool
    from . import streams as _streams
    from . import traffic as _traffic
    from .events import Events

OUTER6 = ("ipv6", "ipv4")
"""The outer families the router's tunnels for IPv6 packets may use (Lab(outer6=...))."""
_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,15}$")
RUN_DIR = Path("/run/rusty-rail-lab")


def _check_prefix(prefix: str) -> str:
    # down() deletes every namespace starting with prefix: an empty or odd one would be dangerous.
    if not _PREFIX_RE.match(prefix):
        raise ValueError(f"bad lab prefix {prefix!r} (1-16 of [A-Za-z0-9_.-], not starting with a symbol)")
    return prefix


class Lab:
    """Namespaces, links and GRE endpoints of one topology. Attributes come from the `Plan`."""

    def __init__(self, topology: int = 1, prefix: str = "rr-", *, direct: bool = False, bgp: bool = False,
                 outer6: str = "ipv6", python: str = sys.executable, core_mtu: int = STANDARD_MTU) -> None:
        """direct=True points the router's GRE straight at the servers (no balancer): a test mode.
        bgp=True: no static routes at all; the router sends only where balancers announce (BGP).
        outer6: the outer family of the router's tunnels for IPv6 packets, "ipv6" or "ipv4".
        core_mtu: the router's and the balancers' links on V (default 1500, as every link); larger, the
        clients keep a 1500-byte path to the balancers and the servers' 1500 is met only past them
        (build.addresses_and_routes): path MTU discovery through the balancer (WIRE.md 8b)."""
        if outer6 not in OUTER6:
            raise ValueError(f"outer6 must be one of {', '.join(OUTER6)}, not {outer6!r}")
        self.plan: Plan = plan(topology, _check_prefix(prefix))
        self.direct = direct
        self.bgp = bgp
        self.outer6 = outer6
        self.python = python
        if not STANDARD_MTU <= core_mtu <= 9000:
            raise ValueError(f"core_mtu must be 1500-9000, not {core_mtu}")
        self.core_mtu = core_mtu
        self.maps = _router.RouterMaps(_router.pin_dir(prefix))
        self.log_dir = RUN_DIR / prefix  # the prefix is checked above: a plain directory name
        self.bird = Bird(self.log_dir / "router-bird", self.log_dir / "bird.ctl", self.log_dir / "router-bird.log")
        self._procs: list[subprocess.Popen[bytes]] = []
        self._httpd: dict[str, subprocess.Popen[bytes]] = {}  # server name -> its running httpd

    # The hosts, straight from the plan.
    topology = property(lambda self: self.plan.topology)
    prefix = property(lambda self: self.plan.prefix)
    clients = property(lambda self: self.plan.clients)
    router = property(lambda self: self.plan.router)
    balancers = property(lambda self: self.plan.balancers)
    servers = property(lambda self: self.plan.servers)
    vip = property(lambda self: self.plan.vip)
    vip6 = property(lambda self: self.plan.vip6)

    @classmethod
    def existing(cls, prefix: str = "rr-") -> Lab:
        """The lab currently up under prefix (e.g. from another process's `lab up`)."""
        present = set(netns.with_prefix(_check_prefix(prefix)))
        for topo in sorted(TOPOLOGIES, reverse=True):  # the largest whose namespaces all exist
            p = plan(topo, prefix)
            if set(p.namespaces) <= present:
                lab = cls(topo, prefix)
                lab.outer6 = "ipv4" if _pins_exist(lab) and lab.maps.endpoints() else "ipv6"
                targets = set(lab.targets())
                lab.direct = bool(targets) and targets <= {s.address for s in p.servers}
                lab.bgp = not targets
                return lab
        raise LookupError(f"no lab is up with prefix {prefix!r}")

    # -- lifecycle ---------------------------------------------------------------------------

    def up(self) -> Lab:
        self.down()  # leftovers of a crashed run with the same prefix
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            for ns in self.plan.namespaces:
                netns.create(ns)
            build.links(self.plan, self.core_mtu)
            build.addresses_and_routes(self.plan, self.core_mtu)
            build.sysctls(self.plan)
            netns.offloads_off(self.router.namespace, self.router.device)
            _router.attach(self.router.namespace, self.router.device, self.maps.pins)
            self.maps.configure(_router.EncapConfig(ipaddress.IPv4Network(S_NET), ipaddress.IPv4Address(self.router.address),
                                                    ipaddress.IPv6Network(S6_NET), ipaddress.IPv6Address(self.router.address6)))
            if self.outer6 == "ipv4":
                self.maps.set_endpoints({h.address6: h.address for h in (*self.balancers, *self.servers)})
            self._start_bird()
            if self.direct:
                self.route_to_servers()
            elif not self.bgp:
                self.route_to_balancers()
            for s in self.servers:
                decap.attach(s.device, s.namespace)
                self._start_httpd(s)
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        """Stop everything and delete all namespaces with the prefix. Idempotent."""
        for p in self._procs:
            if p.poll() is None:
                p.terminate()
        present = set(netns.with_prefix(self.prefix))
        for lb in self.balancers:
            if lb.namespace in present:
                # A balancer killed with SIGKILL left its nft table or XDP program behind: remove
                # them explicitly (deleting the namespace below would take them along as well).
                self.reset_balancer(lb, check=False)
        # Host namespaces first (their processes are stopped there), the bridges' namespace last.
        names = netns.with_prefix(self.prefix)
        for ns in sorted(names, key=lambda n: n == self.plan.net_ns):
            netns.remove(ns)
        for p in self._procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
        self._procs.clear()
        self._httpd.clear()
        _router.remove_pins(self.prefix)
        shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    # -- running things in the lab -----------------------------------------------------------

    def run(self, ns: str, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        return netns.run(ns, argv, **kw)

    def popen(self, ns: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
              host_bpffs: bool = False, **kw: Any) -> subprocess.Popen[bytes]:
        """Start argv in ns; the lab stops it in down() (it is in a lab namespace).

        host_bpffs=True enters only the network namespace (nsenter --net) so the process sees the
        host's bpffs (pins); `ip netns exec`, the default, remounts /sys for the namespace's
        /sys/class/net and so hides it."""
        p = netns.popen(ns, argv, env=env, host_bpffs=host_bpffs, **kw)
        self._procs.append(p)
        return p

    def balancer_env(self, lb: Host) -> dict[str, str]:
        """The environment `python -m rusty_rail` expects in a balancer namespace."""
        return {"RR_DEVICE": lb.device, "RR_TARGET_IPS": ";".join(s.address for s in self.servers)}

    def start_balancers(self, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None,
                        **kw: Any) -> list[subprocess.Popen[bytes]]:
        """Start the balancer in each balancer namespace; unless the lab routes by BGP alone, point the
        router's static routes at the balancers.

        argv defaults to `<python> -m rusty_rail`; env is added to balancer_env(lb)."""
        if not self.bgp:
            self.route_to_balancers()
        return [self.start_balancer(lb, argv, env, **kw) for lb in self.balancers]

    def start_balancer(self, lb: Host, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None,
                       **kw: Any) -> subprocess.Popen[bytes]:
        """Start one balancer (e.g. each with its own RR_CONTROL_SOCKET); the router's targets stay.

        argv defaults to `<python> -m rusty_rail`; env is added to balancer_env(lb). The process is
        the balancer itself (`ip netns exec` execs it), so its pid is the one to signal. Without
        stdout or stderr given, both go to log_dir/<lb.name>.log."""
        cmd = list(argv) if argv else [self.python, "-m", "rusty_rail"]
        env = {**self.balancer_env(lb), **(env or {})}
        if "stdout" in kw or "stderr" in kw:
            return self.popen(lb.namespace, cmd, env=env, **kw)
        with self._log(self.balancer_log(lb).name) as log:
            return self.popen(lb.namespace, cmd, env=env, stdout=log, stderr=subprocess.STDOUT, **kw)

    def balancer_log(self, lb: Host) -> Path:
        """Where start_balancer() sends a balancer's output by default (read it with events.logged)."""
        return self.log_dir / f"{lb.name}.log"

    def _log(self, name: str) -> IO[bytes]:
        """A log file in log_dir, appended to; the caller closes its copy once a child holds it."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return open(self.log_dir / name, "ab")

    def balancer_leftovers(self, lb: Host) -> dict[str, bool]:
        """What a balancer process leaves on its host if it dies without cleaning up: the AF_PACKET
        engine's nftables table (it drops GRE before the host stack) and the XDP engine's program
        (attached by netlink, it stays and keeps forwarding)."""
        from ..engines.afpacket.hostfilter import table_name

        tables = self.run(lb.namespace, ["nft", "list", "tables"], check=False).stdout.split()
        with IPRoute(netns=lb.namespace) as ipr:
            links = ipr.get_links(ifname=lb.device)
        # IFLA_XDP_ATTACHED is the kernel's own answer: none, or the mode(s) a program runs in.
        xdp = any(link.get_nested("IFLA_XDP", "IFLA_XDP_ATTACHED") for link in links)
        return {"nft": table_name(lb.device) in tables, "xdp": xdp}

    def reset_balancer(self, lb: Host, check: bool = True) -> None:
        """Remove what a dead balancer left behind (see balancer_leftovers), so its host's stack and a
        new balancer start clean. The namespace's deletion in down() would take both along too."""
        from ..engines.afpacket.hostfilter import table_name
        from ..engines.xdp import detach_all

        self.run(lb.namespace, ["nft", "delete", "table", "netdev", table_name(lb.device)], check=False)
        detach_all(lb.device, netns=lb.namespace)
        if check and any(self.balancer_leftovers(lb).values()):
            raise RuntimeError(f"{lb.name}: could not remove {self.balancer_leftovers(lb)}")

    def start_balancers_with_config(self, config_path: str, extra_args: Sequence[str] = (),
                                    **kw: Any) -> list[subprocess.Popen[bytes]]:
        """`<python> -m rusty_rail run --config config_path` in each balancer namespace (all
        namespaces share the filesystem, so one file serves every balancer)."""
        return self.start_balancers(argv=[self.python, "-m", "rusty_rail", "run", "--config", config_path,
                                          *extra_args], **kw)

    def stop_httpd(self, server: Host, timeout: float = 5.0) -> None:
        """Stop a server's HTTP server: its listening socket closes, so connections to port 80 on
        the server (through the VIP or to its own address) are refused until start_httpd()."""
        p = self._httpd.pop(server.name, None)
        if p is None:
            raise LookupError(f"{server.name} has no running httpd")
        netns.stop(p, timeout)

    def start_httpd(self, server: Host) -> None:
        """Start (again) a server's HTTP server; it accepts connections when this returns."""
        if server.name in self._httpd and self._httpd[server.name].poll() is None:
            raise RuntimeError(f"{server.name} already runs an httpd")
        self._start_httpd(server)

    def route_to_balancers(self) -> None:
        self.set_targets([lb.address for lb in self.balancers])
        self.direct = False

    def route_to_servers(self) -> None:
        """Test mode: router -> server GRE, no balancer in between."""
        self.set_targets([s.address for s in self.servers])
        self.direct = True

    def route_by_bgp(self) -> None:
        """No static routes: GRE goes only where balancers announce their VIPs."""
        self.set_targets([])
        self.direct = False

    def set_targets(self, addresses: Sequence[str], timeout: float = 10.0) -> None:
        """The router's static ECMP routes to the service prefixes S (BIRD's static protocol), to these
        hosts (their IPv4 addresses): S's IPv4 prefix through them, its IPv6 prefix through the same hosts'
        IPv6 addresses; and wait until the kernel's table has both. [] removes them. A VIP's BGP route
        (/32, /128) wins over them."""
        twins = {h.address: h.address6 for h in (self.router, *self.balancers, *self.servers)}
        addresses6 = [twins[a] for a in addresses]
        self.bird.set_static([StaticRoute(S_NET, tuple(addresses)), StaticRoute(S6_NET, tuple(addresses6))])
        deadline = time.monotonic() + timeout
        while sorted(self.targets()) != sorted(addresses) or sorted(self.targets(S6_NET)) != sorted(addresses6):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the router's routes to {S_NET} and {S6_NET} are {self.targets()} and "
                                   f"{self.targets(S6_NET)}, not {list(addresses)} and {addresses6}, {timeout}s "
                                   f"after BIRD was told (its log: {self.bird.log_path})")
            time.sleep(0.01)  # polling the kernel's table for BIRD's change, with the deadline above

    def targets(self, prefix: str = S_NET) -> list[str]:
        """The next hops of the router's kernel route to prefix (default S: the static one)."""
        return _router.next_hops(self.router.namespace, prefix)

    def vip_next_hops(self, vip: str | None = None) -> list[str]:
        """The next hops of the router's route to a VIP itself (default the IPv4 one; its /32 or /128):
        what the balancers announce (BGP)."""
        vip = vip or self.vip
        return self.targets(f"{vip}/{ipaddress.ip_address(vip).max_prefixlen}")

    def route_choice(self, client: Host, sport: int, dport: int = 80, proto: int = 6,
                     vip: str | None = None) -> str | None:
        """The address the router sends this flow's GRE to (default: to the IPv4 VIP; an IPv6 VIP's flow
        is the client's IPv6 address's): the kernel's multipath choice (router.py). For an IPv6 flow,
        the IPv6 next hop (with outer6="ipv4" the tunnel goes to the same host's IPv4 address)."""
        return self.route_choices(client, [sport], dport, proto, vip)[0]

    def route_choices(self, client: Host, sports: Sequence[int], dport: int = 80, proto: int = 6,
                      vip: str | None = None) -> list[str | None]:
        """route_choice() for many flows of one client at once."""
        vip = vip or self.vip
        src = client.address6 if ipaddress.ip_address(vip).version == 6 else client.address
        return _router.route_choices(self.router.namespace, self.plan.router_c.device, src, vip, proto, sports, dport)

    def balancer_by_address(self, address: str | None) -> Host | None:
        """The balancer with this address, of either family."""
        return next((lb for lb in self.balancers if address in (lb.address, lb.address6)), None)

    def _start_bird(self) -> None:
        """BIRD in the router's namespace: a BGP session per balancer, no routes yet."""
        peers = [Peer(lb.name, lb.address, BALANCER_AS) for lb in self.balancers]
        mtu4, mtu6 = tunnel_mtus(self.core_mtu)
        families = [Family("ipv4", S_NET, mtu4), Family("ipv6", S6_NET, mtu6 if self.outer6 == "ipv6" else mtu4)]
        self.bird.write_config(self.router.address, ROUTER_AS, peers, families)
        with self._log(self.bird.log_path.name) as log:
            self.popen(self.router.namespace, self.bird.argv(), stdin=subprocess.DEVNULL, stdout=log,
                       stderr=subprocess.STDOUT)
        self.bird.wait_ready(10.0)

    def traffic(self, n: int = 10, client: Host | None = None, path: str = "/",
                timeout: float = 5.0, upload: int = 0, vip: str | None = None) -> list[_traffic.Result]:
        """n real HTTP GETs (new connection each) from client (default the first) to vip (default the
        IPv4 VIP; lab.vip6 for IPv6); POSTs of `upload` bytes instead when upload > 0."""
        from . import traffic as _traffic  # lazily: `-m rusty_rail.lab.traffic` must not be pre-imported

        c = client or self.clients[0]
        out = self.run(c.namespace, [self.python, "-m", "rusty_rail.lab.traffic", "--host", vip or self.vip,
                                     "-n", str(n), "--path", path, "--timeout", str(timeout),
                                     "--upload", str(upload)],
                       timeout=n * timeout + 30)
        return _traffic.parse(out.stdout)

    def keepalive(self, client: Host | None = None, port: int = 80, timeout: float = 5.0,
                  vip: str | None = None) -> _keepalive.KeepAlive:
        """One real TCP connection from client (default the first) to vip:port (default the IPv4 VIP),
        kept open: requests are sent on it with .get() until .close() (see keepalive.py)."""
        from . import keepalive as _keepalive

        c = client or self.clients[0]
        return _keepalive.KeepAlive(self.popen(
            c.namespace, [self.python, "-m", "rusty_rail.lab.keepalive", "--host", vip or self.vip, "--port", str(port),
                          "--timeout", str(timeout)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE), timeout + 10)

    def pool(self, n: int, client: Host | None = None, port: int = 80, timeout: float = 5.0,
             vip: str | None = None) -> _pool.Pool:
        """n real TCP connections from client (default the first) to vip:port (default the IPv4 VIP), all
        kept open in one process: .get() sends a request on every one (see pool.py)."""
        from . import pool as _pool

        c = client or self.clients[0]
        return _pool.Pool(self.popen(
            c.namespace, [self.python, "-m", "rusty_rail.lab.pool", "--host", vip or self.vip, "--port", str(port),
                          "-n", str(n), "--timeout", str(timeout)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE), timeout + 10)

    def streams(self, n: int, *, size: int = 2_000_000, seconds: float = 4.0, uploads: int = 0,
                client: Host | None = None, timeout: float = 20.0, vip: str | None = None) -> _streams.Streams:
        """n concurrent long transfers from client (default the first) to vip (default the IPv4 VIP), each
        `size` bytes spread over about `seconds`; `uploads` of them are POSTs, the rest downloads
        (see streams.py)."""
        from . import streams as _streams

        c = client or self.clients[0]
        return _streams.Streams(self.popen(
            c.namespace, [self.python, "-m", "rusty_rail.lab.streams", "--host", vip or self.vip, "-n", str(n),
                          "--size", str(size), "--seconds", str(seconds), "--uploads", str(uploads),
                          "--timeout", str(timeout)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE))

    def status(self) -> dict[str, Any]:
        present = set(netns.with_prefix(self.prefix))
        st: dict[str, Any] = {
            "prefix": self.prefix,
            "topology": self.topology,
            "namespaces": {ns: {"exists": ns in present, "pids": netns.pids(ns) if ns in present else []}
                           for ns in self.plan.namespaces},
            "others_with_prefix": sorted(present - set(self.plan.namespaces)),
        }
        if _pins_exist(self):
            cfg = self.maps.config()
            st["router"] = {"service": str(cfg.service_net), "src": str(cfg.src), "service6": str(cfg.service6_net),
                            "src6": str(cfg.src6), "outer6": self.outer6, "static_targets": self.targets(),
                            "static_targets6": self.targets(S6_NET), "vip_next_hops": self.vip_next_hops(),
                            "vip6_next_hops": self.vip_next_hops(self.vip6), "stats": self.maps.stats()}
        st["decap"] = {s.name: decap.status(s.device, s.namespace).attached
                       for s in self.servers if s.namespace in present}
        st["logs"] = {"dir": str(self.log_dir),
                      "files": sorted(p.name for p in self.log_dir.glob("*.log")) if self.log_dir.is_dir() else []}
        return st

    def _start_httpd(self, s: Host) -> None:
        # Listen before the server process starts: connections queue in the backlog, so the
        # server is "ready" the moment up() returns, with no polling at all. Every address of both
        # families (one dual-stack socket): the VIPs (client traffic, decapsulated) and the server's
        # own (the balancers' health checks).
        sock = _pynetns.create_socket(s.namespace, socket.AF_INET6, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", 80))
            sock.listen(128)
            with self._log(f"{s.name}-httpd.log") as log:
                self._httpd[s.name] = self.popen(
                    s.namespace, [self.python, "-m", "rusty_rail.lab.httpd", "--name", s.name, "--fd", str(sock.fileno())],
                    pass_fds=[sock.fileno()], start_new_session=True,
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        finally:
            sock.close()


def _pins_exist(lab: Lab) -> bool:
    return (lab.maps.pins / "rr_encap_cfg").exists()
