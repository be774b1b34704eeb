"""The AF_PACKET engine serving in the lb namespace of a VethPair, driven from the test over a pipe.

The engine runs in a forked child that joined the lb namespace for good (setns), so everything it runs,
nft included, acts on that namespace and never on the host's. The test talks to it as the control plane
does (apply, counters, explain) and otherwise only through the wire.
"""

from __future__ import annotations

import multiprocessing
import threading
from multiprocessing.connection import Connection
from typing import Any

from pyroute2 import netns

from rusty_rail.core.flow import FlowKey
from rusty_rail.dataplane import Counters, DataplaneState, EngineOptions, EngineReport, Explanation
from tests.engine_netns import VethPair

CTX = multiprocessing.get_context("fork")


def _serve(ns: str, options: EngineOptions, state: DataplaneState | None, engine_kw: dict[str, Any],
           conn: Connection) -> None:
    from rusty_rail.engines.afpacket import AfPacketEngine

    netns.setns(ns)
    engine = AfPacketEngine(options, **engine_kw)
    try:
        if state is not None:
            engine.apply(state)
        engine.start()
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    stop = threading.Event()

    def requests() -> None:
        while True:
            name, *args = conn.recv()
            if name == "stop":
                stop.set()
                return
            try:
                reply = getattr(engine, name)(*args)
            except Exception as exc:
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
            else:
                conn.send(("ok", reply))

    conn.send(("ready", None))
    threading.Thread(target=requests, daemon=True).start()
    report = engine.serve(stop)
    engine.close()
    conn.send(("stopped", report))


class EngineProcess:
    """An AfPacketEngine on `veth.lb_dev`, started (its rings open, its host filter in place)."""

    def __init__(self, veth: VethPair, state: DataplaneState | None = None, workers: int = 1, **engine_kw: Any) -> None:
        self.veth = veth
        self.conn, child = CTX.Pipe()
        options = EngineOptions(veth.lb_dev, workers=workers, connection_capacity=1 << 16)
        self.proc = CTX.Process(target=_serve, args=(veth.lb_ns, options, state, engine_kw, child))
        self.proc.start()
        what, detail = self._recv(30)
        if what != "ready":
            self.kill()
            raise RuntimeError(f"the engine did not start: {detail}")

    def _recv(self, timeout: float) -> tuple[str, Any]:
        if not self.conn.poll(timeout):
            raise AssertionError(f"the engine did not answer within {timeout}s")
        return self.conn.recv()

    def ask(self, name: str, *args: Any) -> Any:
        self.conn.send((name, *args))
        what, detail = self._recv(15)
        if what != "ok":
            raise RuntimeError(detail)
        return detail

    def counters(self) -> Counters:
        return self.ask("counters")

    def explain(self, key: FlowKey) -> Explanation:
        return self.ask("explain", key)

    def apply(self, state: DataplaneState) -> None:
        self.ask("apply", state)

    def table(self) -> str | None:
        """nft's listing of the engine's host-filter table, or None when there is none."""
        from rusty_rail.engines.afpacket import hostfilter

        done = self.veth.run(self.veth.lb_ns, "nft", "list", "table", "netdev",
                             hostfilter.table_name(self.veth.lb_dev), check=False)
        return done.stdout if done.returncode == 0 else None

    def stop(self) -> EngineReport:
        self.conn.send(("stop",))
        what, report = self._recv(20)
        assert what == "stopped", report
        self.proc.join(10)
        assert self.proc.exitcode == 0
        return report

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
