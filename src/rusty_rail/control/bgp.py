"""Announcing the VIPs over BGP: which routes this balancer should announce, and keeping the speaker
(speaker.py, ExaBGP) announcing exactly those.

    announcer = Announcer(spec, routes=plane.route_view, ready=lambda: engine.ready, ...)
    announcer.start()          # the speaker starts; routes follow the plane from then on (kick() on changes)
    announcer.set_drained(True)          # ctl drain-balancer: every VIP withdrawn, the data plane unchanged
    announcer.set_stopping()             # a planned stop: withdrawn before the data plane lets go
    announcer.close(handover=False)

The rule (wanted_routes), for each VIP of a service with `announce = true`, of either family:
- announced (a /32 with next hop self, the session's local address; or a /128 with the device's global
  IPv6 address as next hop, over the same IPv4 session: multiprotocol BGP, RFC 4760; the service's MED
  and communities) while the engine is ready, the
  balancer is not drained or stopping, and some service on that VIP has a healthy backend (a drained
  backend counts: its established flows still need the route); until the engine is ready nothing
  changes (a speaker taken over in a hitless restart keeps its routes: the old program still forwards);
- withdrawn otherwise, and when no service names the VIP any more; an IPv6 VIP also while the device
  has no global IPv6 address to be its next hop.
Every announce and withdraw is one JSON log line (`event` bgp_announce / bgp_withdraw) with the reason.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv6Address
from typing import Any

from rusty_rail.control.bgp_config import BgpSpec, host_prefix
from rusty_rail.control.config import RouteSpec
from rusty_rail.control.speaker import Speaker
from rusty_rail.core.address import Address

log = logging.getLogger("rusty_rail.bgp")

RECONCILE_EVERY_S = 0.5
"""A periodic check besides the kicks: the engine's readiness has no callback."""
HOLD_FOR_HANDOVER_S = 60.0
"""How long a speaker held for a hitless restart waits for the next daemon before withdrawing."""


@dataclass(frozen=True)
class ServiceRoute:
    """What the rule needs of one service (ControlPlane.route_view())."""

    name: str
    vip: Address | None
    route: RouteSpec
    healthy: int
    """Backends passing their checks (or unchecked), drained ones included."""


@dataclass(frozen=True)
class Route:
    prefix: str
    med: int | None = None
    communities: tuple[tuple[int, int], ...] = ()
    next_hop: str = "self"
    """"self": the session's local address (IPv4); an IPv6 route's is an IPv6 address of the balancer."""

    def announce(self) -> str:
        """ExaBGP's API command (its `announce route` grammar)."""
        words = [f"announce route {self.prefix} next-hop {self.next_hop}"]
        if self.med is not None:
            words.append(f"med {self.med}")
        if self.communities:
            words.append("community [" + " ".join(f"{a}:{b}" for a, b in self.communities) + "]")
        return " ".join(words)

    def withdraw(self) -> str:
        return f"withdraw route {self.prefix} next-hop {self.next_hop}"

    @classmethod
    def held(cls, command: str) -> Route:
        """The route of an announce command the speaker holds (its prefix and next hop: enough to
        withdraw it)."""
        words = command.split()
        hop = words[4] if len(words) > 4 and words[3] == "next-hop" else "self"
        return cls(words[2], next_hop=hop)


