"""The hitless restart's exchange over the control socket, both sides: `rusty-rail restart` asks, the
running daemon answers.

    restarter (cli.py restart)                          running daemon (socket_server.py)
    bpffs.prepare(pin_root): a bpffs it can write,
    mounted where missing; else it stops here
    {"cmd": "handover", "pin_root": P,
     "pin_root_id": [st_dev, st_ino]}        ------->   path = bpffs.reach(P, id, the asker's pid)
                                                        engine.hand_over(path): pinned, or why not
                                             <-------   {"ok": true, "result": {"handed_over": true,
                                                         "why": "", "health": [...]}}
                                                        or {"ok": false, "error": why}: it serves on
                                                        delivered: stop, the program left attached
    waits for the daemon's exit, then runs the new
    daemon with the health it was given

Why a request and an answer: a daemon that cannot pin must say so to the one who asked, and keep
serving; a signal has no answer. Why the daemon pins through the asker's view of the pin root
(reached by /proc/<pid>/root when their mount namespaces differ): every `ip netns exec` has its own
mount namespace, where /sys/fs/bpf is not the host's bpffs, and every bpffs mounted there is a new
instance (bpf/bpffs.py). The asker has checked, or mounted, the bpffs it will read, and names the
directory by device and inode; the daemon pins exactly there. The asker's pid comes from the kernel
(SO_PEERCRED), never from the request. The answer carries the health checks' state, so backends found
down stay down in the new daemon instead of starting up.

SIGUSR2 (`systemctl kill -s USR2`) still hands over without asking: the daemon prepares its own view of
its pin root and pins there, which a successor sees only when both share that bpffs (the host's
/sys/fs/bpf, as under systemd); health is not carried that way, and a daemon that cannot pin logs why
and serves on.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from rusty_rail.bpf import bpffs
from rusty_rail.control.config import Config, HealthSpec, HealthType
from rusty_rail.control.plane import ControlError
from rusty_rail.core.address import Address, as_address
from rusty_rail.core.service import ServiceKey
from rusty_rail.dataplane import Engine, EngineError

__all__ = ["DaemonHandover", "HandoverAnswer", "HandoverRefused", "HandoverRequest", "HealthRecord", "ask",
           "carried_for", "peer_pid"]

log = logging.getLogger("rusty_rail.control")

HealthKey = tuple[ServiceKey, Address]


class HandoverRefused(Exception):
    """The running daemon did not hand over (or could not be asked); the message says why, as is."""


def _get(obj: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = obj.get(name)
    if isinstance(value, bool) and kind is not bool:
        raise ValueError(f'"{name}" is {value!r}, not a {kind}')
    if not isinstance(value, kind):
        raise ValueError(f'"{name}" is missing or not of the right type ({value!r})')
    return value


@dataclass(frozen=True)
class HealthRecord:
    """One backend's health-check state, carried from a daemon to its successor."""

    service: ServiceKey
    backend: Address
    check: HealthSpec
    """The check this state was reached with: a successor with another check starts afresh."""
    up: bool
    reason: str
    successes: int
    """Passes in a row (HealthState.successes), so a backend coming back keeps its progress."""
    failures: int

    def to_json(self) -> dict[str, Any]:
        c = self.check
        return {"service": str(self.service), "backend": str(self.backend), "up": self.up, "reason": self.reason,
                "successes": self.successes, "failures": self.failures,
                "check": {"type": c.type.value, "port": c.port, "path": c.path, "interval": c.interval,
                          "timeout": c.timeout, "rise": c.rise, "fall": c.fall}}

    @classmethod
    def from_json(cls, obj: Any) -> HealthRecord:
        """The inverse of to_json(); ValueError naming what is wrong."""
        if not isinstance(obj, dict):
            raise ValueError(f"a health record is an object, not {obj!r}")
        c = _get(obj, "check", dict)
        check = HealthSpec(HealthType(_get(c, "type", str)), _get(c, "port", int), _get(c, "path", str),
                           float(_get(c, "interval", (int, float))), float(_get(c, "timeout", (int, float))),
                           _get(c, "rise", int), _get(c, "fall", int))
        return cls(ServiceKey.parse(_get(obj, "service", str)), as_address(_get(obj, "backend", str)), check,
                   _get(obj, "up", bool), _get(obj, "reason", str), _get(obj, "successes", int),
                   _get(obj, "failures", int))


