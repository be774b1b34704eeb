"""Issue 5: balancers share nothing yet agree, and connections survive balancers and backends coming
and going — with real TCP through the lab, in numbers, on both engines.

1. Two balancers with the same configuration send every flow to the same backend: connections opened
   through lb1 alone keep working, and keep their server, when the router switches to lb2 alone (lb2
   never saw their SYN); many short flows, asked of both balancers with `ctl explain`, get one answer.
2. A balancer killed (SIGKILL) mid-stream: its BGP session dies with it, and the lab's router (BIRD 2,
   ECMP over the balancers' announced routes) drops it as a next hop; the transfers it carried finish,
   byte for byte, through the other one. No health poller: only what a real router does.
3. A backend added at run time (`ctl add`): no established connection breaks; new flows reach the new
   backend in about its share.
4. A backend's HTTP server killed, with health checks: it leaves within fall x interval (+ margin), and
   only its flows move.

Every test has its own namespace prefix, sockets and files; the Lab context manager tears everything
down, also on failure. Nothing sleeps to synchronise: events are waited for, state polled, with deadlines.
Figures are printed (pytest -s shows them).
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from rusty_rail.control.ctl import ControlClient
from rusty_rail.lab import Lab, netns
from rusty_rail.lab.router import pin_dir
from rusty_rail.lab.topology import Host
from tests.lab_config import BGP_SECTION, FALL, INTERVAL, SERVICE, TABLE_SIZE, config_text
from tests.engine_netns import wait_for
from tests.test_lab_netns import stop_balancers

pytestmark = pytest.mark.netns

ENGINES = pytest.mark.parametrize("engine", ["afpacket", "xdp"])

_counter = itertools.count()


@contextmanager
def lab_up(topology: int, bgp: bool = False) -> Iterator[Lab]:
    prefix = f"rs{os.getpid() % 100000}x{next(_counter)}-"
    try:
        with Lab(topology, prefix, bgp=bgp) as lab:
            yield lab
    finally:
        Lab(1, prefix).down()  # even if up() failed half-way
        assert netns.with_prefix(prefix) == [] and not pin_dir(prefix).exists()


def wait_served_by_each(lab: Lab, deadline_s: float = 20.0) -> None:
    """Point the router at each balancer alone until one request passes; then at all of them."""
    for lb in lab.balancers:
        lab.set_targets([lb.address])
        wait_for(timeout=deadline_s, interval=0.02, what=f"{lb.name} forwarding", predicate=lambda: lab.traffic(n=1, timeout=0.5)[0].ok)
    lab.route_to_balancers()


class Balancers:
    """Environment-configured balancers (open mode), each with its own control socket."""

    def __init__(self, lab: Lab, engine: str, tmp_path: Path) -> None:
        self.lab = lab
        self.engine = engine
        self.log_paths = {lb.name: tmp_path / f"{lb.name}.log" for lb in lab.balancers}
        self.sockets = {lb.name: str(tmp_path / f"{lb.name}.sock") for lb in lab.balancers}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        for lb in lab.balancers:
            self.start(lb)
        try:
            wait_served_by_each(lab)
        except BaseException:
            self.show_log()
            raise

    def start(self, lb: Host) -> None:
        env = {"RR_ENGINE": self.engine, "RR_CONTROL_SOCKET": self.sockets[lb.name], "RR_TABLE_SIZE": str(TABLE_SIZE)}
        with self.log_paths[lb.name].open("ab") as log:
            self.procs[lb.name] = self.lab.start_balancer(lb, env=env, stdout=log, stderr=log)

    def show_log(self) -> None:
        for name, path in self.log_paths.items():
            if path.exists():
                print(f"-- {name}:\n{path.read_text(errors='replace')[-3000:]}")

    def request(self, lb: Host, request: dict[str, Any]) -> Any:
        with ControlClient(self.sockets[lb.name]) as client:
            return client.request(request)

    def explain(self, lb: Host, client: str, sport: int | None) -> tuple[str | None, str]:
        assert sport is not None
        r = self.request(lb, {"cmd": "explain", "client": f"{client}:{sport}", "service": SERVICE, "protocol": "tcp"})
        return r["backend"], r["reason"]

    def forwarded(self, lb: Host) -> int:
        return int(self.request(lb, {"cmd": "status"})["counters"]["forwarded"])

    def stop(self, names: list[str] | None = None) -> list[dict[str, Any]]:
        names = names or list(self.procs)
        procs = [self.procs.pop(n) for n in names]
        reports = stop_balancers(procs, logs=[self.log_paths[n] for n in names])
        assert all(r["engine"] == self.engine for r in reports)
        return reports


def by_name(lab: Lab) -> dict[str | None, Host]:
    """Servers by name; keyed `str | None` as Result.server is (a failed request has no server)."""
    return {s.name: s for s in lab.servers}


def served(results: list[Any]) -> Counter[str]:
    assert [r.error for r in results if not r.ok] == []
    return Counter(r.server for r in results)


# -- 1. balancers agree without sharing anything ----------------------------------------------


@ENGINES
@pytest.mark.parametrize("topology", [3, 4])
def test_balancers_agree_without_shared_state(engine: str, topology: int, tmp_path: Path) -> None:
    with lab_up(topology) as lab:
        lbs = Balancers(lab, engine, tmp_path)
        try:
            lb1, lb2 = lab.balancers
            servers = by_name(lab)

            # Long-lived connections, opened while the router sends everything to lb1.
            lab.set_targets([lb1.address])
            pools = {c.address: lab.pool(20, client=c) for c in lab.clients}
            try:
                first = {(a, r.sport): r.server for a, p in pools.items() for r in p.get()}
                assert None not in first.values() and set(first.values()) == set(servers), first
                for (client, sport), server in first.items():
                    # lb1 holds their connection entries; lb2 has never seen them, and agrees anyway.
                    assert lbs.explain(lb1, client, sport) == (servers[server].address, "connection entry")
                    backend, reason = lbs.explain(lb2, client, sport)
                    assert backend == servers[server].address and reason != "connection entry", (backend, reason)

                lab.set_targets([lb2.address])  # lb1 gets nothing from now on
                lb1_before = lbs.forwarded(lb1)
                for _ in range(2):
                    again = {(a, r.sport): r for a, p in pools.items() for r in p.get()}
                    assert [r.error for r in again.values() if not r.ok] == []
                    assert {k: r.server for k, r in again.items()} == first  # same connections, same servers
                assert lbs.forwarded(lb1) == lb1_before
                for (client, sport), server in first.items():  # lb2 picked them up mid-connection
                    assert lbs.explain(lb2, client, sport) == (servers[server].address, "connection entry")
            finally:
                for p in pools.values():
                    p.close()
            print(f"{engine} topology {topology}: {len(first)} connections moved lb1 -> lb2, all kept their server "
                  f"({dict(Counter(first.values()))})")

            # Many short flows through both: each balancer, asked, names the backend that served it.
            lab.route_to_balancers()
            seen: Counter[str] = Counter()
            for c in lab.clients:
                results = lab.traffic(n=30, client=c)
                assert set(served(results)) == set(servers)
                for r in results:
                    answers = {lb.name: lbs.explain(lb, c.address, r.sport) for lb in lab.balancers}
                    assert {b for b, _ in answers.values()} == {servers[r.server].address}, (r, answers)
                    # The one the router chose holds the connection entry (connection entries outlive the
                    # close); the other placed it by its own table, to the same backend.
                    assert r.sport is not None
                    chosen = lab.balancer_by_address(lab.route_choice(c, r.sport))  # the router's kernel's choice
                    assert chosen is not None and answers[chosen.name][1] == "connection entry", answers
                    seen[chosen.name] += 1
            assert set(seen) == {lb1.name, lb2.name}, seen
            print(f"{engine} topology {topology}: {sum(seen.values())} short flows, both balancers agree on every one "
                  f"(router split {dict(seen)})")
            lbs.stop()
        except BaseException:
            lbs.show_log()
            raise


# -- 2. a balancer dies mid-stream, and comes back --------------------------------------------


STREAMS, UPLOADS = 64, 16  # connections, of which uploads (their data passes the balancers, not only ACKs)
STREAM_BYTES, STREAM_SECONDS = 3_000_000, 8.0  # long enough for a restarted balancer (and its BGP session) to carry some


class BgpBalancers:
    """Balancers run from a config file with [bgp]: each announces the VIP to the lab's BIRD router,
    which spreads the flows over them by ECMP (a lab with bgp=True has no static routes at all)."""

    def __init__(self, lab: Lab, engine: str, tmp_path: Path, *, balancers: list[Host] | None = None,
                 bgp: str = BGP_SECTION, ipv6: bool = False) -> None:
        """balancers: which to run (default all); bgp: their [bgp] section; ipv6: a second service, the IPv6
        VIP over the servers' IPv6 addresses (GRE over IPv6 to them), announced as well."""
        self.lab, self.engine = lab, engine
        chosen = balancers if balancers is not None else list(lab.balancers)
        self.sockets = {lb.name: tmp_path / f"{lb.name}.sock" for lb in chosen}
        self.configs = {lb.name: tmp_path / f"{lb.name}.toml" for lb in chosen}
        self.log_paths = {lb.name: tmp_path / f"{lb.name}.log" for lb in chosen}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        backends6 = [s.address6 for s in lab.servers] if ipv6 else None
        for lb in chosen:
            self.configs[lb.name].write_text(config_text(engine, self.sockets[lb.name],
                                                         [s.address for s in lab.servers], bgp=bgp, backends6=backends6))
            self.start(lb)
        try:
            self.wait_next_hops([lb.address for lb in chosen])
            if ipv6:
                self.wait_next_hops([lb.address6 for lb in chosen], vip=lab.vip6)
        except BaseException:
            self.show_log()
            raise

    def start(self, lb: Host) -> None:
        argv = [self.lab.python, "-m", "rusty_rail", "run", "--config", str(self.configs[lb.name])]
        with self.log_paths[lb.name].open("ab") as log:
            self.procs[lb.name] = self.lab.start_balancer(lb, argv, stdout=log, stderr=log)

    def wait_next_hops(self, addresses: list[str], timeout: float = 30.0, vip: str | None = None) -> float:
        """Until the router's route to the VIP (default the IPv4 one) names exactly these balancers (their
        addresses of its family); the seconds it took."""
        started = time.monotonic()
        wait_for(timeout=timeout, interval=0.005, what=f"the router's next hops to {vip or self.lab.vip} to be {addresses}",
                 predicate=lambda: sorted(self.lab.vip_next_hops(vip)) == sorted(addresses))
        return time.monotonic() - started

    def request(self, lb: Host, request: dict[str, Any]) -> Any:
        with ControlClient(str(self.sockets[lb.name])) as client:
            return client.request(request)

    def show_log(self) -> None:
        for name, path in self.log_paths.items():
            if path.exists():
                print(f"-- {name}:\n{path.read_text(errors='replace')[-4000:]}")

    def stop(self, names: list[str] | None = None) -> list[dict[str, Any]]:
        names = names or list(self.procs)
        procs = [self.procs.pop(n) for n in names]
        return stop_balancers(procs, logs=[self.log_paths[n] for n in names])


