"""Issue 11: the balancers announce their VIPs over BGP (ExaBGP) to the lab's router, a real BIRD 2 with
ECMP; the router's GRE follows its kernel's multipath route. Topologies 3 and 4, both engines. Issue 10:
IPv6 VIPs (/128) go over the same sessions, by the same rules (tests 1 and 3).

1. Sessions up, the router's route to the VIP names both balancers; real HTTP spread over both, every
   flow on one server (both balancers name the same backend for it).
2. A planned drain (ctl drain-balancer, or SIGTERM): every transfer completes; the drained balancer
   sees no new flow once the router withdrew it.
3. A service whose backends all fail their checks is withdrawn by every balancer, announced again when
   one comes back.
4. A peer that never answers and a session that flaps (the router disables it; the speaker is killed):
   logged and retried, and the data plane forwards throughout.

The balancer killed mid-stream is issue 5's test, in test_resilience_netns.py. Sessions only between
the lab's namespaces. Figures are printed (pytest -s).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from rusty_rail.lab.events import logged
from rusty_rail.lab.topology import ROUTER_AS, ROUTER_V
from tests.engine_netns import wait_for
from tests.lab_config import BGP_SECTION, SERVICE, SERVICE6, config_text
from tests.test_resilience_netns import BgpBalancers, by_name, lab_up, served

pytestmark = pytest.mark.netns


@pytest.mark.parametrize(("engine", "topology"), [("afpacket", 3), ("xdp", 3), ("afpacket", 4), ("xdp", 4)])
def test_sessions_ecmp_and_http_spread(engine: str, topology: int, tmp_path: Path) -> None:
    """Both families: the IPv6 VIP's /128 goes over the same (IPv4) sessions with each balancer's IPv6
    address as next hop, and its service's backends are the servers' IPv6 addresses (GRE over IPv6 from the
    router to the balancers and on to the servers)."""
    with lab_up(topology, bgp=True) as lab:
        lbs = BgpBalancers(lab, engine, tmp_path, ipv6=True)
        try:
            assert sorted(lab.vip_next_hops()) == [lb.address for lb in lab.balancers]
            assert sorted(lab.vip_next_hops(lab.vip6)) == [lb.address6 for lb in lab.balancers]
            for lb in lab.balancers:
                bgp = lbs.request(lb, {"cmd": "status"})["bgp"]
                (peer,) = bgp["peers"]
                assert (peer["address"], peer["as"], peer["state"], peer["prefixes"]) == (
                    ROUTER_V, ROUTER_AS, "up", [f"{lab.vip}/32", f"{lab.vip6}/128"])
                assert bgp["next_hop6"] == lb.address6
            servers = by_name(lab)
            via: dict[str, Counter[str]] = {}
            for vip, service in ((lab.vip, SERVICE), (lab.vip6, SERVICE6)):
                via[vip] = Counter()
                for client in lab.clients:
                    results = lab.traffic(n=30, client=client, vip=vip)
                    assert set(served(results)) == set(servers)
                    six = vip == lab.vip6
                    for r in results:
                        assert r.sport is not None
                        via[vip][lab.route_choice(client, r.sport, vip=vip) or "none"] += 1
                        # One flow, one server: both balancers (the one that carried it, and the other by its
                        # own table) name the server that answered.
                        source = f"[{client.address6}]:{r.sport}" if six else f"{client.address}:{r.sport}"
                        for lb in lab.balancers:
                            backend = lbs.request(lb, {"cmd": "explain", "client": source, "service": service,
                                                       "protocol": "tcp"})["backend"]
                            server = servers[r.server]
                            assert backend == (server.address6 if six else server.address)
            assert set(via[lab.vip]) == {lb.address for lb in lab.balancers}, via
            assert set(via[lab.vip6]) == {lb.address6 for lb in lab.balancers}, via
            counters = [lbs.request(lb, {"cmd": "status"})["counters"] for lb in lab.balancers]
            forwarded = [(c["by_family"]["ipv4"]["forwarded"], c["by_family"]["ipv6"]["forwarded"]) for c in counters]
            assert all(v4 > 0 and v6 > 0 for v4, v6 in forwarded), forwarded
            print(f"{engine} topology {topology}: sessions up, router next hops {lab.vip_next_hops()} and "
                  f"{lab.vip_next_hops(lab.vip6)}; HTTP flows split {dict(via[lab.vip])} and {dict(via[lab.vip6])} "
                  f"by the router, forwarded (IPv4, IPv6) {forwarded}")
            lbs.stop()
        except BaseException:
            lbs.show_log()
            raise


STREAMS, UPLOADS, STREAM_SECONDS = 32, 8, 6.0


@pytest.mark.parametrize(("engine", "how", "topology"),
                         [("afpacket", "ctl", 3), ("xdp", "sigterm", 3), ("xdp", "ctl", 4), ("afpacket", "sigterm", 4)])
def test_planned_drain(engine: str, how: str, topology: int, tmp_path: Path) -> None:
    with lab_up(topology, bgp=True) as lab:
        lbs = BgpBalancers(lab, engine, tmp_path)
        lb1, lb2 = lab.balancers
        client = lab.clients[0]
        try:
            with lab.streams(STREAMS, size=2_000_000, seconds=STREAM_SECONDS, uploads=UPLOADS) as streams:
                streams.wait("flowing", 30)
                on_lb1 = lab.route_choices(client, [e["sport"] for e in streams.of("connected")]).count(lb1.address)
                assert on_lb1 >= STREAMS // 5
                started = time.monotonic()
                if how == "ctl":
                    lbs.request(lb1, {"cmd": "drain-balancer"})
                else:
                    lbs.procs[lb1.name].send_signal(signal.SIGTERM)
                withdrawn = lbs.wait_next_hops([lb2.address], timeout=5)
                if how == "ctl":
                    # In-flight packets settle; from then on lb1 sees nothing, not even of flows it carried.
                    settled = _settled(lambda: lbs.request(lb1, {"cmd": "status"})["counters"]["forwarded"])
                new = lab.traffic(n=20)
                assert [r.error for r in new if not r.ok] == []
                if how == "ctl":
                    for r in new:  # lb1 never saw them: no connection entry
                        reason = lbs.request(lb1, {"cmd": "explain", "client": f"{client.address}:{r.sport}",
                                                   "service": SERVICE, "protocol": "tcp"})["reason"]
                        assert reason != "connection entry", r
                    assert lbs.request(lb1, {"cmd": "status"})["counters"]["forwarded"] == settled
                streams.wait("finished", STREAM_SECONDS + 40)
                done = streams.of("done")
            ok = sum(e["ok"] for e in done)
            assert len(done) == STREAMS and ok == STREAMS, [e for e in done if not e["ok"]]
            if how == "sigterm":
                assert lbs.procs.pop(lb1.name).wait(20) == 0
                (drained,) = logged(lbs.log_paths[lb1.name], "drained")
                assert drained["quiet"] is True  # it stopped because the traffic had stopped arriving
                withdraws = logged(lbs.log_paths[lb1.name], "bgp_withdraw")
                assert [w["reason"] for w in withdraws] == ["stopping: withdrawn before the data plane lets go"]
                tail = f"lb1 exited after draining {drained['seconds']:.2f} s (traffic stopped)"
            else:
                lbs.request(lb1, {"cmd": "undrain-balancer"})
                lbs.wait_next_hops([lb1.address, lb2.address], timeout=10)
                tail = "undrained: the router has both next hops again"
            print(f"{engine} drain by {how}: lb1 carried {on_lb1} of {STREAMS} transfers; the router withdrew it "
                  f"{withdrawn * 1000:.0f} ms after the {how}; {ok}/{STREAMS} transfers completed; 20 new flows, "
                  f"none through lb1; {tail}")
            lbs.stop()
        except BaseException:
            lbs.show_log()
            raise


def _settled(read: object, quiet_s: float = 0.3, timeout: float = 5.0) -> int:
    """A counter's value once it has not moved for quiet_s."""
    value, since = read(), time.monotonic()  # type: ignore[operator]
    deadline = since + timeout
    while time.monotonic() - since < quiet_s:
        assert time.monotonic() < deadline, "the counter never settled"
        time.sleep(0.05)  # sampling a counter, bounded by the deadline
        now = read()  # type: ignore[operator]
        if now != value:
            value, since = now, time.monotonic()
    return int(value)


