"""`rusty-rail demo`: topology 4 (two clients, two LBs, two servers) with real HTTP, then torn down.

The balancers run from a configuration file with [bgp]: each announces the VIP to the lab's router
(BIRD 2), which installs one ECMP route over both; the demo prints the router's BGP sessions and that
route, then who served the clients' requests and through which balancer the router sent them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter

from pathlib import Path

from .events import Event, logged
from .lab import Lab
from .topology import BALANCER_AS, ROUTER_AS, Host

READY_DEADLINE_S = 30.0


def _stop(lab: Lab, procs: list[subprocess.Popen[bytes]]) -> list[Event]:
    """SIGTERM the balancers; each logs one "stopped" event with its counters as it exits."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    reports = []
    for lb in lab.balancers:
        stopped = logged(lab.balancer_log(lb), "stopped")
        reports.append(stopped[-1] if stopped else {})
    return reports


def _tails(lab: Lab, size: int = 2000) -> str:
    return "\n".join(f"-- {lb.name}:\n{lab.balancer_log(lb).read_text(errors='replace')[-size:]}"
                     for lb in lab.balancers if lab.balancer_log(lb).exists())


def run_demo(requests_per_client: int = 400, engine: str = "auto", prefix: str = "rr-demo-") -> int:
    if os.geteuid() != 0:
        print("rusty-rail demo: needs root (it creates network namespaces); run: sudo make demo", file=sys.stderr)
        return 1
    with Lab(4, prefix, bgp=True) as lab:
        print(f"topology 4 up: {', '.join(lab.plan.namespaces)}")
        procs = [lab.start_balancer(lb, [lab.python, "-m", "rusty_rail", "run", "--config", str(_config(lab, lb, engine))])
                 for lb in lab.balancers]
        print(f"balancers started (engine {engine}), announcing {lab.vip} over BGP (AS {BALANCER_AS}) to the "
              f"router (BIRD 2, AS {ROUTER_AS})")
        try:
            return _serve(lab, procs, requests_per_client)
        finally:
            # The lab's log directory goes with the lab: keep a copy for a look afterwards.
            saved = shutil.copytree(lab.log_dir, tempfile.mkdtemp(prefix="rusty-rail-demo-"), dirs_exist_ok=True,
                                    ignore=_sockets)
            print(f"logs: {saved}")


def _sockets(directory: str, names: list[str]) -> list[str]:
    """What copytree cannot copy: the control sockets (neither files nor directories)."""
    return [n for n in names if not (os.path.isfile(os.path.join(directory, n)) or os.path.isdir(os.path.join(directory, n)))]


def _config(lab: Lab, lb: Host, engine: str) -> Path:
    """A balancer's configuration: the VIP over both servers, TCP health checks, BGP to the router."""
    path = lab.log_dir / f"{lb.name}.toml"
    backends = ", ".join(f'"{s.address}"' for s in lab.servers)
    path.write_text(f"""device = "{lb.device}"
engine = "{engine}"
table_size = 1009
control_socket = "{lab.log_dir / lb.name}.sock"

[[services]]
vip = "{lab.vip}"
port = 80
backends = [{backends}]
[services.health]
type = "tcp"

[bgp]
local_as = {BALANCER_AS}
drain_timeout = 5.0
[[bgp.peers]]
address = "{lab.router.address}"
as = {ROUTER_AS}
""")
    return path


def _serve(lab: Lab, procs: list[subprocess.Popen[bytes]], requests_per_client: int) -> int:
    """Wait for the router's ECMP route over both balancers, send the clients' requests, print who served them."""
    deadline = time.monotonic() + READY_DEADLINE_S
    while sorted(lab.vip_next_hops()) != [lb.address for lb in lab.balancers]:  # poll: sessions take a moment
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            _stop(lab, procs)
            print("the balancers' routes did not reach the router; the end of their logs:")
            print(_tails(lab))
            return 1
        time.sleep(0.1)
    print()
    print("router: BGP sessions (BIRD `show protocols`)")
    for line in lab.bird.show("protocols").splitlines():
        if line.startswith(("Name", *(lb.name for lb in lab.balancers))):
            print(f"  {line}")
    print(f"router: BGP routes to {lab.vip} (BIRD `show route`)")
    for line in lab.bird.show(f"route for {lab.vip}").splitlines()[1:]:
        print(f"  {line}")
    print(f"router: kernel route {lab.vip}/32, ECMP via {', '.join(lab.vip_next_hops())} "
          "(the GRE encapsulator follows the kernel's choice for each flow)")
    print()
    lb_name = {lb.address: lb.name for lb in lab.balancers}
    per_backend: Counter[tuple[str, str]] = Counter()
    per_balancer: Counter[tuple[str, str]] = Counter()
    failures = 0
    for client in lab.clients:
        start = time.monotonic()
        results = lab.traffic(n=requests_per_client, client=client)
        elapsed = time.monotonic() - start
        for r in results:
            if not r.ok:
                failures += 1
                continue
            # The router's kernel picked the balancer by its multipath hash: ask it which, for this flow.
            lb = lab.route_choice(client, r.sport or 0) or "?"
            per_backend[(client.name, r.server or "?")] += 1
            per_balancer[(client.name, lb_name.get(lb, lb))] += 1
        print(f"{client.name}: {len(results)} requests in {elapsed:.1f}s ({len(results) / elapsed:.0f}/s)")
    reports = _stop(lab, procs)

    servers = [s.name for s in lab.servers]
    balancers = [lb.name for lb in lab.balancers]
    print()
    print(f"{'requests':<10}" + "".join(f"{n:>10}" for n in servers + balancers))
    for client in lab.clients:
        row = [per_backend[(client.name, s)] for s in servers] + [per_balancer[(client.name, b)] for b in balancers]
        print(f"{client.name:<10}" + "".join(f"{n:>10}" for n in row))
    total = [sum(per_backend[(c.name, s)] for c in lab.clients) for s in servers]
    total += [sum(per_balancer[(c.name, b)] for c in lab.clients) for b in balancers]
    print(f"{'total':<10}" + "".join(f"{n:>10}" for n in total))
    print()
    for lb, report in zip(lab.balancers, reports):
        counters = report.get("counters", {})
        drops = {k: v for k, v in counters.items() if k.startswith("drop_") and v}
        print(f"{lb.name} ({report.get('engine', '?')}): forwarded {counters.get('forwarded', '?')} packets, drops {drops or 'none'}")
    router = lab.maps.stats()
    print(f"router: {router['encapsulated_wire']} packets wrapped in GRE ({router['encapsulated']} skbs)")
    print("all requests answered" if failures == 0 else f"{failures} requests failed")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    raise SystemExit(run_demo(int(os.environ.get("RR_DEMO_REQUESTS", "400"))))
