"""A balancer's configuration file for the namespace tests (test_control_netns, test_resilience_netns)."""

from __future__ import annotations

from pathlib import Path

from rusty_rail.lab.topology import BALANCER_AS, ROUTER_AS, ROUTER_V

VIP = "10.1.0.1"
SERVICE = f"{VIP}:80"
VIP6 = "2001:db8:1::1"
SERVICE6 = f"[{VIP6}]:80"
METRICS_PORT = 9100  # each balancer namespace has its own loopback: no clash between tests
INTERVAL, TIMEOUT, RISE, FALL = 0.2, 0.1, 2, 2
TABLE_SIZE = 1009  # small: tables are built in Python on every change


BGP_SECTION = f"""
[bgp]
local_as = {BALANCER_AS}
drain_timeout = 10.0
[[bgp.peers]]
address = "{ROUTER_V}"
as = {ROUTER_AS}
"""


def config_text(engine: str, socket_path: Path, backends: list[str], *, health: str = "tcp",
                timeout: float = TIMEOUT, extra_service: str = "", workers: int = 1, bgp: str = "",
                backends6: list[str] | None = None) -> str:
    """bgp: a [bgp] section (BGP_SECTION: announce to the lab's router) appended. backends6: a second
    service, the IPv6 VIP's port 80 over these backends, checked alike."""
    listed = ", ".join(f'"{b}"' for b in backends)
    checks = f"""[services.health]
type = "{health}"
port = 80
interval = {INTERVAL}
timeout = {timeout}
rise = {RISE}
fall = {FALL}
"""
    six = "" if backends6 is None else f"""
[[services]]
vip = "{VIP6}"
protocol = "tcp"
port = 80
backends = [{", ".join(f'"{b}"' for b in backends6)}]
{checks}"""
    return f"""\
device = "eth0"
engine = "{engine}"
table_size = {TABLE_SIZE}
control_socket = "{socket_path}"
metrics = "127.0.0.1:{METRICS_PORT}"
workers = {workers}

[[services]]
vip = "{VIP}"
protocol = "tcp"
port = 80
backends = [{listed}]
{extra_service}
{checks}{six}{bgp}"""
