"""`rusty-rail demo`: topology 4 (two clients, two LBs, two servers) with real HTTP, then torn down."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter

from .events import Event, logged
from .lab import Lab

READY_DEADLINE_S = 20.0


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
    with Lab(4, prefix) as lab:
        print(f"topology 4 up: {', '.join(lab.plan.namespaces)}")
        procs = lab.start_balancers(env={"RR_ENGINE": engine})
        print(f"balancers started (engine {engine})")
        try:
            return _serve(lab, procs, requests_per_client)
        finally:
            # The lab's log directory goes with the lab: keep a copy for a look afterwards.
            saved = shutil.copytree(lab.log_dir, tempfile.mkdtemp(prefix="rusty-rail-demo-"), dirs_exist_ok=True)
            print(f"logs: {saved}")


def _serve(lab: Lab, procs: list[subprocess.Popen[bytes]], requests_per_client: int) -> int:
    """Wait for the balancers, send the clients' requests, print who served them."""
    deadline = time.monotonic() + READY_DEADLINE_S
    while not lab.traffic(n=1, timeout=0.5)[0].ok:  # poll: the balancers need a moment to start
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            _stop(lab, procs)
            print("the balancers did not start forwarding; the end of their logs:")
            print(_tails(lab))
            return 1
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
