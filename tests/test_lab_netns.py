"""The lab in real namespaces: build/teardown, and router -> server GRE carrying real TCP with DSR.

Every test uses its own namespace prefix and tears its lab down in a `finally`, so a failing test
leaves nothing behind. Nothing sleeps: servers listen before up() returns, sniffers queue frames.
"""

from __future__ import annotations

import json
import itertools
import os
import shlex
import signal
import shutil
import subprocess
from pathlib import Path
import sys
import time
from collections.abc import Iterator

import pytest
from pyroute2 import IPRoute

from rusty_rail import decap
from rusty_rail.core.constants import BPFFS
from rusty_rail.lab import Lab, netns
from rusty_rail.lab.events import logged
from rusty_rail.lab.router import pin_dir
from rusty_rail.lab.sniff import Sniffer
from tests.engine_netns import wait_for

pytestmark = pytest.mark.netns

_counter = itertools.count()


@pytest.fixture
def prefix() -> Iterator[str]:
    p = f"rt{os.getpid() % 100000}x{next(_counter)}-"
    try:
        yield p
    finally:
        Lab(1, p).down()  # even if the test failed half-way through up()
        assert netns.with_prefix(p) == []


def _host_links() -> list[str]:
    return subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout.split("\n")


def _names(lines: list[str]) -> set[str]:
    return {line.split(":")[1].strip() for line in lines if line}


@pytest.mark.parametrize("topology", [1, 2, 3, 4])
def test_up_down_leaves_nothing(prefix: str, topology: int) -> None:
    before = _names(_host_links())
    lab = Lab(topology, prefix)
    try:
        lab.up()
        assert set(netns.with_prefix(prefix)) == set(lab.plan.namespaces)
        assert (pin_dir(prefix) / "rr_encap_cfg").exists()
        st = lab.status()
        assert all(ns["exists"] for ns in st["namespaces"].values())
        assert all(st["decap"].values())
        assert sorted(st["router"]["static_targets"]) == [b.address for b in lab.balancers]
        assert sorted(st["router"]["static_targets6"]) == [b.address6 for b in lab.balancers]
        assert st["router"]["vip_next_hops"] == st["router"]["vip6_next_hops"] == []  # no balancer announces
        assert (st["router"]["service6"], st["router"]["src6"], st["router"]["outer6"]) == (
            "2001:db8:1::/64", lab.router.address6, "ipv6")
        assert st["logs"] == {"dir": str(lab.log_dir),
                              "files": sorted(["router-bird.log", *(f"{s.name}-httpd.log" for s in lab.servers)])}
        assert _names(_host_links()) == before, "the lab must not create links in the host namespace"
        with IPRoute(netns=lab.plan.net_ns) as ipr:  # bursts toward a native XDP balancer queue, not drop
            kinds = {q["index"]: q.get_attr("TCA_KIND") for q in ipr.get_qdiscs() if q["parent"] == 0xFFFFFFFF}
            assert [kinds[ipr.link_lookup(ifname=b.bridge_port)[0]] for b in lab.balancers] == ["pfifo"] * len(lab.balancers)
    finally:
        lab.down()
    assert netns.with_prefix(prefix) == []
    assert not pin_dir(prefix).exists()
    assert not lab.log_dir.exists()
    lab.down()  # idempotent