@ENGINES
@pytest.mark.parametrize("topology", [3, 4])
def test_balancer_killed_mid_stream(engine: str, topology: int, tmp_path: Path) -> None:
    """No health poller anywhere: the killed daemon's BGP session dies with it, BIRD withdraws its route,
    and the kernel's multipath route (which the router's encapsulator follows) loses it as a next hop."""
    with lab_up(topology, bgp=True) as lab:
        lbs = BgpBalancers(lab, engine, tmp_path)
        try:
            lb1, lb2 = lab.balancers
            with lab.streams(STREAMS, size=STREAM_BYTES, seconds=STREAM_SECONDS, uploads=UPLOADS) as streams:
                flowing = streams.wait("flowing", 30)
                assert flowing["ended"] == 0, streams.of("done")
                client = lab.clients[0]
                by_lb = Counter(lab.route_choices(client, [e["sport"] for e in streams.of("connected")]))
                assert min(by_lb[lb1.address], by_lb[lb2.address]) >= STREAMS // 5, by_lb  # both carry a fair part

                victim = lbs.procs.pop(lb1.name)
                killed_at = time.monotonic()
                victim.send_signal(signal.SIGKILL)
                failover = lbs.wait_next_hops([lb2.address], timeout=5)
                victim.wait(5)

                # What the dead process left behind: the AF_PACKET engine's nft drop rule, or the XDP
                # program (attached by netlink, it goes on forwarding). The lab removes both (down() too).
                left = lab.balancer_leftovers(lb1)
                assert left["nft"] == (engine == "afpacket"), left
                assert engine == "xdp" or not left["xdp"], left
                lab.reset_balancer(lb1)

                # A new lb1, with empty tables, while the transfers still run: it announces the VIP again
                # and the router's hash hands it about half the flows, none of which it has seen.
                lbs.start(lb1)
                back = lbs.wait_next_hops([lb1.address, lb2.address], timeout=30)
                back_at = time.monotonic()
                streams.wait("finished", STREAM_SECONDS + 40)
                done = streams.of("done")
            assert len(done) == STREAMS
            ok = [e for e in done if e["ok"]]
            fraction = len(ok) / STREAMS
            running_at_return = sum(e["t"] > back_at for e in done)
            print(f"{engine}: lb1 (carrying {by_lb[lb1.address]} of {STREAMS} transfers) SIGKILLed mid-stream; the "
                  f"router dropped it as a next hop after {failover * 1000:.0f} ms (its BGP session died with it; "
                  f"it left {[k for k, v in left.items() if v] or 'nothing'} behind); lb1 restarted and announced "
                  f"again {back_at - killed_at:.2f} s after the kill ({back:.2f} s after its start), "
                  f"{running_at_return} transfers still running; {len(ok)}/{STREAMS} = {fraction:.1%} transfers "
                  f"completed intact (longest {max(e['seconds'] for e in done):.2f} s for {STREAM_SECONDS:.0f} s paced)")
            assert fraction >= 0.99, [e for e in done if not e["ok"]]
            assert failover < 1.0
            assert running_at_return >= STREAMS // 2, "lb1 came back too late to carry running transfers"
            assert set(served(lab.traffic(n=10))) <= set(by_name(lab))
            reports = lbs.stop()
            assert all(r["counters"]["forwarded"] > 0 for r in reports)  # the new lb1 did carry traffic
        except BaseException:
            lbs.show_log()
            raise