def wanted_routes(services: Iterable[ServiceRoute], *, ready: bool, drained: bool, stopping: bool,
                  next_hop6: IPv6Address | None = None) -> dict[str, tuple[Route | None, str]]:
    """prefix -> (the route to announce, or None to withdraw it; why), for every VIP with announce = true.
    next_hop6: the IPv6 VIPs' next hop (the device's global IPv6 address; None: it has none)."""
    by_vip: dict[Address, list[ServiceRoute]] = {}
    for s in services:
        if s.vip is not None and s.route.announce:
            by_vip.setdefault(s.vip, []).append(s)
    out: dict[str, tuple[Route | None, str]] = {}
    for vip, group in sorted(by_vip.items(), key=lambda item: (item[0].version, int(item[0]))):
        prefix = host_prefix(vip)
        serving = [s for s in group if s.healthy > 0]
        if stopping:
            out[prefix] = (None, "stopping: withdrawn before the data plane lets go")
        elif drained:
            out[prefix] = (None, "balancer drained (ctl drain-balancer)")
        elif not ready:
            out[prefix] = (None, "engine not forwarding yet")
        elif not serving:
            out[prefix] = (None, f"{', '.join(s.name for s in group)}: no healthy backend")
        elif vip.version == 6 and next_hop6 is None:
            out[prefix] = (None, "no IPv6 next hop: the device has no global IPv6 address")
        else:
            spec = group[0].route  # services on one VIP agree on MED and communities (config checks it)
            hop = str(next_hop6) if vip.version == 6 else "self"
            out[prefix] = (Route(prefix, spec.med, spec.communities, hop),
                           "; ".join(f"{s.name}: {s.healthy} healthy backend{'s' if s.healthy != 1 else ''}"
                                     for s in serving))
    return out


@dataclass
class PeerState:
    address: str
    asn: int
    state: str = "connecting"
    """connecting (no session yet), connected (TCP up, OPEN exchanged), up (established), down."""
    since: float = 0.0
    """time.time() of the last change."""
    reason: str = ""