def test_down_cleans_up_after_a_crashed_run(prefix: str) -> None:
    crashed = Lab(2, prefix).up()
    server_pids = [p for s in crashed.servers for p in netns.pids(s.namespace)]
    assert server_pids
    del crashed  # the process "died": nobody called down()
    Lab(1, prefix).down()  # a different topology with the same prefix finds it all
    assert netns.with_prefix(prefix) == []
    for pid in server_pids:
        assert _gone(pid)


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody has reaped yet."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("topology", [1, 2])
def test_direct_gre_carries_tcp_with_dsr(prefix: str, topology: int) -> None:
    with Lab(topology, prefix, direct=True) as lab:
        client = lab.clients[0]
        targets = [s.address for s in lab.servers]
        assert sorted(lab.targets()) == targets  # BIRD's static multipath route, in the kernel's table
        sniff = {h.name: Sniffer(h.namespace, h.device) for h in (client, lab.router, *lab.servers)}
        try:
            results = lab.traffic(n=20)
            frames = {name: s.frames() for name, s in sniff.items()}
        finally:
            for s in sniff.values():
                s.close()

        assert [r.error for r in results if not r.ok] == []
        by_address = {s.address: s.name for s in lab.servers}
        for r in results:  # the encapsulator followed the kernel's multipath choice for each flow
            assert r.sport is not None
            expected = lab.route_choice(client, r.sport)
            assert expected is not None and r.server == by_address[expected]
        # asked for all flows at once on one netlink socket, the kernel answers the same
        assert lab.route_choices(client, [r.sport for r in results]) == [lab.route_choice(client, r.sport) for r in results]
        assert {r.server for r in results} == {s.name for s in lab.servers}  # 20 flows reach both

        vip = lab.vip
        # Client -> VIP leaves the router in GRE toward a server; nothing comes back in GRE.
        r_frames = frames["router"]
        assert any(f.outgoing and f.proto == 47 and f.inner == (6, client.address, vip) for f in r_frames)
        assert not any(not f.outgoing and f.proto == 47 for f in r_frames)
        # The replies reach the router as plain TCP from the VIP (DSR), and the client too.
        assert any(not f.outgoing and f.proto == 6 and (f.src, f.dst) == (vip, client.address) for f in r_frames)
        c_frames = frames["client1"]
        assert any(not f.outgoing and f.proto == 6 and f.src == vip for f in c_frames)
        assert not any(f.proto == 47 for f in c_frames)
        for s in lab.servers:
            s_frames = frames[s.name]
            assert any(not f.outgoing and f.proto == 47 and f.dst == s.address and f.inner == (6, client.address, vip)
                       for f in s_frames)
            assert not any(f.outgoing and f.proto == 47 for f in s_frames)  # replies are never tunnelled
            assert any(f.outgoing and f.proto == 6 and (f.src, f.dst) == (vip, client.address) for f in s_frames)

        stats = lab.maps.stats()
        assert stats["encapsulated"] > 0
        assert stats["no_route"] == stats["no_gateway"] == stats["room_fail"] == 0


@pytest.mark.parametrize("outer6", ["ipv6", "ipv4"])
def test_direct_gre_carries_ipv6_with_dsr(prefix: str, outer6: str) -> None:
    """IPv6 HTTP through the router's GRE in either outer family, decapsulated by the servers, answered
    directly (DSR); 1 MB each way, the uploads crossing the encapsulator as GSO packets."""
    with Lab(2, prefix, direct=True, outer6=outer6) as lab:
        client, vip6 = lab.clients[0], lab.vip6
        sniff = {h.name: Sniffer(h.namespace, h.device) for h in (lab.router, *lab.servers)}
        try:
            results = lab.traffic(n=20, vip=vip6)
            frames = {name: s.frames() for name, s in sniff.items()}
        finally:
            for s in sniff.values():
                s.close()
        assert [r.error for r in results if not r.ok] == []
        by_address = {s.address6: s.name for s in lab.servers}
        for r in results:  # the encapsulator followed the kernel's IPv6 multipath choice for each flow
            assert r.sport is not None
            hop = lab.route_choice(client, r.sport, vip=vip6)
            assert hop is not None and r.server == by_address[hop]
        assert {r.server for r in results} == {s.name for s in lab.servers}

        version = 6 if outer6 == "ipv6" else 4
        outer_to = {s.name: s.address6 if outer6 == "ipv6" else s.address for s in lab.servers}
        wrapped = [f for f in frames["router"] if f.outgoing and f.proto == 47]
        assert wrapped and all(f.version == version and f.inner == (6, client.address6, vip6) for f in wrapped)
        assert {f.dst for f in wrapped} == set(outer_to.values())
        assert any(not f.outgoing and f.version == 6 and f.proto == 6 and (f.src, f.dst) == (vip6, client.address6)
                   for f in frames["router"])  # the replies: plain IPv6 from the VIP
        for s in lab.servers:
            s_frames = frames[s.name]
            assert any(not f.outgoing and f.proto == 47 and f.dst == outer_to[s.name] for f in s_frames)
            assert not any(f.outgoing and f.proto == 47 for f in s_frames)  # replies are never tunnelled
            assert any(f.outgoing and f.version == 6 and f.proto == 6 and (f.src, f.dst) == (vip6, client.address6)
                       for f in s_frames)

        wire_before = lab.maps.stats()["encapsulated_wire"]
        down = lab.traffic(n=1, path="/bytes/1000000", timeout=10, vip=vip6)
        up = lab.traffic(n=1, upload=1_000_000, timeout=10, vip=vip6)
        assert [r.error for r in down + up if not r.ok] == [] and down[0].size == 1_000_000
        stats = lab.maps.stats()
        assert stats["encapsulated_wire_ipv6"] == stats["encapsulated_wire"] > wire_before
        assert stats["outer_ipv6"] == (stats["encapsulated"] if outer6 == "ipv6" else 0)
        assert stats["encapsulated_wire"] > 2 * stats["encapsulated"]  # GSO packets, cut after the encap
        assert stats["no_route"] == stats["no_gateway"] == stats["room_fail"] == 0