# -- 3 and 4: backends coming and going, a config-file balancer over three servers ------------


class ConfigBalancer:
    """One balancer run from a config file in topology 5 (one client, three servers, one balancer)."""

    def __init__(self, lab: Lab, engine: str, tmp_path: Path, backends: list[Host]) -> None:
        self.lab = lab
        self.engine = engine
        self.socket = tmp_path / "ctl.sock"
        self.config = tmp_path / "rusty-rail.toml"
        self.config.write_text(config_text(engine, self.socket, [b.address for b in backends]))
        self.log_path = tmp_path / "balancer.log"
        with self.log_path.open("ab") as log:
            self.procs = lab.start_balancers_with_config(str(self.config), stdout=log, stderr=log)
        try:
            wait_served_by_each(lab)
        except BaseException:
            self.show_log()
            raise

    def show_log(self) -> None:
        print(self.log_path.read_text(errors="replace")[-4000:])

    def request(self, request: dict[str, Any]) -> Any:
        with ControlClient(str(self.socket)) as client:
            return client.request(request)

    def backends(self) -> dict[str, dict[str, Any]]:
        (svc,) = self.request({"cmd": "status"})["services"]
        return {b["address"]: b for b in svc["backends"]}

    def placements(self, sports: range) -> dict[int, str]:
        """Where the table sends flows never seen (client1 -> VIP:80 from these ports)."""
        out = {}
        with ControlClient(str(self.socket)) as client:
            for sport in sports:
                r = client.request({"cmd": "explain", "client": f"10.0.0.1:{sport}", "service": SERVICE, "protocol": "tcp"})
                out[sport] = r["backend"]
        return out

    def stop(self) -> None:
        (report,) = stop_balancers(self.procs, logs=[self.log_path])
        assert report["engine"] == self.engine


