"""What a user would run instead of Rusty Rail, and the servers' real software, inside a lab.

Everything here is generated into the lab's own directory (`Lab.log_dir`) and started in the lab's
namespaces with `Lab.popen`, so `Lab.down()` stops it with the namespaces; nothing touches the host.

- nginx on every server (port 80, `worker_processes auto`), serving OBJECTS (1 KiB and 1 MiB files)
  in place of the lab's small Python httpd, which is stopped while nginx runs;
- iperf3 servers on every server (port 5201);
- HAProxy in `mode tcp` on a balancer host (Debian haproxy): a full proxy on the balancer's own
  address, port 80 to every server, 5201 to the first (iperf3's control and data connections must
  reach the same server);
- nftables DNAT on a balancer host: the same two rules as HAProxy's, in the kernel, with masquerade
  so the servers' replies come back through the balancer to be un-NATed.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..lab import netns
from ..lab.lab import Lab
from ..lab.topology import Host

HTTP_PORT = 80
IPERF_PORT = 5201
OBJECTS = {"1k": 1024, "1m": 1 << 20}
"""nginx's objects: URL path -> size in bytes (the issue's 1 KiB and 1 MiB)."""
NAT_TABLE = "rr_bench_nat"
TOOLS = {"nginx": "nginx", "iperf3": "iperf3", "wrk": "wrk", "haproxy": "haproxy", "nft": "nftables"}
"""Programs the end-to-end comparison runs -> the Debian package that has them (Makefile BENCH_DEB)."""


def missing_tools() -> list[str]:
    """The Debian packages to install before the end-to-end comparison can run (empty: all there)."""
    return sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})


def nginx_config(directory: Path, name: str, root: Path) -> str:
    # Everything nginx writes goes under `directory`: pid, logs and temp paths default to /var otherwise.
    temp = directory / f"nginx-{name}-tmp"
    return f"""user root;
worker_processes auto;
daemon off;
pid {directory}/nginx-{name}.pid;
error_log {directory}/nginx-{name}.error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 120;
    keepalive_requests 100000000;
    server {{
        listen {HTTP_PORT} reuseport;
        root {root};
        location / {{ }}
    }}
}}
"""


def haproxy_config(lb: Host, servers: Sequence[Host]) -> str:
    lines = [
        "global", "    maxconn 4000",  # 2 fds a connection; the process may not raise its limit
        "defaults", "    mode tcp", "    timeout connect 5s", "    timeout client 120s", "    timeout server 120s",
        "frontend http", f"    bind {lb.address}:{HTTP_PORT}", "    default_backend http",
        "backend http", "    balance roundrobin",
        *(f"    server {s.name} {s.address}:{HTTP_PORT}" for s in servers),
        "frontend iperf", f"    bind {lb.address}:{IPERF_PORT}", "    default_backend iperf",
        "backend iperf", f"    server {servers[0].name} {servers[0].address}:{IPERF_PORT}",
    ]
    return "\n".join(lines) + "\n"


def nft_dnat_ruleset(lb: Host, servers: Sequence[Host]) -> str:
    """DNAT on the balancer's address (HTTP by a hash of the client's address and port, iperf3 to the
    first server) and masquerade toward the servers, so replies return through the balancer."""
    mapping = ", ".join(f"{i} : {s.address}" for i, s in enumerate(servers))
    addresses = ", ".join(s.address for s in servers)
    return f"""table ip {NAT_TABLE} {{
    chain pre {{
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr {lb.address} tcp dport {HTTP_PORT} dnat to jhash ip saddr . tcp sport mod {len(servers)} map {{ {mapping} }}
        ip daddr {lb.address} tcp dport {IPERF_PORT} dnat to {servers[0].address}
    }}
    chain post {{
        type nat hook postrouting priority srcnat; policy accept;
        ip daddr {{ {addresses} }} tcp dport {{ {HTTP_PORT}, {IPERF_PORT} }} masquerade
    }}
}}
"""


@dataclass
class Servers:
    """nginx and iperf3 on every server of a lab; `start()` then `stop()` (the lab's httpd comes back)."""

    lab: Lab

    def start(self) -> None:
        root = self.lab.log_dir / "www"
        root.mkdir(parents=True, exist_ok=True)
        for name, size in OBJECTS.items():
            (root / name).write_bytes(bytes(range(256)) * (size // 256))
        for s in self.lab.servers:
            self.lab.stop_httpd(s)  # port 80 is nginx's now
            (self.lab.log_dir / f"nginx-{s.name}-tmp").mkdir(exist_ok=True)
            config = self.lab.log_dir / f"nginx-{s.name}.conf"
            config.write_text(nginx_config(self.lab.log_dir, s.name, root))
            self._popen(s, f"nginx-{s.name}", ["nginx", "-c", str(config), "-p", str(self.lab.log_dir)])
            self._popen(s, f"iperf3-{s.name}", ["iperf3", "-s", "-p", str(IPERF_PORT)])

    def stop(self) -> None:
        for p in self._procs:
            netns.stop(p)
        self._procs.clear()
        for s in self.lab.servers:
            self.lab.start_httpd(s)

    def _popen(self, host: Host, name: str, argv: list[str]) -> None:
        with open(self.lab.log_dir / f"{name}.log", "ab") as log:
            self._procs.append(self.lab.popen(host.namespace, argv, stdin=subprocess.DEVNULL, stdout=log,
                                              stderr=subprocess.STDOUT))

    def __post_init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []


@dataclass
class Haproxy:
    """HAProxy (mode tcp) on the lab's first balancer host, in the foreground (-db) until stop()."""

    lab: Lab

    def start(self) -> None:
        lb = self.lab.balancers[0]
        config = self.lab.log_dir / "haproxy.cfg"
        config.write_text(haproxy_config(lb, self.lab.servers))
        check = self.lab.run(lb.namespace, ["haproxy", "-c", "-f", str(config)], check=False)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy rejected {config}: {check.stdout}{check.stderr}")
        with open(self.lab.log_dir / "haproxy.log", "ab") as log:
            self._proc = self.lab.popen(lb.namespace, ["haproxy", "-db", "-f", str(config)],
                                        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self._proc is not None:
            netns.stop(self._proc, 10)
        self._proc = None

    def __post_init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None


@dataclass
class NftDnat:
    """nftables DNAT + masquerade on the lab's first balancer host, forwarding on, until stop()."""

    lab: Lab

    def start(self) -> None:
        lb = self.lab.balancers[0]
        rules = self.lab.log_dir / "dnat.nft"
        rules.write_text(nft_dnat_ruleset(lb, self.lab.servers))
        done = self.lab.run(lb.namespace, ["nft", "-f", str(rules)], check=False)
        if done.returncode != 0:
            raise RuntimeError(f"nft -f {rules}: {done.stderr.strip()} (does this kernel have nf_nat?)")
        # In and out of the same device: no ICMP redirects, forward without them.
        netns.sysctl(lb.namespace, {"net.ipv4.ip_forward": 1, "net.ipv4.conf.all.send_redirects": 0,
                                    f"net.ipv4.conf.{lb.device}.send_redirects": 0})

    def stop(self) -> None:
        lb = self.lab.balancers[0]
        self.lab.run(lb.namespace, ["nft", "delete", "table", "ip", NAT_TABLE], check=False)
        netns.sysctl(lb.namespace, {"net.ipv4.ip_forward": 0})
