"""The lab router's routing daemon: BIRD 2, with a BGP session to every balancer and ECMP to the VIPs.

    bird = Bird(config_dir, socket_path, log_path)
    bird.write_config(router_id, balancers, static=[...])     # bird.conf + the static include
    proc = popen(["bird", "-f", "-c", bird.config_path, "-s", bird.socket_path])   # in the router's netns
    bird.wait_ready(5.0)
    bird.set_static([StaticRoute("10.1.0.0/24", ("192.168.137.21", "192.168.137.22"))])   # `configure`

What BIRD does here, as a router in front of Maglev does:
- a passive BGP session per balancer (the balancers connect), carrying both families (multiprotocol
  BGP, RFC 4760: IPv6 routes over the IPv4 session, with the balancer's IPv6 address as next hop);
  imports only routes inside the service prefixes S (the VIPs, /32 and /128), exports nothing;
- `merge paths` in the kernel protocol: the balancers' equal routes to a VIP become one multipath kernel
  route, and the router's GRE encapsulator follows the kernel's choice per flow (router_encap.c);
- a static protocol for what the lab sets by hand: the direct mode (router -> servers), or a test
  pinning the traffic to chosen balancers. Static routes cover the whole prefix S (/24, /64), so a VIP
  a balancer announces (/32, /128) wins by the longest match.

Every protocol block is written per address family (Family: its channel, prefix and route MTU). BIRD is driven only through its control socket (`configure`, and `show` for people);
the truth about forwarding is read from the kernel's table (router.py), never from BIRD's text.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

BIRD = "bird"
"""Debian's bird2 package installs BIRD 2 as `bird` (the Makefile's DEB_PACKAGES installs it)."""


@dataclass(frozen=True)
class Family:
    name: str  # BIRD's channel name: ipv4 | ipv6
    service_prefix: str  # the VIPs' prefix S: what a balancer may announce, and what static routes cover
    route_mtu: int = 0  # > 0: the MTU of this family's kernel routes (room for the tunnel's header)


@dataclass(frozen=True)
class Peer:
    name: str  # the protocol's name in BIRD: "lb1"
    address: str
    asn: int


@dataclass(frozen=True)
class StaticRoute:
    prefix: str
    via: tuple[str, ...]  # next hops; several: one multipath route


class BirdError(RuntimeError):
    """BIRD answered a command with an error (its code and text), or did not answer."""


def render_config(router_id: str, local_as: int, peers: Sequence[Peer], families: Sequence[Family],
                  static_include: Path, log_path: Path, hold_time: int = 3) -> str:
    """bird.conf for the lab router."""
    ipaddress.IPv4Address(router_id)  # BIRD's router id is always a 32-bit number written as IPv4
    lines = [
        f"# Written by rusty_rail.lab.bird: the lab router, BGP to {len(peers)} balancers.",
        f"router id {router_id};",
        f'log "{log_path}" all;',
        "protocol device { }",
    ]
    for fam in families:
        net = ipaddress.ip_network(fam.service_prefix)
        mtu = f"krt_mtu = {fam.route_mtu}; " if fam.route_mtu else ""
        lines += [
            f"filter {fam.name}_vips {{ if net ~ [ {net}{{{net.prefixlen},{net.max_prefixlen}}} ] then accept; reject; }}",
            # Only what BGP and the lab's static protocol hold goes to the kernel, merged into multipath.
            f"protocol kernel kernel_{fam.name} {{",
            f"  {fam.name} {{ import none; export filter {{ if source ~ [ RTS_BGP, RTS_STATIC ] then {{ {mtu}accept; }} reject; }}; }};",
            "  merge paths on;",
            "}",
            f"protocol static static_{fam.name} {{",
            f"  {fam.name};",
            f'  include "{static_include.with_suffix(f".{fam.name}")}";',
            "}",
        ]
    lines += [
        "template bgp balancer {",
        f"  local {router_id} as {local_as};",
        # hold time 3 s (keepalive 1 s): a balancer whose host dies silently is dropped within 3 s; one
        # whose daemon dies closes its session, and is dropped at once.
        f"  hold time {hold_time};",
        # After a session error (a hold timer that expired while a loaded box starved the speaker) BIRD
        # refuses the balancer's new connections for its error wait time, 60 s at first by default: a
        # lab's balancer would stay withdrawn for a minute. 1 s, growing to 10 s if errors repeat.
        "  error wait time 1, 10;",
        "  passive on;",
        *(f"  {fam.name} {{ import filter {fam.name}_vips; export none; }};" for fam in families),
        "}",
    ]
    lines += [f"protocol bgp {p.name} from balancer {{ neighbor {p.address} as {p.asn}; }}" for p in peers]
    return "\n".join(lines) + "\n"


def render_static(routes: Sequence[StaticRoute]) -> str:
    """The static protocol's include file: one `route` a line (several `via`: a multipath route)."""
    return "".join(f"route {r.prefix} {' '.join(f'via {v}' for v in r.via)};\n" for r in routes if r.via)