def _tx_packets(ns: str, device: str) -> int:
    with IPRoute(netns=ns) as ipr:
        (link,) = ipr.get_links(ifname=device)
    return link.get("IFLA_STATS64")["tx_packets"]


def test_direct_gre_large_transfers_both_ways(prefix: str) -> None:
    with Lab(1, prefix, direct=True) as lab:
        down = lab.traffic(n=2, path="/bytes/1000000", timeout=10)
        sent_before = _tx_packets(lab.router.namespace, lab.router.device)
        wire_before = lab.maps.stats()["encapsulated_wire"]
        up = lab.traffic(n=2, upload=1_000_000, timeout=10)  # GSO-sized segments through the encap
        assert [r.error for r in down + up if not r.ok] == []
        assert [r.size for r in down] == [1_000_000, 1_000_000]
        # The uploads crossed the encap as GSO super-packets: more packets on the wire than skbs, and
        # the wire count is what the router's device sent (give or take its own IPv6/ARP chatter).
        stats = lab.maps.stats()
        assert stats["encapsulated_wire"] > 2 * stats["encapsulated"] > 0
        sent = _tx_packets(lab.router.namespace, lab.router.device) - sent_before
        assert 0 <= sent - (stats["encapsulated_wire"] - wire_before) <= 3


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
def test_ensure_bpffs_mounts_when_nothing_is_there() -> None:
    """In a mount namespace of its own (the host's bpffs stays as it is): with nothing mounted at
    BPFFS, the first call mounts bpffs there and the second leaves it alone."""
    code = "from rusty_rail.lab.router import ensure_bpffs; ensure_bpffs(); ensure_bpffs()"
    script = (f"while umount {BPFFS} 2>/dev/null; do :; done; grep -c ' {BPFFS} ' /proc/self/mounts; "
              f"{shlex.quote(sys.executable)} -c {shlex.quote(code)} && grep ' {BPFFS} ' /proc/self/mounts")
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                         capture_output=True, text=True).stdout.splitlines()
    assert out[0] == "0"  # unmounted
    assert [line.split()[:3] for line in out[1:]] == [["bpf", BPFFS, "bpf"]]


def test_no_route_and_no_next_hop(prefix: str) -> None:
    """No route to the VIPs: the router's kernel refuses the packet before the encapsulator sees it. A
    route without a next-hop address (on-link): nothing to tunnel to, dropped and counted."""
    with Lab(1, prefix, direct=True) as lab:
        lab.set_targets([])
        before = lab.maps.stats()
        (r,) = lab.traffic(n=1, timeout=0.5)
        assert not r.ok
        assert lab.maps.stats() == before
        with IPRoute(netns=lab.router.namespace) as ipr:
            idx = ipr.link_lookup(ifname=lab.router.device)[0]
            # On-link, with a neighbour entry so the kernel hands the packet on without ARPing first.
            ipr.neigh("add", dst=lab.vip, lladdr="02:72:72:ff:00:01", ifindex=idx, state="permanent")
            ipr.route("add", dst=lab.vip, dst_len=32, oif=idx)
            (r,) = lab.traffic(n=1, timeout=0.5)
            assert not r.ok
            assert lab.maps.stats()["no_gateway"] > 0
            ipr.route("del", dst=lab.vip, dst_len=32, oif=idx)
        lab.route_to_servers()
        (r,) = lab.traffic(n=1)
        assert r.ok


