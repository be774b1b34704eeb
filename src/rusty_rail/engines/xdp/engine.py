"""`XdpEngine`: the `rusty_rail.dataplane.Engine` whose decisions run in the kernel (bpf/xdp_balancer.c).

    engine = XdpEngine(options)
    engine.apply(state)          # before start(): kept, and written at start before attaching
    engine.start()               # load, fill the maps, attach
    report = engine.serve(stop)  # next hops kept current until stop; then detached (or handed over)

This process is only the program's control plane. start(): the device's address and MAC; the program
loaded with rr_maglev sized for the state's table size and options.max_services; a handover
predecessor's pins taken over if there are any; next hops resolved once; the maps written (planner.py);
the program attached. serve(): every `neighbour_interval` seconds (every `resolving_interval` while some
backend's next hop is unknown: its new flows are dropped as NO_NEIGHBOUR meanwhile) the next hops are
looked up again, and a change is written at once.

Hitless restart (handover): hand_over(pin_root) pins rr_conns, rr_conns6 and rr_backends in the
device's directory below `pin_root` (a path to the successor's bpffs: see bpf/bpffs.py) or says why it
cannot, changing nothing; the engine keeps serving until stopped, and then leaves the program attached:
it keeps forwarding on its (now frozen) maps. The next engine started for the same device finds the
pins, loads its program with the pinned rr_conns and rr_conns6 as its own connection tables, takes the
backend indices the entries name from the pinned rr_backends (planner.adopt), fills its other maps, and
only then replaces the running program atomically (XDP_FLAGS_REPLACE): the device is never without a program and every
established flow keeps its backend. It then removes the pins. Whatever program runs on the device at
start (a predecessor whose pins it cannot use or see, a killed run's leftover) is replaced the same
way, never detached first; a plain stop detaches.

Someone else's program on the device (a firewall's) is never replaced: hook.py decides, before anything
is loaded, between a plain attach and libxdp's dispatcher (dispatcher.py), or refuses in one line; the
attach itself replaces only a program hook.only_ours accepts. Through the dispatcher there is no hitless
restart (hand_over refuses it): libxdp replaces a component only by building a new dispatcher.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from ipaddress import IPv4Address, IPv6Address

from rusty_rail.bpf import bpffs, libbpf
from rusty_rail.core.address import as_address
from rusty_rail.core.balancer import explain_choice
from rusty_rail.core.conntrack import Timeouts
from rusty_rail.core.constants import DEFAULT_MTU, DEFAULT_PIN_ROOT, RR_HASH_SEED
from rusty_rail.core.flow import FlowKey
from rusty_rail.core.service import Service, ServiceMatcher
from rusty_rail.dataplane import (Counters, DataplaneState, EngineError, EngineKind, EngineOptions, EngineReport,
                                  Explanation)
from rusty_rail.engines.device import TxRefusals
from rusty_rail.engines.neighbours import DeviceError, NeighbourResolver
from rusty_rail.engines.xdp import counters, dispatcher
from rusty_rail.engines.xdp import maps as m
from rusty_rail.engines.xdp.hook import HookKind, HookPlan, HookRefused, only_ours, plan_hook
from rusty_rail.engines.xdp.mode import AttachChoice, attach_mode
from rusty_rail.engines.xdp.planner import Desired
from rusty_rail.engines.xdp.program import XdpProgram, default_object_path, running_mode

__all__ = ["XdpEngine", "handover_dir"]

log = logging.getLogger("rusty_rail.xdp")


def handover_dir(device: str, root: str = DEFAULT_PIN_ROOT) -> str:
    """The handover pin directory of `device` in this thread's network namespace: root/<netns inode>-<device>.
    bpffs is one per host while device names repeat across namespaces, hence the namespace's inode."""
    return os.path.join(root, f"{os.stat('/proc/thread-self/ns/net').st_ino}-{device}")


