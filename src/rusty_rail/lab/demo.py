"""`rusty-rail demo`: topology 4 (two clients, two LBs, two servers) with real HTTP, then torn down."""

from __future__ import annotations

import os
import subprocess
import time
from collections import Counter

from .lab import Lab

READY_DEADLINE_S = 20.0


def run_demo(requests_per_client: int = 400, engine: str = "afpacket", prefix: str = "rr-demo-") -> int:
    with Lab(4, prefix) as lab:
        print(f"topology 4 up: {', '.join(lab.plan.namespaces)}")
        procs = lab.start_balancers(env={"RR_ENGINE": engine})
        deadline = time.monotonic() + READY_DEADLINE_S
        while not lab.traffic(n=1, timeout=0.5)[0].ok:  # poll: the balancers need a moment to start
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                print("the balancers did not start forwarding; is the balancer daemon there?")
                return 1
        failures = 0
        print(f"{'client':<10}{'server':<10}{'requests':>10}")
        for client in lab.clients:
            start = time.monotonic()
            results = lab.traffic(n=requests_per_client, client=client)
            per_server = Counter(r.server or "failed" for r in results)
            failures += per_server.get("failed", 0)
            for server, n in sorted(per_server.items()):
                print(f"{client.name:<10}{server:<10}{n:>10}")
            print(f"{client.name}: {len(results) / (time.monotonic() - start):.0f} requests/s")
        stats = lab.maps.stats()
        print(f"router: {stats['encapsulated']} packets encapsulated toward {', '.join(lab.maps.config()[2])}")
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
        print("all requests answered" if failures == 0 else f"{failures} requests failed")
        return 0 if failures == 0 else 1


if __name__ == "__main__":
    raise SystemExit(run_demo(int(os.environ.get("RR_DEMO_REQUESTS", "400"))))