def test_service_without_healthy_backends_is_withdrawn(tmp_path: Path) -> None:
    """The same rule for both families: each VIP's route goes when its service's last backend fails its
    checks, and comes back with one healthy backend."""
    with lab_up(4, bgp=True) as lab:
        lbs = BgpBalancers(lab, "afpacket", tmp_path, ipv6=True)
        prefixes = {f"{lab.vip}/32", f"{lab.vip6}/128"}
        try:
            for s in lab.servers:
                lab.stop_httpd(s)
            gone = lbs.wait_next_hops([], timeout=10)
            gone6 = lbs.wait_next_hops([], timeout=10, vip=lab.vip6)
            for lb in lab.balancers:
                withdraws = logged(lbs.log_paths[lb.name], "bgp_withdraw")
                assert {w["prefix"] for w in withdraws} == prefixes and len(withdraws) == 2, withdraws
                assert all("no healthy backend" in w["reason"] for w in withdraws), withdraws
            for vip in (lab.vip, lab.vip6):
                assert not lab.traffic(n=1, timeout=0.5, vip=vip)[0].ok  # the router has no route to the VIP
            lab.start_httpd(lab.servers[0])
            back = lbs.wait_next_hops([lb.address for lb in lab.balancers], timeout=10)
            lbs.wait_next_hops([lb.address6 for lb in lab.balancers], timeout=10, vip=lab.vip6)
            for vip in (lab.vip, lab.vip6):
                assert set(served(lab.traffic(n=10, vip=vip))) == {lab.servers[0].name}
            for lb in lab.balancers:
                announces = logged(lbs.log_paths[lb.name], "bgp_announce")
                assert len(announces) == 4 and {a["prefix"] for a in announces[2:]} == prefixes, announces
                assert all("1 healthy backend" in a["reason"] for a in announces[2:]), announces
            print(f"both backends' httpd stopped: every balancer withdrew both VIPs, gone from the router after "
                  f"{gone:.2f} s (IPv4) and {gone + gone6:.2f} s (IPv6); one back: announced again, both next hops "
                  f"after {back:.2f} s")
            lbs.stop()
        except BaseException:
            lbs.show_log()
            raise


