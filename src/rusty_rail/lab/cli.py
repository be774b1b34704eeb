"""`rusty-rail lab up --topology N [--bgp] [--outer6 ipv6|ipv4] | down | status | traffic [--ipv6] | targets`."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence

from .lab import OUTER6, Lab
from .topology import TOPOLOGIES


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rusty-rail lab", description="the original's test topologies in namespaces")
    p.add_argument("--prefix", default="rr-", help="namespace name prefix (default rr-)")
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="build a topology (replacing one with the same prefix)")
    up.add_argument("--topology", type=int, choices=sorted(TOPOLOGIES), default=1,
                    help="1-4: the original's; 5: topology 2 with a third server")
    up.add_argument("--direct", action="store_true", help="router GRE straight to the servers (no balancer)")
    up.add_argument("--bgp", action="store_true", help="no static routes: the router follows the balancers' BGP")
    up.add_argument("--outer6", choices=OUTER6, default="ipv6",
                    help="the outer family of the router's tunnels for IPv6 packets (default ipv6)")
    up.add_argument("--balancers", action="store_true", help="also start `python -m rusty_rail` in each LB")
    sub.add_parser("down", help="remove every namespace with the prefix")
    sub.add_parser("status", help="what is up, as JSON")
    tr = sub.add_parser("traffic", help="HTTP GETs from a client to the VIP")
    tr.add_argument("-n", type=int, default=10)
    tr.add_argument("--client", default="client1")
    tr.add_argument("--path", default="/")
    tr.add_argument("--ipv6", action="store_true", help="to the IPv6 VIP, from the client's IPv6 address")
    tg = sub.add_parser("targets", help="the router's static route: to the balancers, the servers, or none (BGP only)")
    tg.add_argument("to", choices=["balancers", "servers", "bgp"])
    a = p.parse_args(argv)

    if a.cmd == "up":
        lab = Lab(a.topology, a.prefix, direct=a.direct, bgp=a.bgp, outer6=a.outer6).up()
        if a.balancers:
            # Own session: they keep running after this command; `lab down` stops them. Their output
            # goes to log files, so a pipe after this command (`| tail`) still sees its end.
            lab.start_balancers(start_new_session=True)
        print(f"topology {a.topology} up: namespaces {', '.join(lab.plan.namespaces)}; VIPs {lab.vip} and {lab.vip6}")
        print(f"logs: {lab.log_dir}")
        return 0
    if a.cmd == "down":
        Lab(1, a.prefix).down()  # removes everything with the prefix, whatever the topology
        return 0
    try:
        lab = Lab.existing(a.prefix)
    except LookupError as e:
        print(e, file=sys.stderr)
        return 1
    if a.cmd == "status":
        print(json.dumps(lab.status(), indent=2))
    elif a.cmd == "targets":
        {"servers": lab.route_to_servers, "balancers": lab.route_to_balancers, "bgp": lab.route_by_bgp}[a.to]()
        print("router static targets:", ", ".join(lab.targets()) or "none (BGP routes only)")
    elif a.cmd == "traffic":
        results = lab.traffic(a.n, lab.plan.host(a.client), a.path, vip=lab.vip6 if a.ipv6 else lab.vip)
        for r in results:
            print(f"{'ok ' if r.ok else 'ERR'} sport {r.sport} server {r.server} {r.seconds * 1000:.1f} ms"
                  + (f" {r.error}" if r.error else ""))
        print(dict(Counter(r.server or "failed" for r in results)))
        return 0 if all(r.ok for r in results) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
