"""`rusty-rail top`: the daemon's figures, live, refreshed every second (like `ipvsadm -L --rate` in a loop).

`render(status, previous, elapsed)` is pure: a status in, a rich renderable out, with per-second rates
from the previous status when there is one. main() only polls the socket and hands frames to rich.Live.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from rusty_rail.control.ctl import ControlClient, CtlError, _human, add_socket_argument

_STATE_STYLE = {"active": "green", "drained": "yellow", "down": "bold red"}


def _rate(now: int, before: int | None, elapsed: float) -> str:
    if before is None or elapsed <= 0 or now < before:
        return "-"
    return _human(round((now - before) / elapsed))


def render(status: dict[str, Any], previous: dict[str, Any] | None = None, elapsed: float = 1.0) -> RenderableType:
    prev_backends: dict[tuple[str, str], dict[str, Any]] = {}
    if previous is not None:
        for svc in previous["services"]:
            for b in svc["backends"]:
                prev_backends[(svc["service"], b["address"])] = b
    c = status["counters"]
    prev_c = previous["counters"] if previous is not None else None
    header = Text.assemble(
        ("rusty-rail ", "bold"), f"{status['device']} · {status['engine']} · ",
        f"forwarded {_human(c['forwarded'])} ({_rate(c['forwarded'], prev_c and prev_c['forwarded'], elapsed)}/s",
        f", IPv6 {_human(c['by_family']['ipv6']['forwarded'])}" if "by_family" in c else "", ") · ",
        f"connections {_human(c['connections'])} · evictions {_human(c['connection_evictions'])} · ",
        f"rebuilds {c['table_rebuilds']}",
    )
    table = Table(expand=True, header_style="bold")
    for name, justify in (("Service / backend", "left"), ("Weight", "right"), ("State", "left"), ("Health", "left"),
                          ("Flows", "right"), ("Pkts/s", "right"), ("Bytes/s", "right"), ("Packets", "right"), ("Bytes", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for svc in status["services"]:
        health = svc["health"]["type"]
        table.add_row(Text(svc["service"], style="bold cyan"), "", "", health, "", "", "", _human(svc["packets"]), _human(svc["bytes"]))
        for b in svc["backends"]:
            before = prev_backends.get((svc["service"], b["address"]))
            table.add_row(
                f"  -> {b['address']}",
                str(b["weight"]),
                Text(b["state"], style=_STATE_STYLE.get(b["state"], "")),
                b["health"],
                _human(b["flows"]),
                _rate(b["packets"], before["packets"] if before else None, elapsed),
                _rate(b["bytes"], before["bytes"] if before else None, elapsed),
                _human(b["packets"]),
                _human(b["bytes"]),
            )
    drops = {k: v for k, v in c["drops"].items() if v}
    drop_line = Text("drops: " + ("  ".join(f"{k} {_human(v)}" for k, v in sorted(drops.items())) if drops else "none"),
                     style="red" if drops else "dim")
    parts: list[RenderableType] = [header, table, drop_line]
    error = status.get("control", {}).get("last_reload_error")
    if error:
        parts.append(Text(f"last reload failed: {error}", style="bold red"))
    return Group(*parts)


def render_text(status: dict[str, Any], width: int = 120) -> str:
    """The frame as plain text (tests, and `top --once` into a pipe)."""
    console = Console(width=width, record=True, file=io.StringIO(), color_system=None)
    console.print(render(status))
    return console.export_text()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rusty-rail top", description="Live view of a running rusty-rail daemon.")
    add_socket_argument(parser)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    parser.add_argument("--once", action="store_true", help="print one frame and exit")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    client = ControlClient(args.socket)
    try:
        status = client.request({"cmd": "status"})
        if args.once:
            Console().print(render(status))
            return 0
        previous, taken = None, time.monotonic()
        with Live(render(status), refresh_per_second=4, screen=False) as live:
            while True:
                time.sleep(args.interval)  # the refresh period itself, not synchronisation
                now = time.monotonic()
                previous, status, elapsed, taken = status, client.request({"cmd": "status"}), now - taken, now
                live.update(render(status, previous, elapsed))
    except CtlError as exc:
        print(f"rusty-rail top: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        client.close()