@dataclass(frozen=True)
class HandoverRequest:
    pin_root: str
    """The pin root as the asker sees it (its RR_PIN_ROOT), prepared by it."""
    pin_root_id: tuple[int, int]
    """(st_dev, st_ino) of that directory: the daemon pins where it finds exactly this one."""

    @classmethod
    def of(cls, pin_root: str) -> HandoverRequest:
        return cls(pin_root, bpffs.identity(pin_root))

    def to_json(self) -> dict[str, Any]:
        return {"cmd": "handover", "pin_root": self.pin_root, "pin_root_id": list(self.pin_root_id)}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> HandoverRequest:
        pin_root = _get(obj, "pin_root", str)
        ident = _get(obj, "pin_root_id", list)
        if not os.path.isabs(pin_root) or len(ident) != 2 or not all(type(n) is int for n in ident):
            raise ValueError('"pin_root" is an absolute path and "pin_root_id" two integers')
        return cls(pin_root, (ident[0], ident[1]))


@dataclass(frozen=True)
class HandoverAnswer:
    handed_over: bool
    """False: the engine had nothing to leave running (AF_PACKET); the daemon stops plainly."""
    why: str
    health: tuple[HealthRecord, ...]

    def to_json(self) -> dict[str, Any]:
        return {"handed_over": self.handed_over, "why": self.why, "health": [r.to_json() for r in self.health]}

    @classmethod
    def from_json(cls, obj: Any) -> HandoverAnswer:
        if not isinstance(obj, dict):
            raise ValueError(f"a handover answer is an object, not {obj!r}")
        return cls(_get(obj, "handed_over", bool), _get(obj, "why", str),
                   tuple(HealthRecord.from_json(r) for r in _get(obj, "health", list)))


def carried_for(records: Iterable[HealthRecord], config: Config) -> dict[HealthKey, HealthRecord]:
    """The records that still apply under `config`: the backend is in its service, checked the same way."""
    checks = {(s.key, b.address): s.health for s in config.services for b in s.backends}
    return {(r.service, r.backend): r for r in records
            if r.check.type != HealthType.NONE and checks.get((r.service, r.backend)) == r.check}


def peer_pid(sock: socket.socket) -> int:
    """The pid of the process at the other end of a unix socket (SO_PEERCRED: the kernel says who)."""
    pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid


class RouteHold(Protocol):
    """What a handover needs of the BGP announcer (control/bgp.py)."""

    def freeze(self) -> None: ...

    def unfreeze(self) -> None: ...

    def hold_for_handover(self) -> bool: ...


