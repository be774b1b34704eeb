"""The `rusty-rail` command. With no subcommand it runs the balancer configured from the environment."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import TYPE_CHECKING

from rusty_rail import __version__

if TYPE_CHECKING:
    from collections.abc import Sequence

    from rusty_rail.control.config import Config
    from rusty_rail.control.handover import HealthRecord

log = logging.getLogger("rusty_rail")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rusty-rail",
        description="A Maglev-style L4 load balancer for GRE-encapsulated traffic. "
        'With no command: RR_DEVICE=eth0 RR_TARGET_IPS="10.2.0.1;10.2.0.2" rusty-rail',
    )
    parser.add_argument("--version", action="version", version=f"rusty-rail {__version__}")
    parser.add_argument("--workers", type=int, default=None, help="packet worker processes (AF_PACKET engine; default RR_WORKERS, else one less than the CPUs)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("lab", help="the namespace lab: lab up --topology N | down | status", add_help=False)
    sub.add_parser("decap", help="GRE decapsulation for servers without a GRE module", add_help=False)
    sub.add_parser("bench", help="every benchmark: a Markdown report with plots (bench --out DIR)", add_help=False)
    run = sub.add_parser("run", help="run the balancer from a configuration file")
    run.add_argument("--config", required=True, help="TOML file (see deploy/config.example.toml)")
    restart = sub.add_parser(
        "restart", help="hitless restart: the running daemon hands over (XDP stays attached), then this one runs",
        description="Check the pin root (RR_PIN_ROOT / pin_root: a bpffs, mounted where missing), ask the "
        "running daemon through its control socket (--socket, else the file's control_socket, else "
        "RR_CONTROL_SOCKET) to hand over: it pins its connection table where this process will look, answers "
        "with its health checks' state and exits leaving its XDP program attached, or says why not and serves "
        "on. Then run the new daemon in the foreground with this configuration (--config FILE, or the "
        "environment form): it takes over the connection table and replaces the program atomically. "
        "Without a socket, --pid sends SIGUSR2 instead (no answer, no health carried over).")
    restart.add_argument("--config", help="TOML file (default: the environment form)")
    restart.add_argument("--pid", type=int, help="the running daemon's process id, when it has no control socket")
    restart.add_argument("--socket", help="the running daemon's control socket")
    restart.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for it to exit (default 30)")
    sub.add_parser("ctl", help="status and changes of a running balancer", add_help=False)
    sub.add_parser("top", help="live view of a running balancer", add_help=False)
    sub.add_parser("explain", help="which backend a flow goes to, and why", add_help=False)
    demo = sub.add_parser("demo", help="topology 4 with real HTTP over IPv4 and IPv6, a table per backend, torn down after")
    demo.add_argument("--requests", type=int, default=400, help="HTTP requests per client and family")
    demo.add_argument("--engine", default="auto", choices=["auto", "afpacket", "xdp"])
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    from rusty_rail.control.logs import setup_logging

    setup_logging(args.verbose)
    if args.command == "lab":
        from rusty_rail.lab.cli import main as lab_main

        return lab_main(rest)
    if args.command == "bench":
        from rusty_rail.bench.cli import main as bench_main

        return bench_main(rest)
    if args.command == "decap":
        from rusty_rail.decap import main as decap_main

        return decap_main(rest)
    if args.command in ("ctl", "explain"):
        from rusty_rail.control import ctl

        return ctl.main(rest) if args.command == "ctl" else ctl.explain_main(rest)
    if args.command == "top":
        from rusty_rail.control.top import main as top_main

        return top_main(rest)
    if rest:
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    if args.command == "demo":
        from rusty_rail.lab.demo import run_demo

        return run_demo(requests_per_client=args.requests, engine=args.engine)
    if args.command == "run":
        return run_from_file(args.config, args.workers)
    if args.command == "restart":
        return restart(args)
    return run_from_environment(args.workers)


def _need_root() -> bool:
    if os.geteuid() != 0:
        print("rusty-rail: the balancer needs root (raw packet sockets and BPF on the device)", file=sys.stderr)
        return True
    return False


def _start(config: Config, workers: int | None, config_path: str | None,
           carried_health: Sequence[HealthRecord] = ()) -> int:
    """Apply --workers, check for root, and run the daemon (both configuration forms end here)."""
    if workers is not None:
        if workers < 1:
            print("rusty-rail: --workers must be at least 1", file=sys.stderr)
            return 2
        config = dataclasses.replace(config, workers=workers)
    if _need_root():
        return 2
    from rusty_rail.daemon import run

    return run(config, config_path, carried_health=carried_health)


def run_from_file(path: str, workers: int | None) -> int:
    from rusty_rail.control.config import ConfigError, load_config

    try:
        config = load_config(path)  # every error before anything is attached
    except ConfigError as exc:
        print(f"rusty-rail: {path}: {exc}", file=sys.stderr)
        return 1
    return _start(config, workers, path)


def run_from_environment(workers: int | None) -> int:
    from rusty_rail.control.config import ConfigError, from_environment

    try:
        config = from_environment()
    except ConfigError as exc:
        print(f"rusty-rail: {exc}", file=sys.stderr)
        return 2
    return _start(config, workers, None)


def _exited(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # a zombie has exited
    except (FileNotFoundError, ProcessLookupError):
        return True


def restart(args: argparse.Namespace) -> int:
    """`rusty-rail restart`: hand over from the running daemon, then run this one (see _parser)."""
    import signal
    import time

    from rusty_rail.bpf import bpffs
    from rusty_rail.control.config import ConfigError, from_environment, load_config
    from rusty_rail.control.handover import HandoverRefused, ask

    if _need_root():
        return 2
    try:  # the new configuration must be good before the running daemon is asked to leave
        config = load_config(args.config) if args.config else from_environment()
    except ConfigError as exc:
        print(f"rusty-rail: {args.config + ': ' if args.config else ''}{exc}", file=sys.stderr)
        return 1
    socket_path = args.socket or config.control_socket
    pin_root = f"pin_root {config.pin_root!r} (RR_PIN_ROOT)" if args.config else f"RR_PIN_ROOT={config.pin_root}"
    untouched = "the running daemon was not asked to hand over and serves on"
    try:  # before anything is given up: where the new daemon will look for the pins
        bpffs.prepare(config.pin_root)
    except bpffs.PinRootError as exc:
        print(f"rusty-rail: restart: {pin_root} cannot hold the handover's pins: {exc}; {untouched}", file=sys.stderr)
        return 1
    carried: tuple[HealthRecord, ...] = ()
    if socket_path:
        try:
            pid, answer = ask(socket_path, config.pin_root, timeout=args.timeout)
        except HandoverRefused as exc:
            print(f"rusty-rail: restart: {exc}", file=sys.stderr)
            return 1
        if args.pid is not None and args.pid != pid:
            log.warning("--pid %d ignored: the daemon at %s is process %d", args.pid, socket_path, pid)
        if not answer.handed_over:
            log.warning("daemon %d stops plainly: %s", pid, answer.why)
        carried = answer.health
    elif args.pid is not None:
        pid = args.pid
        if not bpffs.sees(pid, config.pin_root):  # SIGUSR2: it pins in its own view of its pin root
            print(f"rusty-rail: restart: process {pid} does not see the {pin_root} this process sees (another "
                  f"mount namespace, e.g. another `ip netns exec`): its pins would be lost here; restart it "
                  f"through its control socket (--socket); {untouched}", file=sys.stderr)
            return 1
        try:
            os.kill(pid, signal.SIGUSR2)
        except ProcessLookupError:
            print(f"rusty-rail: restart: no process {pid}", file=sys.stderr)
            return 1
    else:
        print("rusty-rail: restart: give the running daemon's control socket (--socket, control_socket, "
              "RR_CONTROL_SOCKET), or --pid", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.timeout
    while not _exited(pid):
        if time.monotonic() > deadline:
            print(f"rusty-rail: restart: daemon {pid} did not exit within {args.timeout}s (after SIGUSR2: it "
                  f"serves on when it cannot pin, and its log says why)", file=sys.stderr)
            return 1
        time.sleep(0.01)  # polling another process's exit
    log.info("daemon %d handed over; starting", pid, extra={"event": "restart", "predecessor": pid})
    return _start(config, args.workers, args.config, carried)


if __name__ == "__main__":
    sys.exit(main())