class Announcer:
    def __init__(self, spec: BgpSpec, routes: Callable[[], list[ServiceRoute]], ready: Callable[[], bool],
                 make_speaker: Callable[[Announcer], Speaker], clock: Callable[[], float] = time.time,
                 next_hop6: IPv6Address | None = None) -> None:
        """routes(): the services' route view; ready(): whether the engine forwards; make_speaker(self):
        the speaker, wired to on_connect/on_event (tests give a fake); next_hop6: the IPv6 VIPs' next hop."""
        self.spec = spec
        self.next_hop6 = next_hop6
        self.routes, self.ready = routes, ready
        self.clock = clock
        self.drained = False
        self.stopping = False
        self.frozen = False
        """Set when a handover begins: the routes stay as they are for the next daemon."""
        self.announced: dict[str, str] = {}  # prefix -> the announce command the speaker holds
        self.reasons: dict[str, str] = {}  # prefix -> why it is (not) announced, as last decided
        self.peers = {str(p.address): PeerState(str(p.address), p.asn) for p in spec.peers}
        self._lock = threading.RLock()
        self._kick = threading.Event()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self.speaker = make_speaker(self)

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        self.speaker.start()
        self._thread = threading.Thread(target=self._loop, name="rr-bgp", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._closing.is_set():
            self._kick.wait(RECONCILE_EVERY_S)
            self._kick.clear()
            if not self._closing.is_set():
                self.reconcile()

    def kick(self) -> None:
        """Something the rule reads changed (health, backends, reload): reconcile soon."""
        self._kick.set()

    def set_drained(self, drained: bool) -> None:
        with self._lock:
            self.drained = drained
            self.reconcile()

    def set_stopping(self) -> None:
        with self._lock:
            self.stopping = True
            self.reconcile()

    def freeze(self) -> None:
        """No more changes (safe from a signal handler): a handover is starting, and the engine stops
        calling itself ready while its program keeps forwarding for the next daemon."""
        self.frozen = True

    def unfreeze(self) -> None:
        """A handover that was started did not happen: follow the engine and the services again."""
        self.frozen = False
        self.kick()

    def hold_for_handover(self) -> bool:
        """The routes stay announced while the next daemon takes over (the XDP program keeps forwarding)."""
        self.freeze()
        return self.speaker.hold(HOLD_FOR_HANDOVER_S)

    def close(self, handover: bool = False) -> None:
        self._closing.set()
        self._kick.set()
        if self._thread is not None:
            self._thread.join(5)
        self.speaker.close(shutdown=not handover)

    # -- the speaker's side -----------------------------------------------------------------------

    def on_connect(self, hello: Mapping[str, Any]) -> None:
        """A speaker (new, or held by the previous daemon) is linked: what it holds is the starting point."""
        with self._lock:
            self.announced = {}
            for command in hello.get("routes", []):
                words = command.split()
                if len(words) >= 3:
                    self.announced[words[2]] = command
            for event in hello.get("peers", {}).values():
                self.on_event(event)
            self.reconcile()

    def on_event(self, event: Mapping[str, Any]) -> None:
        if event.get("type") != "state":
            return
        neighbor = event.get("neighbor", {})
        address = neighbor.get("address", {}).get("peer")
        with self._lock:
            peer = self.peers.get(address)
            state = str(neighbor.get("state", ""))
            if peer is None or not state or state == peer.state:
                return
            peer.state, peer.since, peer.reason = state, self.clock(), str(neighbor.get("reason", ""))
        level = logging.INFO if state in ("up", "connected") else logging.WARNING
        log.log(level, "bgp session with %s (AS %d): %s%s", address, peer.asn, state,
                f" ({peer.reason})" if peer.reason else "",
                extra={"event": "bgp_session", "peer": address, "state": state, "reason": peer.reason})

    # -- the rule, applied ------------------------------------------------------------------------

    def reconcile(self) -> None:
        """Make the speaker announce exactly the wanted routes. Without a speaker linked nothing is
        sent; on_connect() reconciles again."""
        with self._lock:
            if self.frozen:
                return
            ready = self.ready()
            wanted = wanted_routes(self.routes(), ready=ready, drained=self.drained, stopping=self.stopping,
                                   next_hop6=self.next_hop6)
            self.reasons = {prefix: reason for prefix, (_, reason) in wanted.items()}
            if not ready and not (self.drained or self.stopping):
                # Until the engine forwards, the speaker keeps what it holds: nothing at a fresh start; after a
                # handover, the previous daemon's routes, which its program still serves meanwhile.
                return
            gone = {p: "no service announces it any more" for p in self.announced if p not in wanted}
            for prefix, reason in gone.items():
                self._withdraw(prefix, reason)
            for prefix, (route, reason) in wanted.items():
                have = self.announced.get(prefix)
                if route is not None and route.announce() != have:
                    if self.speaker.send(route.announce()):
                        self.announced[prefix] = route.announce()
                        log.info("bgp announce %s: %s", prefix, reason, extra={
                            "event": "bgp_announce", "prefix": prefix, "reason": reason, "med": route.med,
                            "communities": [f"{a}:{b}" for a, b in route.communities]})
                elif route is None and have is not None:
                    self._withdraw(prefix, reason)

    def _withdraw(self, prefix: str, reason: str) -> None:
        if self.speaker.send(Route.held(self.announced[prefix]).withdraw()):
            del self.announced[prefix]
            log.info("bgp withdraw %s: %s", prefix, reason,
                     extra={"event": "bgp_withdraw", "prefix": prefix, "reason": reason})

    # -- inspection -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """ctl status's and the metrics' view: the routes and why, each peer's session."""
        with self._lock:
            now = self.clock()
            announced = sorted(self.announced)
            return {
                "local_as": self.spec.local_as,
                "router_id": str(self.speaker.router_id),
                "next_hop6": str(self.next_hop6) if self.next_hop6 else None,
                "drained": self.drained,
                "stopping": self.stopping,
                "speaker": {"connected": self.speaker.connected.is_set(), "pid": self.speaker.exabgp_pid,
                            "restarts": self.speaker.restarts},
                "routes": [{"prefix": p, "announced": p in self.announced, "reason": r}
                           for p, r in sorted(self.reasons.items())],
                "peers": [{"address": p.address, "as": p.asn, "state": p.state,
                           "uptime_s": round(now - p.since, 1) if p.state == "up" else None,
                           "since": p.since or None, "reason": p.reason,
                           "prefixes": announced if p.state == "up" else []}
                          for p in self.peers.values()],
            }