UNREACHABLE_PEER = "192.168.137.99"  # on the lab's bridge, nobody there


def test_unreachable_peer_and_flapping_session(tmp_path: Path) -> None:
    """The router's static route keeps traffic on lb1 whatever BGP does; lb1's session flaps (the router
    disables it, its speaker stalls past the hold time, its speaker is killed) and one of its peers never answers: all logged and retried, the
    daemon keeps running, and every request through it succeeds."""
    with lab_up(3) as lab:
        lb1 = lab.balancers[0]
        lab.set_targets([lb1.address])
        extra_peer = f'[[bgp.peers]]\naddress = "{UNREACHABLE_PEER}"\nas = {ROUTER_AS}\n'
        lbs = BgpBalancers(lab, "xdp", tmp_path, balancers=[lb1], bgp=BGP_SECTION + extra_peer)
        proc, log_path = lbs.procs[lb1.name], lbs.log_paths[lb1.name]

        def peers() -> dict[str, str]:
            return {p["address"]: p["state"] for p in lbs.request(lb1, {"cmd": "status"})["bgp"]["peers"]}

        try:
            with lab.pool(10) as pool:
                assert all(r.ok for r in pool.get())
                for flap in range(2):
                    lab.bird.sock.command("disable lb1")
                    lbs.wait_next_hops([], timeout=5)
                    assert all(r.ok for r in pool.get()), f"flap {flap}: down"
                    lab.bird.sock.command("enable lb1")
                    lbs.wait_next_hops([lb1.address], timeout=20)
                    assert all(r.ok for r in pool.get()), f"flap {flap}: up again"
                speaker = lbs.request(lb1, {"cmd": "status"})["bgp"]["speaker"]
                # The speaker stalls past the hold time (a starved process): BIRD's hold timer expires and it
                # drops the session; the lab's router takes the balancer back within seconds of the stall's end.
                os.kill(speaker["pid"], signal.SIGSTOP)
                try:
                    lbs.wait_next_hops([], timeout=10)
                finally:
                    os.kill(speaker["pid"], signal.SIGCONT)
                stalled_at = time.monotonic()
                lbs.wait_next_hops([lb1.address], timeout=20)
                back_after_stall = time.monotonic() - stalled_at
                assert all(r.ok for r in pool.get())
                os.kill(speaker["pid"], signal.SIGKILL)  # the speaker dies; the daemon starts another
                lbs.wait_next_hops([], timeout=5)
                assert all(r.ok for r in pool.get())
                lbs.wait_next_hops([lb1.address], timeout=30)
                assert all(r.ok for r in pool.get())
            status = lbs.request(lb1, {"cmd": "status"})["bgp"]
            assert status["speaker"]["restarts"] == 1 and status["speaker"]["pid"] != speaker["pid"]
            states = peers()
            assert states[ROUTER_V] == "up" and states[UNREACHABLE_PEER] != "up", states
            assert proc.poll() is None
            sessions = [(e["peer"], e["state"]) for e in logged(log_path, "bgp_session")]
            assert sessions.count((ROUTER_V, "down")) >= 2, sessions
            # The peer that never answers: each attempt fails (a connect timeout), is logged, and is tried again.
            wait_for(timeout=30, interval=0.2, what="two failed attempts on the unreachable peer, logged", predicate=lambda: [
                (e["peer"], e["state"]) for e in logged(log_path, "bgp_session")].count((UNREACHABLE_PEER, "down")) >= 2)
            sessions = [(e["peer"], e["state"]) for e in logged(log_path, "bgp_session")]
            assert logged(log_path, "bgp_speaker_restart")
            print(f"two flaps, a stalled speaker (announced again {back_after_stall:.2f} s after it went on) and a "
                  f"killed speaker: all 10 pooled connections served "
                  f"throughout; sessions logged {dict(Counter(sessions))}; peer {UNREACHABLE_PEER} still not up")
            (report,) = lbs.stop()
            assert report["counters"]["forwarded"] > 0
        except BaseException:
            lbs.show_log()
            raise