class BirdSocket:
    """BIRD's control socket (what birdc speaks): a command line in, numbered reply lines out.

    Each reply line starts with a 4-digit code; `-` after it means more lines follow, a space ends the
    reply; a line starting with a space continues the previous code. 0xxx is success, 8xxx and 9xxx errors.
    """

    def __init__(self, path: Path | str, timeout: float = 5.0) -> None:
        self.path = str(path)
        self.timeout = timeout

    def command(self, line: str) -> list[str]:
        """Send one command; its reply's text lines (codes removed). BirdError on an error code."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(self.timeout)
            s.connect(self.path)
            f = s.makefile("rwb")
            self._reply(f)  # the greeting: "0001 BIRD 2.0.12 ready."
            f.write(line.encode() + b"\n")
            f.flush()
            return self._reply(f, line)

    def _reply(self, f: object, command: str = "") -> list[str]:
        text: list[str] = []
        while True:
            raw = f.readline()  # type: ignore[attr-defined]
            if not raw:
                raise BirdError(f"BIRD closed its control socket during {command!r}")
            line = raw.decode(errors="replace").rstrip("\n")
            if line.startswith(" "):
                text.append(line[1:])
                continue
            code, sep, rest = line[:4], line[4:5], line[5:]
            if not code.isdigit():
                raise BirdError(f"unexpected reply line {line!r} to {command!r}")
            text.append(rest)
            if sep == " ":
                if code[0] in "89":
                    raise BirdError(f"BIRD: {command!r}: {code} {' / '.join(text)}")
                return text


class Bird:
    """The files and control socket of one lab router's BIRD (the process is the lab's to start)."""

    def __init__(self, config_dir: Path, socket_path: Path, log_path: Path) -> None:
        self.config_dir = config_dir
        self.config_path = config_dir / "bird.conf"
        self.static_path = config_dir / "static"
        self.log_path = log_path
        self.socket_path = socket_path
        self.sock = BirdSocket(socket_path)
        self._families: tuple[Family, ...] = ()

    def argv(self) -> list[str]:
        """`bird -f` stays in the foreground: the lab owns it as a child, like any lab process."""
        return [BIRD, "-f", "-c", str(self.config_path), "-s", str(self.socket_path)]

    def write_config(self, router_id: str, local_as: int, peers: Sequence[Peer], families: Sequence[Family],
                     static: Sequence[StaticRoute] = ()) -> None:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self._families = tuple(families)
        self._write_static(static)
        self.config_path.write_text(render_config(router_id, local_as, peers, families, self.static_path,
                                                  self.log_path))

    def _write_static(self, routes: Sequence[StaticRoute]) -> None:
        for fam in self._families:
            mine = [r for r in routes if ipaddress.ip_network(r.prefix).version == (4 if fam.name == "ipv4" else 6)]
            self.static_path.with_suffix(f".{fam.name}").write_text(render_static(mine))

    def wait_ready(self, timeout: float) -> None:
        """Until the control socket answers (BIRD has read its configuration and runs)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.command("show status")
                return
            except (OSError, BirdError):
                if time.monotonic() > deadline:
                    raise BirdError(f"BIRD did not answer on {self.socket_path} within {timeout}s "
                                    f"(its log: {self.log_path})") from None
                time.sleep(0.02)  # polling a starting process's socket, with the deadline above

    def set_static(self, routes: Sequence[StaticRoute]) -> None:
        """Replace the static routes; BIRD re-reads its configuration (BGP sessions stay up)."""
        self._write_static(routes)
        self.sock.command("configure")

    def show(self, what: str) -> str:
        """A `show ...` command's text, for people (the demo, `lab status`)."""
        return "\n".join(self.sock.command(f"show {what}"))