class DaemonHandover:
    """The running daemon's side. One handover at a time; the daemon stops only once its asker has the
    answer (settle), and a handover whose answer went nowhere is undone."""

    def __init__(self, engine: Engine, health: Callable[[], list[HealthRecord]], stop: Callable[[], None],
                 pin_root: str, routes: RouteHold | None = None) -> None:
        """`routes`: the BGP announcer, if any: frozen while a handover is under way (the engine stops
        calling itself ready while its program forwards on), held for the successor once it is done,
        released again if the handover is undone."""
        self.engine = engine
        self.health = health
        self.stop = stop
        self.pin_root = pin_root
        """This daemon's own pin root, for SIGUSR2."""
        self.routes = routes
        self._lock = threading.Lock()
        self._pending = False
        self._done = False
        self.handed_over = False
        """True once the program was left for a successor (and the routes with it)."""
        self._handed_over_pending = False

    def _freeze(self) -> None:
        if self.routes is not None:
            self.routes.freeze()

    def _release(self) -> None:
        if self.routes is not None:
            self.routes.unfreeze()

    def _hold(self, handed_over: bool) -> None:
        """The handover is done: the routes stay announced for the successor where the program stays."""
        self.handed_over = handed_over
        if self.routes is not None:
            if handed_over:
                self.routes.hold_for_handover()
            else:
                self.routes.unfreeze()

    def prepare(self, request: HandoverRequest, asker: int | None) -> HandoverAnswer:
        """Pin for the asker (pid `asker`), or raise ControlError with the reason; nothing changes then."""
        with self._lock:
            if self._pending or self._done:
                raise ControlError("a handover is already under way")
            if asker is None:
                raise ControlError("the asking process is unknown")
            if not _same_netns(asker):
                raise ControlError(f"process {asker} runs in another network namespace than this daemon: "
                                   f"its successor would not find the pins; the daemon serves on")
            health = tuple(self.health())  # first: once pinned, nothing may fail before the answer
            self._freeze()
            try:
                path = bpffs.reach(request.pin_root, request.pin_root_id, asker)
                handed_over = self.engine.hand_over(path)
            except (bpffs.PinRootError, EngineError) as exc:
                self._release()
                log.error("handover to process %d refused, serving on: %s", asker, exc,
                          extra={"event": "handover_refused", "asker": asker})
                raise ControlError(f"cannot hand over: {exc}; the daemon serves on") from None
            self._pending = True
            self._handed_over_pending = handed_over
            why = "" if handed_over else f"the {self.engine.kind.value} engine has nothing to leave running"
            return HandoverAnswer(handed_over, why, health)

    def settle(self, delivered: bool) -> None:
        """After prepare()'s answer was written (`delivered`) or could not be: stop, or undo."""
        with self._lock:
            if not self._pending:
                return
            self._pending = False
            if not delivered:
                self.engine.cancel_handover()
                self._release()
                log.warning("the handover's answer could not be delivered: undone, serving on")
                return
            self._done = True
            self._hold(self._handed_over_pending)
        log.info("handing over: stopping", extra={"event": "handing_over"})
        self.stop()

    def from_signal(self) -> None:
        """SIGUSR2 (from a thread, never the handler): pin in this daemon's own view of its pin root
        (mounting bpffs there where missing), then stop; if it cannot, log why and serve on."""
        with self._lock:
            if self._pending or self._done:
                return
            self._freeze()
            try:
                handed_over = self.engine.hand_over(self.pin_root)
            except EngineError as exc:
                self._release()
                log.error("SIGUSR2: cannot hand over (RR_PIN_ROOT %s): %s; serving on", self.pin_root, exc,
                          extra={"event": "handover_refused"})
                return
            self._done = True
            self._hold(handed_over)
        if not handed_over:
            log.warning("SIGUSR2: the %s engine has nothing to leave running: a plain stop", self.engine.kind.value)
        self.stop()


def ask(socket_path: str, pin_root: str, timeout: float = 30.0) -> tuple[int, HandoverAnswer]:
    """The restarter's side: ask the daemon serving `socket_path` to hand over to this process, whose
    view of `pin_root` is prepared. Returns (its pid, its answer); HandoverRefused says why not."""
    request = HandoverRequest.of(pin_root)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(socket_path)
        except OSError as exc:
            raise HandoverRefused(f"no daemon answers at {socket_path}: {exc.strerror or exc}") from None
        pid = peer_pid(s)
        if not _same_netns(pid):
            raise HandoverRefused(f"the daemon at {socket_path} (pid {pid}) runs in another network namespace: "
                                  f"restart it from its own (ip netns exec NAME rusty-rail restart ...)")
        try:
            s.sendall(json.dumps(request.to_json()).encode() + b"\n")
            line = s.makefile("rb").readline()
        except OSError as exc:
            raise HandoverRefused(f"the daemon (pid {pid}) did not answer: {exc.strerror or exc}") from None
    try:
        answer = json.loads(line) if line else None
        if not isinstance(answer, dict):
            raise ValueError("no answer")
        if not answer.get("ok"):
            raise HandoverRefused(f"the daemon (pid {pid}) did not hand over: {answer.get('error')}")
        return pid, HandoverAnswer.from_json(answer.get("result"))
    except ValueError as exc:
        raise HandoverRefused(f"the daemon (pid {pid}) answered nonsense ({exc}): an older version? "
                              f"It serves on") from None


def _same_netns(pid: int) -> bool:
    """False only when `pid` is known to be in another network namespace than this process."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return True  # not ours to see (no ptrace access): the other side checks too
