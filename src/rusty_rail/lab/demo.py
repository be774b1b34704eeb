"""`rusty-rail demo`: topology 4 (two clients, two LBs, two servers) with real HTTP over IPv4 and IPv6,
then torn down.

The balancers run from a configuration file with [bgp] and two services, the IPv4 VIP over the servers'
IPv4 addresses and the IPv6 VIP over their IPv6 addresses: each balancer announces both VIPs to the lab's
router (BIRD 2; the IPv6 one over the same session, its IPv6 address as next hop), which installs one
ECMP route per VIP over both; the demo prints the router's BGP sessions and those routes, then, side by
side for the two families, who served the clients' requests and through which balancer the router sent
them. IPv6 travels in GRE over IPv6 from the router to the balancers and on to the servers.
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
        print(f"balancers started (engine {engine}), announcing {lab.vip} and {lab.vip6} over BGP (AS {BALANCER_AS}) "
              f"to the router (BIRD 2, AS {ROUTER_AS})")
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
    """A balancer's configuration: each VIP over both servers (the addresses of its family), TCP health
    checks, BGP to the router."""
    path = lab.log_dir / f"{lb.name}.toml"
    services = "".join(f"""
[[services]]
vip = "{vip}"
port = 80
backends = [{", ".join(f'"{address}"' for address in backends)}]
[services.health]
type = "tcp"
""" for vip, backends in ((lab.vip, [s.address for s in lab.servers]), (lab.vip6, [s.address6 for s in lab.servers])))
    path.write_text(f"""device = "{lb.device}"
engine = "{engine}"
table_size = 1009
control_socket = "{lab.log_dir / lb.name}.sock"
{services}
[bgp]
local_as = {BALANCER_AS}
drain_timeout = 5.0
[[bgp.peers]]
address = "{lab.router.address}"
as = {ROUTER_AS}
""")
    return path


FAMILIES = ("IPv4", "IPv6")


def _serve(lab: Lab, procs: list[subprocess.Popen[bytes]], requests_per_client: int) -> int:
    """Wait for the router's ECMP routes over both balancers, send the clients' requests to both VIPs,
    print who served them."""
    vips = dict(zip(FAMILIES, (lab.vip, lab.vip6)))
    hops = {"IPv4": [lb.address for lb in lab.balancers], "IPv6": [lb.address6 for lb in lab.balancers]}
    deadline = time.monotonic() + READY_DEADLINE_S
    while any(sorted(lab.vip_next_hops(vips[f])) != hops[f] for f in FAMILIES):  # poll: sessions take a moment
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
    for family, vip in vips.items():
        print(f"router: BGP routes to {vip} (BIRD `show route`)")
        for line in lab.bird.show(f"route for {vip}").splitlines()[1:]:
            print(f"  {line}")
        print(f"router: kernel route {vip}/{32 if family == 'IPv4' else 128}, ECMP via "
              f"{', '.join(lab.vip_next_hops(vip))}")
    print("(the GRE encapsulator follows the kernel's choice for each flow: IPv4 in GRE over IPv4, IPv6 in GRE "
          "over IPv6)")
    print()
    lb_name = {address: lb.name for lb in lab.balancers for address in (lb.address, lb.address6)}
    per_backend: Counter[tuple[str, str, str]] = Counter()
    per_balancer: Counter[tuple[str, str, str]] = Counter()
    failures = 0
    for client in lab.clients:
        for family, vip in vips.items():
            start = time.monotonic()
            results = lab.traffic(n=requests_per_client, client=client, vip=vip)
            elapsed = time.monotonic() - start
            answered = [r for r in results if r.ok]
            failures += len(results) - len(answered)
            # The router's kernel picked the balancer by its multipath hash: ask it which, for each flow.
            hops = lab.route_choices(client, [r.sport or 0 for r in answered], vip=vip)
            for r, hop in zip(answered, hops):
                lb = hop or "?"
                per_backend[(client.name, family, r.server or "?")] += 1
                per_balancer[(client.name, family, lb_name.get(lb, lb))] += 1
            print(f"{client.name} {family}: {len(results)} requests to {vip} in {elapsed:.1f}s "
                  f"({len(results) / elapsed:.0f}/s)")
    reports = _stop(lab, procs)

    servers = [s.name for s in lab.servers]
    balancers = [lb.name for lb in lab.balancers]
    rows = [(f"{client.name} {family}", [per_backend[(client.name, family, s)] for s in servers]
             + [per_balancer[(client.name, family, b)] for b in balancers])
            for client in lab.clients for family in FAMILIES]
    rows += [(f"total {family}", [sum(row[i] for name, row in rows if name.endswith(family))
                                   for i in range(len(servers) + len(balancers))]) for family in FAMILIES]
    print()
    print(f"{'requests':<16}" + "".join(f"{n:>10}" for n in servers + balancers))
    for name, row in rows:
        print(f"{name:<16}" + "".join(f"{n:>10}" for n in row))
    print()
    for lb, report in zip(lab.balancers, reports):
        counters = report.get("counters", {})
        drops = {k: v for k, v in counters.items() if k.startswith("drop_") and v}
        forwarded, six = counters.get("forwarded", 0), counters.get("forwarded_ipv6", 0)
        print(f"{lb.name} ({report.get('engine', '?')}): forwarded {forwarded} packets ({forwarded - six} IPv4, "
              f"{six} IPv6), drops {drops or 'none'}")
    router = lab.maps.stats()
    wire, wire6 = router["encapsulated_wire"], router["encapsulated_wire_ipv6"]
    print(f"router: {wire} packets wrapped in GRE ({wire - wire6} IPv4, {wire6} IPv6; {router['encapsulated']} skbs, "
          f"{router['outer_ipv6']} of them in GRE over IPv6)")
    print("all requests answered" if failures == 0 else f"{failures} requests failed")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    raise SystemExit(run_demo(int(os.environ.get("RR_DEMO_REQUESTS", "400"))))
