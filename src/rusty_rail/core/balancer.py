"""The balancer's decision: an Ethernet frame in, a verdict out (docs/WIRE.md is the contract).

Sans-I/O and clock-free: the engine passes `now` and the next-hop MACs it learnt from the kernel, and
acts on the verdict. The codecs in ipv4.py, ipv6.py and gre.py describe the same formats for tests and
tools; decide() reads the bytes by offset instead, because it runs once per packet and dataclasses would
cost more than the rest of the work together. IPv4 in, IPv4 out is the path kept shortest: the other
families branch off it where they differ.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address, IPv6Address
from types import MappingProxyType

from rusty_rail.core.address import Address, AddressLike, address_int, as_address, is_ipv6
from rusty_rail.core.checksum import ones_complement_sum
from rusty_rail.core.conntrack import ConnectionTable
from rusty_rail.core.constants import DEFAULT_MTU, RR_HASH_SEED
from rusty_rail.core.flow import FlowKey, inner6_flow_key, inner_flow_key
from rusty_rail.core.flowhash import flow_hash
from rusty_rail.core.icmp import (answers_too_big, answers_too_big6, echo_reply, echo_reply6, echo_request6_at,
                                  echo_request_at, too_big, too_big6)
from rusty_rail.core.options import IcmpLimit, TokenBucket, hashed_key, quic_server_id
from rusty_rail.core.service import Pool, Service, ServiceKey, ServiceMatcher
from rusty_rail.core.verdict import PASS, Drop, DropReason, Forward, Reply, Verdict

_GRE = 47
_OUT_TTL = 64
_OUT_DF = 0x4000
_GRE_IN_V4 = b"\x00\x00\x08\x00"  # the usual GRE header: no flags, version 0, protocol IPv4
_GRE_IN_V6 = b"\x00\x00\x86\xdd"
_GRE_OUT = (_GRE_IN_V4, _GRE_IN_V6)  # by inner family: 0 IPv4, 1 IPv6
_IP_FIXED = struct.Struct("!BBHHHBBH")
_IP6_FIXED = struct.Struct("!IHBB")
_DROPS = {reason: Drop(reason) for reason in DropReason}


class Balancer:
    """One balancer's data-plane state: its services (tables built by the control plane), the
    connection table, next-hop MACs. A packet that matches no service is dropped as NO_SERVICE, so the
    balancer is never an open relay; the environment form is one catch-all service (core/service.py).

    `local_address` (IPv4) and `local_address6` are the outer sources toward backends of each family
    (None: the device has none, and no backend of that family may be served); `mtu` is the device's,
    which a backend's route may lower (set_neighbour; docs/WIRE.md section 8b: too big); `icmp_limit`
    bounds the "too big" answers. Backends are ints of either family (core/address.py).
    """

    def __init__(
        self,
        local_address: AddressLike | None,
        local_mac: bytes,
        services: Iterable[Service] = (),
        connections: ConnectionTable | None = None,
        hash_seed: int = RR_HASH_SEED,
        *,
        local_address6: AddressLike | None = None,
        mtu: int = DEFAULT_MTU,
        icmp_limit: IcmpLimit = IcmpLimit(),
    ) -> None:
        if len(local_mac) != 6:
            raise ValueError("local_mac must be 6 bytes")
        self.local_address = None if local_address is None else IPv4Address(as_address(local_address))
        self.local_address6 = None if local_address6 is None else IPv6Address(as_address(local_address6))
        self.local_mac = bytes(local_mac)
        self.mtu = mtu
        self.icmp_limit = icmp_limit
        self._icmp_bucket = TokenBucket(icmp_limit)
        self._route_mtus: dict[int, int] = {}
        """Backends whose route sets an MTU (set_neighbour): the path toward them, when below `mtu`."""
        self.min_mtu = mtu
        """The lowest MTU toward any backend whose next hop is known (the AF_PACKET array path's bound)."""
        self.hash_seed = hash_seed
        self.connections = connections if connections is not None else ConnectionTable()
        self._macs: dict[int, bytes] = {}
        self._prefixes: dict[int, tuple[bytes, bytes, int, int]] = {}
        """IPv4 backends whose next hop is known: (Ethernet header, addresses, checksum sum of fixed fields,
        the MTU toward it)."""
        self._prefixes6: dict[int, tuple[bytes, bytes, int]] = {}
        """IPv6 backends whose next hop is known: (Ethernet header, addresses, the MTU toward it)."""
        self.forwarded = 0
        self.forwarded6 = 0
        """Of `forwarded`, those whose inner packet is IPv6 (docs/WIRE.md section 9)."""
        self.passed = 0
        self.echo_replies = 0
        """Echo requests to a service with answer_ping answered (docs/WIRE.md section 11.3)."""
        self.too_big_replies = 0
        """ICMP "fragmentation needed" / ICMPv6 "packet too big" answers sent (section 8b)."""
        self.quic_routed = 0
        """QUIC packets forwarded by the server ID of their connection ID (section 11.4)."""
        self.drops = [0] * (max(DropReason) + 1)
        self._pools: dict[ServiceKey, Pool] = {}
        self._matcher: ServiceMatcher[Pool] = ServiceMatcher({})
        self._all_backends: frozenset[int] = frozenset()
        self.set_services(services)

    # -- control ----------------------------------------------------------------------------------

    def set_services(self, services: Iterable[Service]) -> None:
        """Serve exactly `services`. A service whose table did not change keeps its pool (and figures);
        flows of backends a service still lists keep their backend. ValueError, and nothing changes,
        when a backend's family has no local address to send from.

        Safe while another thread runs decide(): the new pools and matcher are built completely, then
        swapped in with plain attribute assignments (atomic under the GIL), so decide() sees the old
        services or the new ones, never half of them."""
        pools: dict[ServiceKey, Pool] = {}
        for service in services:
            old = self._pools.get(service.key)
            pools[service.key] = old if old is not None and old.service == service else Pool.of(service, old)
        backends = frozenset().union(*(p.backend_set for p in pools.values())) if pools else frozenset()
        self.check_families(backends)
        matcher = ServiceMatcher(pools)
        self._pools, self._matcher, self._all_backends = pools, matcher, backends

    def check_families(self, backends: Iterable[int]) -> None:
        """ValueError naming a backend whose family has no local address (docs/WIRE.md section 8)."""
        for backend in sorted(backends):
            if is_ipv6(backend) and self.local_address6 is None:
                raise ValueError(f"backend {as_address(backend)} is IPv6 but the device has no global IPv6 address")
            if not is_ipv6(backend) and self.local_address is None:
                raise ValueError(f"backend {as_address(backend)} is IPv4 but the device has no IPv4 address")

    @property
    def services(self) -> dict[ServiceKey, Pool]:
        return dict(self._pools)

    @property
    def backends(self) -> frozenset[int]:
        """Every backend of every service (the engines resolve their next hops)."""
        return self._all_backends

    @property
    def neighbours(self) -> Mapping[int, bytes]:
        """Backend -> the MAC of its next hop, for those known now: a read-only live view, for engines
        that build output frames in bulk (docs/WIRE.md section 8)."""
        return MappingProxyType(self._macs)

    def pool_for(self, key: bytes) -> Pool | None:
        """The pool of the service a flow key belongs to (the rule: core/service.py)."""
        return self._matcher.match(key)

    def set_neighbour(self, backend: AddressLike, mac: bytes | None, mtu: int | None = None) -> None:
        """The Ethernet address of `backend`'s next hop, or None while it is unknown; `mtu`: the MTU its
        route sets (None: none; the device's `mtu` applies, and caps a larger one)."""
        backend = address_int(backend)
        if mtu:
            self._route_mtus[backend] = mtu
        else:
            self._route_mtus.pop(backend, None)
        if mac is None:
            self._macs.pop(backend, None)
            self._prefixes.pop(backend, None)
            self._prefixes6.pop(backend, None)
        else:
            if len(mac) != 6:
                raise ValueError("mac must be 6 bytes")
            self._macs[backend] = bytes(mac)
            path_mtu = self.backend_mtu(backend)
            if is_ipv6(backend):
                if self.local_address6 is not None:
                    self._prefixes6[backend] = (bytes(mac) + self.local_mac + b"\x86\xdd",
                                                self.local_address6.packed + backend.to_bytes(16, "big"), path_mtu)
            elif self.local_address is not None:
                self._prefixes[backend] = (*self._output_prefix(backend, bytes(mac)), path_mtu)
        self.min_mtu = min((self.backend_mtu(b) for b in self._macs), default=self.mtu)

    def backend_mtu(self, backend: AddressLike) -> int:
        """The largest IP packet the device may send toward `backend`: the device's MTU, or its route's when
        lower (docs/WIRE.md section 8b)."""
        route = self._route_mtus.get(address_int(backend))
        return self.mtu if route is None else min(route, self.mtu)

    @property
    def route_mtus(self) -> Mapping[int, int]:
        """Backend -> the MTU its route sets, for those whose route sets one (read-only view)."""
        return MappingProxyType(self._route_mtus)

    def neighbour(self, backend: AddressLike) -> bytes | None:
        return self._macs.get(address_int(backend))

    def _output_prefix(self, backend: int, mac: bytes) -> tuple[bytes, bytes, int]:
        """Per IPv4 backend: the Ethernet header, the addresses, and the checksum sum of the fixed IP fields."""
        assert self.local_address is not None
        src = self.local_address.packed
        dst = backend.to_bytes(4, "big")
        fixed = ones_complement_sum(_IP_FIXED.pack(0, 0, 0, 0, _OUT_DF, _OUT_TTL, _GRE, 0) + src + dst)
        return mac + self.local_mac + b"\x08\x00", src + dst, fixed

    # -- data plane -------------------------------------------------------------------------------

    def _drop(self, reason: DropReason) -> Drop:
        self.drops[reason] += 1
        return _DROPS[reason]

    def count_drop(self, reason: DropReason) -> None:
        """Count a drop the engine made after the decision (e.g. TX_FAILED)."""
        self.drops[reason] += 1

    def decide(self, frame: bytes, now: float) -> Verdict:
        """The verdict for one Ethernet frame (docs/WIRE.md sections 1-8). Hot path: hand-written byte
        offsets, IPv4 checks inline; a method call costs as much as several of them."""
        n = len(frame)
        # -- 1, 2: outer IPv4 or IPv6; `gre_at` and `end` bound the GRE packet.
        if n >= 34 and frame[12] == 0x08 and frame[13] == 0x00 and frame[14] >> 4 == 4 and frame[23] == _GRE:
            ihl = frame[14] & 0x0F
            if ihl != 5:
                return self._drop(DropReason.OUTER_BAD_IHL if ihl < 5 else DropReason.OUTER_OPTIONS)
            total = (frame[16] << 8) | frame[17]
            if total < 20 or total > n - 14:
                return self._drop(DropReason.OUTER_BAD_LENGTH)
            if ones_complement_sum(frame[14:34]) != 0xFFFF:
                return self._drop(DropReason.OUTER_BAD_CHECKSUM)
            if ((frame[20] << 8) | frame[21]) & 0x3FFF:
                return self._drop(DropReason.OUTER_FRAGMENT)
            gre_at = 34
            end = 14 + total
        elif n >= 54 and frame[12] == 0x86 and frame[13] == 0xDD and frame[14] >> 4 == 6 and frame[20] == _GRE:
            end = 54 + ((frame[18] << 8) | frame[19])
            if end > n:
                return self._drop(DropReason.OUTER_BAD_LENGTH)
            gre_at = 54
        else:
            self.passed += 1
            return PASS

        # -- 3: GRE. The usual header (no flags) is one comparison; anything else is checked in full.
        if end - gre_at < 4:
            return self._drop(DropReason.GRE_TRUNCATED)
        gre = frame[gre_at : gre_at + 4]
        if gre == _GRE_IN_V4:
            six = False
            inner = frame[gre_at + 4 : end]
        elif gre == _GRE_IN_V6:
            six = True
            inner = frame[gre_at + 4 : end]
        else:
            flags = (gre[0] << 8) | gre[1]
            if flags & 0x0007:
                return self._drop(DropReason.GRE_VERSION)
            if flags & 0x4C00:
                return self._drop(DropReason.GRE_RESERVED)
            gre_len = 4 + 4 * (((flags >> 15) & 1) + ((flags >> 13) & 1) + ((flags >> 12) & 1))
            if end - gre_at < gre_len:
                return self._drop(DropReason.GRE_TRUNCATED)
            if flags & 0x8000 and ones_complement_sum(frame[gre_at:end]) != 0xFFFF:
                return self._drop(DropReason.GRE_CHECKSUM)
            if gre[2] == 0x08 and gre[3] == 0x00:
                six = False
            elif gre[2] == 0x86 and gre[3] == 0xDD:
                six = True
            else:
                return self._drop(DropReason.GRE_PROTOCOL)
            inner = frame[gre_at + gre_len : end]

        # -- 4, 5: the inner packet (trimmed to its own length), its key and its TOS / traffic class.
        size = len(inner)
        if not six:
            if size < 20:
                return self._drop(DropReason.INNER_TRUNCATED)
            if inner[0] >> 4 != 4:
                return self._drop(DropReason.INNER_VERSION)
            inner_ihl = (inner[0] & 0x0F) * 4
            if inner_ihl < 20:
                return self._drop(DropReason.INNER_BAD_IHL)
            inner_total = (inner[2] << 8) | inner[3]
            if inner_total < inner_ihl or inner_total > size:
                return self._drop(DropReason.INNER_BAD_LENGTH)
            if inner_total < size:
                inner = inner[:inner_total]
            key = inner_flow_key(inner, inner_ihl)
            if key is None:
                return self._drop(DropReason.INNER_TRUNCATED)
            tos = inner[1]
        else:
            if size < 40:
                return self._drop(DropReason.INNER_TRUNCATED)
            if inner[0] >> 4 != 6:
                return self._drop(DropReason.INNER_VERSION)
            inner_total = 40 + ((inner[4] << 8) | inner[5])
            if inner_total > size:
                return self._drop(DropReason.INNER_BAD_LENGTH)
            if inner_total < size:
                inner = inner[:inner_total]
            found = inner6_flow_key(inner)
            if found.__class__ is not bytes:
                return self._drop(found)  # type: ignore[arg-type]
            key = found  # type: ignore[assignment]
            tos = ((inner[0] & 0x0F) << 4) | (inner[1] >> 4)

        # -- 7: the flow's service and backend; 11: its options.
        pool = self._matcher.match(key)
        if pool is None:
            return self._drop(DropReason.NO_SERVICE)
        proto = key[-4]
        if (proto == 1 or proto == 58) and pool.answer_ping:  # an echo request: answered here (11.3)
            if six:
                if echo_request6_at(inner):
                    self.echo_replies += 1
                    return self._reply(frame, echo_reply6(inner), six)
            elif echo_request_at(inner, inner_ihl):
                self.echo_replies += 1
                return self._reply(frame, echo_reply(inner, inner_ihl), six)
        if pool.plain:
            backend = self.connections.lookup(key, now)
            if backend is None or backend not in pool.backend_set:
                slots = pool.slot_backend
                if not slots:
                    return self._drop(DropReason.NO_BACKEND)
                backend = slots[flow_hash(key, self.hash_seed) % len(slots)]
                self.connections.insert(key, backend, now)
        else:
            chosen = self._choose(pool, key, inner, 40 if six else inner_ihl, six, now)
            if chosen is None:
                return self._drop(DropReason.NO_BACKEND)
            backend = chosen

        # -- 8: the output, in the backend's family.
        prefix = self._prefixes.get(backend)
        if prefix is None:
            prefix6 = self._prefixes6.get(backend)
            if prefix6 is None:
                self.drops[DropReason.NO_NEIGHBOUR] += 1
                return Drop(DropReason.NO_NEIGHBOUR, backend)
            return self._forward6(frame, prefix6, key, tos, inner, inner_total, six, pool, backend, now)
        out_total = 24 + inner_total
        ethernet, addresses, fixed_sum, mtu = prefix
        if out_total > mtu:
            return self._too_big(frame, inner, six, 0 if six else inner_ihl, mtu - 24, now)
        s = fixed_sum + ((0x45 << 8) | tos) + out_total
        s = (s & 0xFFFF) + (s >> 16)
        s = (s & 0xFFFF) + (s >> 16)
        header = _IP_FIXED.pack(0x45, tos, out_total, 0, _OUT_DF, _OUT_TTL, _GRE, ~s & 0xFFFF)
        return self._forwarded(ethernet + header + addresses + _GRE_OUT[six] + inner, six, pool, backend, inner_total)

    def _forward6(self, frame: bytes, prefix: tuple[bytes, bytes, int], key: bytes, tc: int, inner: bytes,
                  inner_total: int, six: bool, pool: Pool, backend: int, now: float) -> Verdict:
        """docs/WIRE.md section 8 toward an IPv6 backend: version 6, the inner TOS / traffic class, the
        flow label from the flow hash (RFC 6438), payload length, next header 47, hop limit 64."""
        ethernet, addresses, mtu = prefix
        if 44 + inner_total > mtu:
            return self._too_big(frame, inner, six, 0 if six else (inner[0] & 0x0F) * 4, mtu - 44, now)
        first = 0x60000000 | tc << 20 | (flow_hash(key, self.hash_seed) & 0xFFFFF)
        header = _IP6_FIXED.pack(first, 4 + inner_total, _GRE, _OUT_TTL)
        return self._forwarded(ethernet + header + addresses + _GRE_OUT[six] + inner, six, pool, backend, inner_total)

    def _forwarded(self, out: bytes, six: bool, pool: Pool, backend: int, inner_total: int) -> Forward:
        """The frame out, counted (forwarded; the inner family; the backend's packets and inner bytes)."""
        self.forwarded += 1
        if six:
            self.forwarded6 += 1
        pool.packets[backend] += 1
        pool.bytes[backend] += inner_total
        return Forward(out, backend)

    def _choose(self, pool: Pool, key: bytes, inner: bytes, l4: int, six: bool, now: float) -> int | None:
        """docs/WIRE.md section 7 under the service's options (section 11): a QUIC short header's server
        ID, then the connection table (unless the service has none), then the slot of the service's hash
        fields. `l4`: where the transport header starts in `inner` (40 for IPv6: only a UDP header right
        after the fixed header is read for QUIC). None: no backend (NO_BACKEND)."""
        options = pool.service.options
        if options.quic and key[-4] == 17 and (inner[6] == 17 if six else not ((inner[6] << 8) | inner[7]) & 0x3FFF):
            backend = pool.server_backend.get(quic_server_id(inner[l4 + 8 : l4 + 12]))  # type: ignore[arg-type]
            if backend is not None:
                self.quic_routed += 1
                return backend
        table = options.connection_table
        if table:
            backend = self.connections.lookup(key, now)
            if backend is not None and backend in pool.backend_set:
                return backend
        slots = pool.slot_backend
        if not slots:
            return None
        backend = slots[flow_hash(hashed_key(key, options.hash), self.hash_seed) % len(slots)]
        if table:
            self.connections.insert(key, backend, now)
        return backend

    def _reply(self, frame: bytes, packet: bytes, six: bool) -> Reply:
        """An answer of the balancer's own (section 11): plain IP back to the frame's sender (the router)."""
        return Reply(frame[6:12] + self.local_mac + (b"\x86\xdd" if six else b"\x08\x00") + packet)

    def _too_big(self, frame: bytes, inner: bytes, six: bool, ihl: int, usable: int, now: float) -> Verdict:
        """docs/WIRE.md section 8b: the output toward the backend would be longer than the MTU toward it.
        Answered with ICMP "fragmentation needed" / ICMPv6 "packet too big" carrying `usable` (that MTU
        less the encapsulation) when the packet may be answered and the token bucket allows; else dropped."""
        if not (answers_too_big6(inner) if six else answers_too_big(inner, ihl)):
            return self._drop(DropReason.OUTPUT_TOO_BIG)
        if not self._icmp_bucket.take(now):
            return self._drop(DropReason.ICMP_RATE_LIMITED)
        self.too_big_replies += 1
        return self._reply(frame, too_big6(inner, usable) if six else too_big(inner, usable), six)

    # -- inspection -------------------------------------------------------------------------------

    def explain(self, key: FlowKey, now: float) -> tuple[Address | None, str]:
        """Where a flow goes and why: ('connection entry' or 'table slot N'), without changing state."""
        packed = key.packed
        pool = self.pool_for(packed)
        return explain_choice(None if pool is None else pool.service, packed, self.connections.peek(packed, now),
                              self.hash_seed)

    def counters(self) -> dict[str, int]:
        out = {"forwarded": self.forwarded, "forwarded_ipv6": self.forwarded6, "passed": self.passed,
               "icmp_echo_replies": self.echo_replies, "icmp_too_big": self.too_big_replies,
               "quic_routed": self.quic_routed}
        for reason in DropReason:
            out[f"drop_{reason.name.lower()}"] = self.drops[reason]
        out["connections"] = len(self.connections)
        out["connection_evictions"] = self.connections.evictions
        return out

    def backend_figures(self) -> dict[tuple[ServiceKey, Address], tuple[int, int]]:
        """(packets, inner bytes) forwarded per (service, backend) listed now."""
        return {(key, as_address(address)): (packets, pool.bytes.get(address, 0))
                for key, pool in self._pools.items() for address, packets in dict(pool.packets).items()}


def explain_choice(service: Service | None, key: bytes, remembered: int | None,
                   hash_seed: int = RR_HASH_SEED) -> tuple[Address | None, str]:
    """docs/WIRE.md section 7 as an answer for people: the backend a flow with this key goes to and why,
    given its service (None: none matched) and the backend its connection entry names (None: no entry).
    The one statement of the rule for `explain`, whatever engine holds the connection table."""
    if service is None:
        return None, "no service matches"
    backends = service.table.backends
    options = service.options
    if remembered is not None and options.connection_table and any(int(b) == remembered for b in backends):
        return as_address(remembered), "connection entry"
    slots = service.table.slots
    if not len(slots):
        return None, "no backends"
    slot = flow_hash(hashed_key(key, options.hash), hash_seed) % len(slots)
    return backends[int(slots[slot])], f"table slot {slot}"
