"""`rusty-rail ctl`: talk to a running daemon over its control socket.

    rusty-rail ctl [--socket PATH] status [--json]
    rusty-rail ctl add|remove|drain|undrain VIP:PORT BACKEND
    rusty-rail ctl weight VIP:PORT BACKEND N
    rusty-rail ctl explain CLIENT:PORT VIP:PORT [tcp|udp]
    rusty-rail ctl reload
    rusty-rail ctl drain-balancer | undrain-balancer     (with [bgp]: withdraw every VIP / announce again)

VIP:PORT is TCP unless written VIP:PORT/udp; a bare VIP is the every-port service; `*` is the
catch-all service of the environment form. Errors are one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from typing import Any

from rusty_rail.control.config import DEFAULT_CONTROL_SOCKET

DEFAULT_SOCKET = DEFAULT_CONTROL_SOCKET


class CtlError(Exception):
    """Anything that stops a ctl command; the message is printed as is."""


class ControlClient:
    """One connection to the daemon; request() may be called many times (top does)."""

    def __init__(self, path: str = DEFAULT_SOCKET, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._file: Any = None

    def _connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            hint = " (is `rusty-rail run --config FILE` running? ctl needs root)"
            raise CtlError(f"cannot reach the daemon at {self.path}: {exc.strerror or exc}{hint}") from None
        self._sock, self._file = sock, sock.makefile("rwb")

    def request(self, request: dict[str, Any]) -> Any:
        if self._sock is None:
            self._connect()
        try:
            self._file.write(json.dumps(request).encode() + b"\n")
            self._file.flush()
            line = self._file.readline()
        except OSError as exc:
            self.close()
            raise CtlError(f"the daemon at {self.path} did not answer: {exc}") from None
        if not line:
            self.close()
            raise CtlError(f"the daemon at {self.path} closed the connection")
        answer = json.loads(line)
        if not answer.get("ok"):
            raise CtlError(str(answer.get("error", "failed")))
        return answer.get("result")

    def close(self) -> None:
        if self._sock is not None:
            self._file.close()
            self._sock.close()
        self._sock = self._file = None

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _human(n: int | float | None) -> str:
    """ipvsadm --stats style: 1234 -> 1234, 12345678 -> 12.3M."""
    if n is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e4)):
        if n >= size:
            return f"{n / size:.1f}{unit}" if unit != "K" else f"{n / 1e3:.0f}K"
    return str(int(n))


def format_status(status: dict[str, Any]) -> str:
    """An ipvsadm -L --stats-like table: a service line, then one `->` line per backend."""
    lines = [
        f"rusty-rail on {status['device']} ({status['engine']}), table size {status['table_size']}",
        f"{'Prot LocalAddress:Port':<30} {'Check':<16} {'Packets':>9} {'Bytes':>9}",
        f"{'  -> RemoteAddress':<30} {'Weight':>6} {'State':<9} {'Health':<9} {'Flows':>7} {'Packets':>9} {'Bytes':>9}",
    ]
    for svc in status["services"]:
        if svc["vip"] is None:
            head = "ANY  * (every VIP)"
        else:
            vip = f"[{svc['vip']}]" if ":" in svc["vip"] else svc["vip"]
            head = f"{svc['protocol'].upper():<4} {vip}:{svc['port'] or '*'}"
        health = svc["health"]
        check = health["type"] if health["type"] == "none" else f"{health['type']}:{health['port'] or svc['port']}"
        lines.append(f"{head:<30} {check:<16} {_human(svc['packets']):>9} {_human(svc['bytes']):>9}")
        for b in svc["backends"]:
            lines.append(
                f"{'  -> ' + b['address']:<30} {b['weight']:>6} {b['state']:<9} {b['health']:<9} "
                f"{_human(b['flows']):>7} {_human(b['packets']):>9} {_human(b['bytes']):>9}"
            )
    c = status["counters"]
    lines.append(
        f"forwarded {c['forwarded']}  passed {c['passed']}  connections {c['connections']}  "
        f"evictions {c['connection_evictions']}  table rebuilds {c['table_rebuilds']}"
    )
    families = c.get("by_family", {})
    lines.append("  ".join(f"{family}: forwarded {f['forwarded']} connections {f['connections']}"
                           for family, f in sorted(families.items())))
    drops = {k: v for k, v in c["drops"].items() if v}
    lines.append("drops " + ("  ".join(f"{k} {v}" for k, v in sorted(drops.items())) if drops else "none"))
    control = status.get("control", {})
    if control.get("last_reload_error"):
        lines.append(f"last reload failed: {control['last_reload_error']}")
    if status.get("bgp"):
        lines += format_bgp(status["bgp"])
    return "\n".join(lines)


def format_bgp(bgp: dict[str, Any]) -> list[str]:
    """The BGP part of ctl status: each peer's session, then each VIP and why it is (not) announced."""
    state = "drained" if bgp["drained"] else "stopping" if bgp["stopping"] else "serving"
    speaker = bgp["speaker"]
    lines = [f"bgp: AS {bgp['local_as']}, router id {bgp['router_id']}, {state}; speaker "
             + (f"pid {speaker['pid']}" if speaker["connected"] else "not connected")
             + (f", restarted {speaker['restarts']}x" if speaker["restarts"] else ""),
             f"  {'Peer':<18} {'AS':>10} {'State':<11} {'Up for':>8}  Prefixes"]
    for p in bgp["peers"]:
        uptime = "-" if p["uptime_s"] is None else f"{p['uptime_s']:.0f}s"
        reason = f" ({p['reason']})" if p["reason"] and p["state"] != "up" else ""
        lines.append(f"  {p['address']:<18} {p['as']:>10} {p['state']:<11} {uptime:>8}  "
                     f"{', '.join(p['prefixes']) or '-'}{reason}")
    for r in bgp["routes"]:
        lines.append(f"  {'announced' if r['announced'] else 'withdrawn':<9} {r['prefix']:<18} {r['reason']}")
    return lines