SYNTHETIC = range(20000, 21500)  # client ports no real connection uses (the ephemeral range starts at 32768)


@ENGINES
def test_backend_added_at_run_time(engine: str, tmp_path: Path) -> None:
    with lab_up(5) as lab:
        s1, s2, s3 = lab.servers
        lb = ConfigBalancer(lab, engine, tmp_path, [s1, s2])
        try:
            with lab.pool(45) as pool:
                first = {r.sport: r.server for r in pool.get()}
                assert set(first.values()) == {s1.name, s2.name}, first
                before = lb.placements(SYNTHETIC)

                lb.request({"cmd": "add", "service": SERVICE, "backend": s3.address, "weight": 1})
                assert set(lb.backends()) == {s1.address, s2.address, s3.address}
                for _ in range(2):
                    again = pool.get()
                    assert [r.error for r in again if not r.ok] == []  # no established connection breaks
                    assert {r.sport: r.server for r in again} == first  # nor changes server

                after = lb.placements(SYNTHETIC)
                table_share = sum(b == s3.address for b in after.values()) / len(after)
                moved = [p for p in SYNTHETIC if after[p] != before[p]]
                to_new = sum(after[p] == s3.address for p in moved) / len(moved)

                n = 150
                results = lab.traffic(n=n)
                counts = served(results)
                real_share = counts[s3.name] / n
                for r in results:  # each real flow went where the balancer says its table sends it
                    assert r.sport is not None
                    assert lb.placements(range(r.sport, r.sport + 1))[r.sport] == by_name(lab)[r.server].address
            print(f"{engine}: backend added under {len(first)} live connections, none broke or moved; new backend's "
                  f"share: {table_share:.3f} of {len(SYNTHETIC)} table placements, {real_share:.3f} of {n} real flows "
                  f"({dict(counts)}); of the placements that changed, {to_new:.1%} went to the new backend")
            # Maglev gives each of 3 equal backends 1/3 of the slots (to within 1/TABLE_SIZE); flows hash
            # uniformly, so a share over k flows is binomial, sd = sqrt(p(1-p)/k): 0.012 for 1500 table
            # placements, 0.038 for 150 real flows. Tolerances of about 3.5 sd: 0.045 and 0.13.
            assert abs(table_share - 1 / 3) <= 0.045
            assert abs(real_share - 1 / 3) <= 0.13
            # Maglev's minimal disruption: what moves, moves to the newcomer (not all: 96.7% here). The
            # table placements are deterministic (fixed ports, fixed table), so these never flake.
            assert to_new >= 0.95
            lb.stop()
        except BaseException:
            lb.show_log()
            raise


