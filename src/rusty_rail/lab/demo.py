"""`rusty-rail demo`: topology 4 (two clients, two LBs, two servers) with real HTTP, then torn down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter

from .lab import Lab
from .router import flow_slot

READY_DEADLINE_S = 20.0


def _stop(procs: list[subprocess.Popen[bytes]]) -> list[dict]:
    """SIGTERM the balancers; each prints one JSON line of counters as it stops."""
    for p in procs:
        p.terminate()
    reports = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        lines = [line for line in out.decode(errors="replace").splitlines() if line.startswith("{")]
        stopped = [json.loads(line) for line in lines if '"stopped"' in line]
        reports.append(stopped[-1] if stopped else {})
    return reports


def run_demo(requests_per_client: int = 400, engine: str = "auto", prefix: str = "rr-demo-") -> int:
    if os.geteuid() != 0:
        print("rusty-rail demo: needs root (it creates network namespaces); run: sudo make demo", file=sys.stderr)
        return 1
    log = tempfile.NamedTemporaryFile("w+", prefix="rusty-rail-demo-", suffix=".log", delete=False)
    with Lab(4, prefix) as lab:
        print(f"topology 4 up: {', '.join(lab.plan.namespaces)}")
        procs = lab.start_balancers(env={"RR_ENGINE": engine}, stdout=subprocess.PIPE, stderr=log)
        print(f"balancers started (engine {engine}); their logs: {log.name}")
        deadline = time.monotonic() + READY_DEADLINE_S
        while not lab.traffic(n=1, timeout=0.5)[0].ok:  # poll: the balancers need a moment to start
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                print("the balancers did not start forwarding; the end of their log:")
                log.seek(0)
                print(log.read()[-2000:])
                _stop(procs)
                return 1
        targets = lab.maps.config()[2]
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
                # The router's choice is a pure function of the flow: replay it to name the balancer.
                lb = targets[flow_slot(client.address, lab.vip, 6, r.sport or 0, 80, len(targets))]
                per_backend[(client.name, r.server or "?")] += 1
                per_balancer[(client.name, lb_name.get(lb, lb))] += 1
            print(f"{client.name}: {len(results)} requests in {elapsed:.1f}s ({len(results) / elapsed:.0f}/s)")
        reports = _stop(procs)

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