def test_decap_cli_detach_and_attach(prefix: str, capsys: pytest.CaptureFixture[str]) -> None:
    with Lab(1, prefix, direct=True) as lab:
        s = lab.servers[0]
        assert decap.main(["--netns", s.namespace, "--device", s.device, "status"]) == 0
        assert "attached (prog id" in capsys.readouterr().out
        assert decap.main(["--netns", s.namespace, "--device", s.device, "detach"]) == 0
        assert "not attached" in capsys.readouterr().out
        (r,) = lab.traffic(n=1, timeout=0.5)
        assert not r.ok  # without decap the server cannot take GRE
        assert decap.main(["--netns", s.namespace, "--device", s.device, "attach"]) == 0
        (r,) = lab.traffic(n=1)
        assert r.ok


def _logs(lab: Lab, size: int = 3000) -> str:
    return "\n".join(f"-- {lb.name}:\n{lab.balancer_log(lb).read_text(errors='replace')[-size:]}"
                     for lb in lab.balancers if lab.balancer_log(lb).exists())


def _wait_until_served(lab: Lab, deadline_s: float) -> None:
    """Poll (one request at a time) until the balancers forward, or fail at the deadline."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if lab.traffic(n=1, timeout=0.5)[0].ok:
            return
    pytest.fail(f"the balancers did not start forwarding before the deadline\n{_logs(lab)}")


def stop_balancers(procs: list[subprocess.Popen], lab: Lab | None = None, logs: list[Path] | None = None) -> list[dict]:
    """SIGTERM each balancer and return the "stopped" event each logs (on stderr) as it exits: from
    `logs[i]` when given (the file its stderr went to), else from the lab's default log of
    lab.balancers[i]."""
    for p in procs:
        p.terminate()
    reports = []
    for i, p in enumerate(procs):
        if logs is not None:
            path = logs[i]
        else:
            assert lab is not None, "give the lab (its default logs) or the log files"
            path = lab.balancer_log(lab.balancers[i])
        assert p.wait(timeout=20) == 0, f"balancer {i} exited {p.returncode}\n{path.read_text(errors='replace')[-3000:]}"
        stopped = logged(path, "stopped")
        assert stopped, f"no stopped event in {path}"
        reports.append(stopped[-1])
    return reports


@pytest.mark.parametrize("engine", ["afpacket", "xdp"])
@pytest.mark.parametrize("topology", [1, 2, 3, 4])
def test_through_balancers(prefix: str, topology: int, engine: str) -> None:
    with Lab(topology, prefix) as lab:
        procs = lab.start_balancers(env={"RR_ENGINE": engine})  # output: lab.balancer_log(lb)
        _wait_until_served(lab, 15)
        wrapped_before = lab.maps.stats()["encapsulated_wire"]  # a first SYN may beat the balancer's start
        # The balancer's own host stays reachable while it balances, over both families: ping (ICMP,
        # ICMPv6), and TCP to a local service.
        lb = lab.balancers[0]
        listener = lab.popen(lb.namespace, [lab.python, "-m", "rusty_rail.lab.probe", "listen", "2222"], stdout=subprocess.PIPE)
        assert listener.stdout is not None and listener.stdout.readline() == b"listening\n"
        for client in lab.clients:
            for vip in (lab.vip, lab.vip6):  # IPv6: in GRE over IPv6 to the balancers, over IPv4 to the servers
                results = lab.traffic(n=20, client=client, vip=vip)
                assert [r.error for r in results if not r.ok] == []
                assert {r.server for r in results} == {s.name for s in lab.servers}
            lab.run(lab.router.namespace, [lab.python, "-m", "rusty_rail.lab.probe", "reach", "2222", lb.address,
                                           lb.address6])
        assert all(p.poll() is None for p in procs), "a balancer exited"
        stats = lab.maps.stats()  # wire packets, as the balancers count
        reports = stop_balancers(procs, lab)
        forwarded = [r["counters"]["forwarded"] for r in reports]
        # Every packet the router wrapped once the balancers were up was forwarded, and nothing else
        # was: the servers' replies (as many packets as the requests) never passed a balancer (DSR).
        # The IPv6 ones too, all of which were sent after the first IPv4 request passed.
        assert stats["encapsulated_wire"] - wrapped_before <= sum(forwarded) <= stats["encapsulated_wire"]
        assert sum(r["counters"]["forwarded_ipv6"] for r in reports) == stats["encapsulated_wire_ipv6"] > 0
        assert all(r["engine"] == engine for r in reports)
        if len(procs) > 1:
            assert all(f > 0 for f in forwarded), "ECMP should use both balancers"


def test_encap_resolves_unknown_neighbours(prefix: str) -> None:
    with Lab(2, prefix, direct=True) as lab:
        # Forget the entries: the program must fall back to the kernel's ARP. Any packet of a server to
        # the router (an ARP request of its own, a reply on its way) teaches the router its address again
        # before ours arrives now and then, so forget and send until a packet met no entry.
        for _ in range(5):
            for s in lab.servers:
                lab.run(lab.router.namespace, ["ip", "neigh", "del", s.address, "dev", lab.router.device], check=False)
            results = lab.traffic(n=10)
            assert [r.error for r in results if not r.ok] == []
            if lab.maps.stats()["no_neigh"] > 0:
                break
        assert lab.maps.stats()["no_neigh"] > 0


def test_two_workers_keep_each_flow_on_one_worker(prefix: str) -> None:
    """--workers 2: real TCP still works (a flow split across workers would still be served by the
    same Maglev slot, but its connection entry would live twice; the fanout test in
    test_engine_afpacket.py checks placement), and both workers' counters add up in the report."""
    with Lab(2, prefix) as lab:
        procs = lab.start_balancers(env={"RR_ENGINE": "afpacket", "RR_WORKERS": "2"})
        _wait_until_served(lab, 15)
        results = lab.traffic(n=40)
        assert [r.error for r in results if not r.ok] == []
        assert {r.server for r in results} == {s.name for s in lab.servers}
        encapsulated = lab.maps.stats()["encapsulated_wire"]
        (report,) = stop_balancers(procs, lab)
        assert report["engine_counters"]["workers"] == 2
        assert report["counters"]["forwarded"] <= encapsulated
        assert report["counters"]["forwarded"] >= len(results) * 5  # SYN, ACK, request, ACKs, FIN per request