class _Predecessor:
    """The pinned maps a handover left (fds, closed by close())."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.conns_fd: int | None = libbpf.obj_get(os.path.join(directory, m.MAP_CONNS))
        self.conns6_fd: int | None = None
        """A predecessor that pinned no rr_conns6 (an IPv4-only release) leaves None: a new one."""
        self.backends_fd: int | None = None
        try:
            self.backends_fd = libbpf.obj_get(os.path.join(directory, m.MAP_BACKENDS))
            if os.path.exists(os.path.join(directory, m.MAP_CONNS6)):
                self.conns6_fd = libbpf.obj_get(os.path.join(directory, m.MAP_CONNS6))
        except BaseException:
            self.close()
            raise

    @classmethod
    def find(cls, directory: str) -> _Predecessor | None:
        if not os.path.exists(os.path.join(directory, m.MAP_CONNS)):
            return None
        try:
            return cls(directory)
        except OSError as exc:
            log.warning("handover pins in %s are unusable (%s): starting afresh", directory, exc)
            return None

    def remove_pins(self) -> None:
        for name in (m.MAP_CONNS, m.MAP_CONNS6, m.MAP_BACKENDS):
            try:
                os.unlink(os.path.join(self.directory, name))
            except FileNotFoundError:
                pass
        for d in (self.directory, os.path.dirname(self.directory)):
            try:
                os.rmdir(d)  # only when empty: another device's handover may be pending
            except OSError:
                break

    def close(self) -> None:
        for fd in (self.conns_fd, self.conns6_fd, self.backends_fd):
            if fd is not None:
                os.close(fd)
        self.conns_fd = self.conns6_fd = self.backends_fd = None


class XdpEngine:
    """Runs the XDP data plane on options.device, in the caller's network namespace."""

    kind = EngineKind.XDP

    def __init__(self, options: EngineOptions, *, object_path: str | os.PathLike | None = None,
                 neighbour_interval: float = 1.0, resolving_interval: float = 0.1,
                 timeouts: Timeouts = Timeouts(), attach: AttachChoice | None = None,
                 hook: HookPlan | None = None) -> None:
        """`attach`, `hook`: the attach mode and the way onto the device's hook decided already
        (create_engine's, for its log line); start() decides them where not given (mode.attach_mode,
        hook.plan_hook) and checks the hook again in any case."""
        self.options = options
        self.attach = attach
        self.hook = hook
        self.component: dispatcher.XdpComponent | None = None
        """Set when attached through libxdp's dispatcher (then the program's own instance stays unattached)."""
        self.object_path = object_path
        self.neighbour_interval = neighbour_interval
        self.resolving_interval = resolving_interval
        self.timeouts = timeouts
        self.program: XdpProgram | None = None
        self.replaced_program_id = 0
        """A program an earlier (killed) run left on the device, which start() replaced."""
        self.took_over_program_id = 0
        """A handover predecessor's program start() replaced atomically (0: none)."""
        self.adopted_connections = False
        """Whether this run's connection table is its predecessor's."""
        self.handed_over = False
        """Set by hand_over(): the coming stop leaves the program attached with its maps pinned."""
        self._pinned: str | None = None  # where hand_over() pinned
        self._state = DataplaneState()
        self._matcher: ServiceMatcher[Service] = ServiceMatcher({})
        self._macs: dict[int, bytes] = {}
        self._mtus: dict[int, int] = {}
        """Backends whose route sets an MTU (docs/WIRE.md section 8b)."""
        self._address: IPv4Address | None = None
        self._address6: IPv6Address | None = None
        self._mtu = DEFAULT_MTU
        self._mac = b""
        self._lock = threading.Lock()  # apply() comes from the control plane's threads
        self._resolver: NeighbourResolver | None = None
        self._refusals: TxRefusals | None = None
        self._handover_dir = ""
        self._ready = False

    # -- the Engine protocol ----------------------------------------------------------------------

    def apply(self, state: DataplaneState) -> None:
        with self._lock:
            if len(state.services) > self.options.max_services:
                raise ValueError(f"{len(state.services)} services: more than max_services = "
                                 f"{self.options.max_services}")
            if len({b for s in state.services for b in s.backends}) > m.MAX_BACKENDS:
                raise ValueError(f"more than {m.MAX_BACKENDS} backends")
            if self._resolver is not None:  # started: a backend needs an address of its family to send from
                try:
                    self._resolver.info.check_backends({int(b) for s in state.services for b in s.backends},
                                                       self.options.device)
                except DeviceError as exc:
                    raise ValueError(str(exc)) from None
            if self.program is not None:
                self.program.sync(self._desired(state))  # ValueError: the maps stay as they were
            self._state, self._matcher = state, ServiceMatcher(state.by_key())

    def start(self) -> None:
        try:
            self._resolver = NeighbourResolver(self.options.device)
        except DeviceError as exc:
            raise EngineError(f"XDP engine: {exc}") from None
        resolver = self._resolver
        self._address, self._address6, self._mac, self._mtu = resolver.address, resolver.address6, resolver.mac, resolver.mtu
        try:
            resolver.info.check_backends({int(b) for s in self._state.services for b in s.backends}, self.options.device)
        except DeviceError as exc:
            self.close()
            raise EngineError(f"XDP engine: {exc}") from None
        try:
            self._refusals = TxRefusals(self.options.device)  # before the first XDP_TX: only ours count
        except OSError as exc:
            self.close()
            raise EngineError(f"XDP engine: the counters of {self.options.device} cannot be read: {exc}") from None
        # Of this namespace (the thread's now): where a predecessor left pins, and where ours would go.
        self._handover_dir = handover_dir(self.options.device, self.options.pin_root)
        choice = self.attach or attach_mode(self.options)
        try:  # before loading anything: someone else's program is never replaced
            ifindex = socket.if_nametoindex(self.options.device)
            self.hook = plan_hook(self.options, ifindex, choice.mode)
        except HookRefused:
            self.close()
            raise
        except OSError as exc:
            self.close()
            raise EngineError(f"XDP engine on {self.options.device}: {exc}") from None
        before = _Predecessor.find(self._handover_dir) if self.hook.kind == HookKind.PLAIN else None
        try:
            self.program = self._load(before)
            if before is not None and self.adopted_connections and before.backends_fd is not None:
                self.program.adopt(before.backends_fd)
            self._refresh()  # known next hops forward from the first packet
            with self._lock:
                self.program.sync(self._desired(self._state))
            if choice.warning:
                log.warning("%s", choice.warning, extra={"event": "xdp_mode_loses_frames"})
            if self.hook.kind == HookKind.DISPATCHER:
                mode = choice.mode
                self.component = dispatcher.XdpComponent.attach_object(
                    str(self.object_path or default_object_path()), ifindex, mode, reuse_maps=self.program.fds)
            else:
                mode = self._attach(choice.mode, before)
        except HookRefused:
            self.close()
            raise
        except (OSError, ValueError) as exc:
            self.close()
            raise EngineError(f"XDP engine on {self.options.device}: {exc}") from None
        finally:
            if before is not None:
                before.close()  # the pinned rr_conns lives on as ours
        self._ready = True
        log.info("XDP engine attached (%s; %s) on %s: %d services, %d backends",
                 choice.why if mode == choice.mode else f"{mode} mode, the running program's", self.hook.why,
                 self.options.device, len(self._state.services), len(self.program.image.backend_index),
                 extra={"event": "xdp_attached", "xdp_mode": "generic" if mode == "skb" else mode,
                        "xdp_hook": self.hook.kind.value})

    @property
    def ready(self) -> bool:
        return self._ready

    def counters(self, *, walk: bool = True) -> Counters:
        with self._lock:  # the program stays open meanwhile (_let_go takes the lock too)
            if self.program is None:
                return Counters(backends={(s.key, b): (0, 0) for s in self._state.services for b in s.backends})
            refused = self._refusals.read() if self._refusals is not None else 0
            return counters.read(self.program, self._ready, refused=refused, walk=walk)

    def explain(self, key: FlowKey) -> Explanation:
        packed = key.packed
        with self._lock:
            service = self._matcher.match(packed)
            remembered = self._remembered(packed)
        backend, reason = explain_choice(service, packed, remembered, RR_HASH_SEED)
        return Explanation(backend, reason)

    def serve(self, stop: threading.Event) -> EngineReport:
        if self.program is None:
            raise EngineError("XDP engine: serve() before start()")
        try:
            while not stop.is_set():
                unresolved = self._refresh()
                stop.wait(self.resolving_interval if unresolved else self.neighbour_interval)
            report = self.counters()
        finally:
            self._ready = False
            self._let_go()
        return EngineReport(EngineKind.XDP, self.handed_over, report)

    def hand_over(self, pin_root: str) -> bool:
        """Pin rr_conns, rr_conns6 and rr_backends for a successor below `pin_root` (this process's path
        to the bpffs the successor reads: bpf/bpffs.py; prepared, i.e. mounted where missing and
        permitted) and make the coming stop leave the program attached.
        On failure nothing changes (EngineError says why): the program stays attached, serving as before,
        and a stop still detaches."""
        with self._lock:
            program = self.program
            if program is None or program.attached_ifindex is None:
                raise EngineError("the XDP program is not attached: nothing to hand over")
            if self._pinned is not None:
                raise EngineError(f"already handed over (pins in {self._pinned})")
            if self.component is not None:
                raise EngineError(
                    "no hitless restart through libxdp's dispatcher: libxdp replaces a component only by building "
                    "a new dispatcher, never in place; stop and start instead (established flows are re-hashed), "
                    "or run with xdp_dispatcher = false on a device no one else's XDP program uses")
            try:  # already done by a restarter asking; for SIGUSR2, this process's own view
                bpffs.prepare(pin_root)
            except bpffs.PinRootError as exc:
                raise EngineError(f"the pin root {pin_root} cannot be used: {exc}") from None
            directory = os.path.join(pin_root, os.path.basename(self._handover_dir))
            try:
                program.pin(directory)
            except OSError as exc:
                raise EngineError(f"pinning in {exc.filename or directory} failed: {exc.strerror or exc}") from None
            self._pinned, self.handed_over = directory, True
        log.info("XDP engine on %s: connection table pinned in %s for a successor", self.options.device, directory)
        return True

    def cancel_handover(self) -> None:
        with self._lock:
            directory, self._pinned, self.handed_over = self._pinned, None, False
            if directory is not None and self.program is not None:
                self.program.unpin(directory)
        if directory is not None:
            log.warning("XDP engine on %s: handover undone, pins removed; serving on", self.options.device)

    def close(self) -> None:
        self._ready = False
        if self.program is not None:
            self._let_go()
        if self._resolver is not None:
            self._resolver.close()
            self._resolver = None
        if self._refusals is not None:
            self._refusals.close()
            self._refusals = None

    # -- the parts --------------------------------------------------------------------------------

    def _desired(self, state: DataplaneState) -> Desired:
        return Desired(state, self._address, self._mac, dict(self._macs), timeouts=self.timeouts,
                       local_address6=self._address6, mtu=self._mtu, mtus=dict(self._mtus))

    def _load(self, before: _Predecessor | None) -> XdpProgram:
        def load(reuse: int | None, reuse6: int | None = None) -> XdpProgram:
            return XdpProgram(self.object_path, table_size=self._state.table_size,
                              conn_capacity=self.options.connection_capacity,
                              max_services=self.options.max_services, reuse_conns_fd=reuse, reuse_conns6_fd=reuse6)

        if before is not None:
            try:
                program = load(before.conns_fd, before.conns6_fd)
            except ValueError as exc:  # e.g. another connection capacity: flows are re-hashed
                log.warning("not reusing the predecessor's connection table: %s", exc)
            else:
                self.adopted_connections = True
                return program
        return load(None)

    def _attach(self, mode: str, before: _Predecessor | None) -> str:
        """Attach, replacing whatever runs on the device atomically (XdpProgram.attach), in `mode` or in
        the running program's, the only one it can be replaced in without a gap. Returns the mode."""
        assert self.program is not None
        device = self.options.device
        running = running_mode(device)
        if running is not None and running != mode:
            log.warning("the XDP program on %s runs in %s mode: attaching in that mode too, to replace it "
                        "without a gap (%s mode takes effect after a stop, which detaches)", device, running, mode)
            mode = running
        self.program.attach(device, mode=mode, may_replace=only_ours(device))
        replaced = self.program.replaced_program_id
        if before is not None:
            before.remove_pins()
            self.took_over_program_id = replaced
            table = "its" if self.adopted_connections else "a new"
            if replaced:
                log.info("took over from program %d on %s without a gap: %s connection table", replaced, device, table)
            else:
                log.warning("handover pins on %s, but no program ran there: attached with %s connection table",
                            device, table)
        elif replaced:
            self.replaced_program_id = replaced
            log.warning("replaced XDP program %d on %s without a gap (an earlier run's, without pins here)",
                        replaced, device)
        return mode

    def _refresh(self) -> int:
        """One neighbour pass, its changes written; returns how many backends are still unresolved."""
        assert self._resolver is not None
        with self._lock:
            backends = sorted({int(b) for s in self._state.services for b in s.backends})
        changes = _Changes()
        self._resolver.refresh(backends, changes)
        with self._lock:
            for backend, (mac, mtu) in changes.items():
                if mac is None:
                    self._macs.pop(backend, None)
                else:
                    self._macs[backend] = mac
                if mtu:
                    self._mtus[backend] = mtu
                else:
                    self._mtus.pop(backend, None)
            if changes and self.program is not None:
                self.program.sync(self._desired(self._state))
            return sum(1 for b in backends if b not in self._macs)

    def _remembered(self, packed: bytes) -> int | None:
        """The backend (as int) the flow's connection entry names, if the program would honour it."""
        program = self.program
        if program is None:
            return None
        entry = program.connection(packed)
        if entry is None:
            return None
        backend = program.image.backends.get(entry.backend_index)
        if backend is None or backend.address != int(entry.backend):
            return None
        timeout = {6: self.timeouts.tcp, 17: self.timeouts.udp}.get(packed[-4], self.timeouts.other)  # the protocol
        if time.monotonic_ns() - entry.last_seen_ns >= timeout * 1e9:
            return None
        return backend.address

    def _let_go(self) -> None:
        """Detach (or, handed over, leave attached) and release the program; once."""
        with self._lock:
            program, self.program = self.program, None
            if program is None:
                return
            attached = program.attached_ifindex is not None or self.component is not None
            component, self.component = self.component, None
            try:
                if component is not None:
                    component.detach()  # libxdp rebuilds the dispatcher around the others' programs
            finally:
                program.close(detach=not self.handed_over)
        if self.handed_over:
            log.info("XDP engine handed over on %s: its program stays attached, connection table pinned in %s",
                     self.options.device, self._pinned)
        elif attached:
            log.info("XDP engine stopped on %s: detached", self.options.device)


class _Changes(dict[int, "tuple[bytes | None, int | None]"]):
    """NeighbourResolver's sink: the next hops (and route MTUs) that changed in one pass."""

    def set_neighbour(self, backend: int, mac: bytes | None, mtu: int | None = None) -> None:
        self[backend] = (mac, mtu)
        log.info("next hop of %s: %s%s", as_address(backend), mac.hex(":") if mac else "unresolved",
                 f", route MTU {mtu}" if mtu else "")
