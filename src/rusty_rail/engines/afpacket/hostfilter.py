"""Keep the balanced GRE away from the host's own stack with an nftables netdev ingress rule.

AF_PACKET taps run before netdev ingress in __netif_receive_skb_core, so the engine's socket still gets
every GRE frame while the host stack does not (it would otherwise answer "protocol unreachable", or
duplicate the packet if anything on the host handles GRE). Everything else — ARP, ICMP, SSH — reaches the
host untouched. `ether type ip` / `ether type ip6` (not `meta protocol`) so a VLAN-tagged frame, whose tag
the kernel keeps as metadata, is not matched: docs/WIRE.md passes those to the host. For IPv6 the rule
reads the fixed header's next header (`ip6 nexthdr`, not `meta l4proto`, which walks extension headers):
GRE after extension headers is not ours (WIRE.md section 1) and reaches the host like any IPv6.

The table is named after the device, so two engines on two devices do not collide, and a leftover from a
crashed run is replaced atomically (`add` + `delete` + define in one transaction).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

_NAME_OK = re.compile(r"[A-Za-z0-9_.\-]{1,15}")
CHAIN = "gre_to_engine"


def table_name(device: str) -> str:
    return "rusty_rail_" + re.sub(r"[^A-Za-z0-9_]", "_", device)


def _nft(*args: str, script: str | None = None) -> subprocess.CompletedProcess[str]:
    """Runs nft (Debian `nftables`); FileNotFoundError when it is not installed."""
    nft = shutil.which("nft") or "/usr/sbin/nft"
    return subprocess.run([nft, *args], input=script, capture_output=True, text=True)


def install(device: str) -> str:
    """Drop GRE over IPv4 and IPv6 on `device`'s ingress before the host stack sees it. Returns the table
    name."""
    if not _NAME_OK.fullmatch(device):
        raise ValueError(f"unexpected device name {device!r}")
    table = table_name(device)
    script = f"""
table netdev {table}
delete table netdev {table}
table netdev {table} {{
    chain {CHAIN} {{
        type filter hook ingress device "{device}" priority -500; policy accept;
        ether type ip ip protocol gre counter drop comment "balanced by rusty-rail's AF_PACKET engine"
        ether type ip6 ip6 nexthdr gre counter drop comment "balanced by rusty-rail's AF_PACKET engine"
    }}
}}
"""
    result = _nft("-f", "-", script=script)
    if result.returncode != 0:
        raise RuntimeError(f"nft could not install {table}: {result.stderr.strip()}")
    return table


def remove(device: str) -> bool:
    """Remove the table if it exists. True if it was there."""
    table = table_name(device)
    return _nft("delete", "table", "netdev", table).returncode == 0


def dropped(device: str) -> int | None:
    """Packets the rule has kept from the host (its counter), or None if the table is not there.

    Read from nft's JSON listing (`nft -j`), whose layout is a documented schema (libnftables-json(5)),
    not from the text listing meant for people."""
    result = _nft("-j", "list", "table", "netdev", table_name(device))
    if result.returncode != 0:
        return None
    packets = 0
    for item in json.loads(result.stdout).get("nftables", []):
        rule = item.get("rule")
        if rule is None or rule.get("chain") != CHAIN:
            continue
        for expr in rule.get("expr", []):
            if isinstance(expr, dict) and "counter" in expr:
                packets += expr["counter"]["packets"]
    return packets
