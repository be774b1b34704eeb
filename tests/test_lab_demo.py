"""`rusty-rail demo` as people run it (fewer requests): topology 4, both VIPs announced over BGP, IPv4 and
IPv6 requests side by side, every one answered, both families through both balancers."""

from __future__ import annotations

import os
import re
import shutil

import pytest

from rusty_rail.lab import netns
from rusty_rail.lab.demo import run_demo

pytestmark = pytest.mark.netns


def test_demo_serves_both_families(capsys: pytest.CaptureFixture[str]) -> None:
    prefix = f"rd{os.getpid() % 100000}-"
    try:
        assert run_demo(requests_per_client=20, engine="afpacket", prefix=prefix) == 0
    finally:
        out = capsys.readouterr().out
        saved = re.search(r"^logs: (\S+)$", out, re.M)
        if saved:
            shutil.rmtree(saved.group(1), ignore_errors=True)
        assert netns.with_prefix(prefix) == []
    assert "router: kernel route 10.1.0.1/32, ECMP via 192.168.137.11, 192.168.137.12" in out
    assert "router: kernel route 2001:db8:1::1/128, ECMP via 2001:db8:137::11, 2001:db8:137::12" in out
    rows = {m.group(1): [int(n) for n in m.group(2).split()]
            for m in re.finditer(r"^(client\d IPv[46]|total IPv[46]) +([\d ]+)$", out, re.M)}
    assert set(rows) == {f"{who} {family}" for who in ("client1", "client2", "total") for family in ("IPv4", "IPv6")}
    for family in ("IPv4", "IPv6"):
        server1, server2, lb1, lb2 = rows[f"total {family}"]
        assert server1 + server2 == lb1 + lb2 == 40 and min(server1, server2, lb1, lb2) > 0, (family, rows)
    forwarded = re.findall(r"^lb\d \(afpacket\): forwarded \d+ packets \((\d+) IPv4, (\d+) IPv6\), drops none$", out, re.M)
    assert len(forwarded) == 2 and all(int(v4) > 0 and int(v6) > 0 for v4, v6 in forwarded), out
    assert out.rstrip().splitlines()[-2] == "all requests answered"