@ENGINES
def test_backend_death_moves_only_its_flows(engine: str, tmp_path: Path) -> None:
    with lab_up(5) as lab:
        servers = by_name(lab)
        s1, s2, s3 = lab.servers
        lb = ConfigBalancer(lab, engine, tmp_path, [s1, s2, s3])
        try:
            wait_for(timeout=5, interval=0.02, what="every backend up", predicate=lambda: {b["health"] for b in lb.backends().values()} == {"up"})
            with lab.pool(45) as pool:
                first = {r.sport: r.server for r in pool.get()}
                assert set(first.values()) == set(servers), first
                before = lb.placements(SYNTHETIC)

                killed_at = time.monotonic()
                lab.stop_httpd(s1)  # SIGTERM: the Python server dies at once, its listening socket with it
                wait_for(timeout=5, interval=0.02, what="server1 down", predicate=lambda: lb.backends()[s1.address]["health"] == "down")
                took = time.monotonic() - killed_at
                reason = lb.backends()[s1.address]["health_reason"]

                again = {r.sport: r for r in pool.get()}
                survivors = {p: s for p, s in first.items() if s != s1.name}
                assert [again[p].error for p in survivors if not again[p].ok] == []
                assert {p: again[p].server for p in survivors} == survivors  # kept their servers
                lost = [p for p, s in first.items() if s == s1.name]
                assert all(not again[p].ok for p in lost)  # their server is gone (nothing could save them)

                after = lb.placements(SYNTHETIC)
                on_dead = [p for p in SYNTHETIC if before[p] == s1.address]
                on_others = [p for p in SYNTHETIC if before[p] != s1.address]
                assert all(after[p] in (s2.address, s3.address) for p in on_dead)
                stayed = sum(after[p] == before[p] for p in on_others) / len(on_others)
                counts = served(lab.traffic(n=30))
                assert set(counts) <= {s2.name, s3.name}
            print(f"{engine}: server1's httpd killed; down after {took * 1000:.0f} ms (fall x interval = "
                  f"{FALL * INTERVAL * 1000:.0f} ms; {reason}); {len(survivors)} connections to the others kept "
                  f"working and their servers, {len(lost)} on server1 lost; {stayed:.1%} of the table placements on "
                  f"the survivors unchanged, all {len(on_dead)} of server1's moved")
            # Down after `fall` failed probes, the first within one interval of the kill: at most
            # fall x interval, plus the probe's own time and this poll's (a generous 0.4 s on a busy box).
            assert took <= FALL * INTERVAL + 0.4
            assert stayed >= 0.95  # Maglev's minimal disruption: only the dead backend's flows move (99.3% here)
            lb.stop()
        except BaseException:
            lb.show_log()
            raise