def test_hitless_restart_keeps_the_route(tmp_path: Path) -> None:
    """`rusty-rail restart` (XDP): the old daemon's speaker is held and the new daemon takes it over, so
    the router's route to the VIP never loses the balancer; a plain stop afterwards withdraws it."""
    with lab_up(2, bgp=True) as lab:
        lb = lab.balancers[0]
        config, socket_path = tmp_path / "lb1.toml", tmp_path / "lb1.sock"
        config.write_text(config_text("xdp", socket_path, [s.address for s in lab.servers], bgp=BGP_SECTION))
        old_log, new_log = tmp_path / "old.log", tmp_path / "new.log"
        argv = [lab.python, "-m", "rusty_rail", "run", "--config", str(config)]
        with old_log.open("ab") as log:  # nsenter --net: the handover pins live in the host's bpffs
            old = lab.start_balancer(lb, argv, host_bpffs=True, stdout=log, stderr=log)
        new = None
        try:
            wait_for(timeout=30, interval=0.01, what="the VIP announced",
                     predicate=lambda: lab.vip_next_hops() == [lb.address])
            seen: list[list[str]] = []
            stop = threading.Event()

            def watch() -> None:
                while not stop.is_set():
                    seen.append(lab.vip_next_hops())
                    time.sleep(0.005)  # a sampling period, not a synchronisation

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            try:
                with new_log.open("ab") as log:
                    new = lab.popen(lb.namespace, [lab.python, "-m", "rusty_rail", "restart", "--config", str(config)],
                                    env=lab.balancer_env(lb), host_bpffs=True, stdout=log, stderr=log)
                assert old.wait(30) == 75
                wait_for(timeout=30, interval=0.05, what="the new daemon took the speaker over",
                         predicate=lambda: logged(new_log, "bgp_speaker_adopted"))
                results = lab.traffic(n=10)
                assert [r.error for r in results if not r.ok] == []
            finally:
                stop.set()
                watcher.join(5)
            assert seen and all(hops == [lb.address] for hops in seen), Counter(map(tuple, seen))
            assert not logged(new_log, "bgp_announce")  # nothing to announce: the held speaker had the route
            print(f"restart: the router's route to the VIP named {lb.address} in all {len(seen)} samples "
                  f"through the handover; the new daemon adopted the old one's speaker")
            new.send_signal(signal.SIGTERM)
            assert new.wait(30) == 0
            assert lab.vip_next_hops() == []
        except BaseException:
            for path in (old_log, new_log):
                if path.exists():
                    print(f"-- {path.name}:\n{path.read_text(errors='replace')[-4000:]}")
            raise