def test_cli_up_returns_through_a_pipe(prefix: str) -> None:
    """`rusty-rail lab up ... | tail` ends: the servers and balancers it leaves running write to files
    in the lab's log directory, not to the pipe."""
    cli = [sys.executable, "-m", "rusty_rail", "lab", "--prefix", prefix]
    up = subprocess.run([*cli, "up", "--topology", "2", "--balancers", "--outer6", "ipv4"], stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True, timeout=60)
    assert up.returncode == 0, up.stdout
    lab = Lab.existing(prefix)
    assert f"logs: {lab.log_dir}" in up.stdout and lab.outer6 == "ipv4"
    st = json.loads(subprocess.run([*cli, "status"], capture_output=True, text=True, check=True).stdout)
    assert st["logs"]["dir"] == str(lab.log_dir) and st["router"]["outer6"] == "ipv4"
    # IPv6 in GRE over IPv4 from the router, through the balancer (started in the background: poll until
    # it forwards), on to the servers' IPv4 addresses.
    wait_for(lambda: lab.traffic(n=1, timeout=0.5, vip=lab.vip6)[0].ok, timeout=15, interval=0.05,
             what="the balancer forwarding IPv6")
    traffic = subprocess.run([*cli, "traffic", "--ipv6", "-n", "20"], capture_output=True, text=True, timeout=60)
    assert traffic.returncode == 0 and "server1" in traffic.stdout and "server2" in traffic.stdout, traffic.stdout
    stats = lab.maps.stats()
    assert stats["encapsulated_wire_ipv6"] > 0 and stats["outer_ipv6"] == 0
    assert set(st["logs"]["files"]) == {"lb1.log", "router-bird.log", "server1-httpd.log", "server2-httpd.log"}
    assert all(st["namespaces"][lb.namespace]["pids"] for lb in lab.balancers)  # still running, detached
    subprocess.run([*cli, "down"], check=True, timeout=60)
    assert netns.with_prefix(prefix) == [] and not lab.log_dir.exists()


def test_stop_kills_a_process_that_ignores_sigterm() -> None:
    """netns.stop: SIGTERM, then SIGKILL after the timeout; a process already gone is left alone."""
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, sys, time\n"
                                 "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(60)"],
                                stdout=subprocess.PIPE)
    assert stubborn.stdout is not None and stubborn.stdout.readline() == b"ready\n"
    netns.stop(stubborn, timeout=0.5)
    assert stubborn.returncode == -signal.SIGKILL
    netns.stop(stubborn)  # already reaped: nothing to do
    assert stubborn.returncode == -signal.SIGKILL