def format_explain(result: dict[str, Any]) -> str:
    if result["backend"] is None:
        return f"{result['flow']}: dropped ({result['reason']})"
    return f"{result['flow']}: service {result['service']}, backend {result['backend']} ({result['reason']})"


def add_socket_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", default=DEFAULT_SOCKET, help=f"the daemon's control socket (default {DEFAULT_SOCKET})")


def explain_request(client: str, service: str, protocol: str | None) -> dict[str, Any]:
    return {"cmd": "explain", "client": client, "service": service, "protocol": protocol or "tcp"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rusty-rail ctl", description="Control a running rusty-rail daemon.")
    add_socket_argument(parser)
    sub = parser.add_subparsers(dest="cmd", required=True)
    status = sub.add_parser("status", help="services, backends, health, weights, drain state, flows, packets")
    status.add_argument("--json", action="store_true", help="the daemon's answer as JSON")
    for name, what in (("add", "add a backend"), ("remove", "remove a backend (its flows are re-hashed)"),
                       ("drain", "no new flows; established flows stay"), ("undrain", "take new flows again")):
        p = sub.add_parser(name, help=what)
        p.add_argument("service", metavar="VIP:PORT")
        p.add_argument("backend", metavar="BACKEND")
        if name == "add":
            p.add_argument("--weight", type=int, default=1)
    weight = sub.add_parser("weight", help="set a backend's weight (rebuilds the table)")
    weight.add_argument("service", metavar="VIP:PORT")
    weight.add_argument("backend", metavar="BACKEND")
    weight.add_argument("weight", metavar="N", type=int)
    explain = sub.add_parser("explain", help="which backend a flow goes to, and why")
    explain.add_argument("client", metavar="CLIENT:PORT")
    explain.add_argument("service", metavar="VIP:PORT")
    explain.add_argument("protocol", nargs="?", choices=("tcp", "udp"), default="tcp")
    sub.add_parser("reload", help="reload the configuration file (as SIGHUP)")
    sub.add_parser("drain-balancer", help="withdraw every VIP from the routers (BGP); forwarding goes on")
    sub.add_parser("undrain-balancer", help="announce the VIPs again")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.cmd == "status":
        request: dict[str, Any] = {"cmd": "status"}
    elif args.cmd == "explain":
        request = explain_request(args.client, args.service, args.protocol)
    elif args.cmd in ("reload", "drain-balancer", "undrain-balancer"):
        request = {"cmd": args.cmd}
    else:
        request = {"cmd": args.cmd, "service": args.service, "backend": args.backend}
        if args.cmd in ("add", "weight"):
            request["weight"] = args.weight
    try:
        with ControlClient(args.socket) as client:
            result = client.request(request)
    except CtlError as exc:
        print(f"rusty-rail ctl: {exc}", file=sys.stderr)
        return 1
    if args.cmd == "status":
        print(json.dumps(result, indent=2) if args.json else format_status(result))
    elif args.cmd == "explain":
        print(format_explain(result))
    elif args.cmd == "reload":
        for note in result.get("notes", []):
            print(f"note: {note}")
        print("reloaded")
    elif args.cmd in ("drain-balancer", "undrain-balancer"):
        print("\n".join(format_bgp(result)))
    return 0


def explain_main(argv: list[str] | None = None) -> int:
    """`rusty-rail explain [--socket PATH] CLIENT:PORT VIP:PORT [tcp|udp]` (the same as `ctl explain`)."""
    parser = argparse.ArgumentParser(prog="rusty-rail explain", description="Which backend a flow goes to, and why.")
    add_socket_argument(parser)
    parser.add_argument("client", metavar="CLIENT:PORT", help="e.g. 10.0.0.1:40000 or [2001:db8::1]:40000")
    parser.add_argument("service", metavar="VIP:PORT", help="e.g. 10.1.0.1:80 or [2001:db8:1::1]:443")
    parser.add_argument("protocol", nargs="?", choices=("tcp", "udp"), default="tcp")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return main(["--socket", args.socket, "explain", args.client, args.service, args.protocol])
