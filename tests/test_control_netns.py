"""The control plane in real namespaces (issue 4), with both engines: a balancer started from a config
file (`rusty-rail run --config`) in topology 2 (one client, two servers, one balancer), driven with
`rusty-rail ctl` over its control socket, health-checking the real HTTP servers.

Each test has its own namespace prefix, config file and control socket (every namespace shares the
filesystem); the Lab context manager tears everything down, also on failure. Nothing sleeps to
synchronise: state changes are polled for with deadlines.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rusty_rail.core.verdict import DropReason
from rusty_rail.lab import Lab
from rusty_rail.lab.sniff import Sniffer
from rusty_rail.lab.topology import Host
from tests.engine_netns import wait_for
from tests.lab_config import FALL, INTERVAL, METRICS_PORT, RISE, SERVICE, TABLE_SIZE, TIMEOUT, VIP, config_text
from tests.test_lab_netns import _wait_until_served, stop_balancers

pytestmark = pytest.mark.netns

ENGINES = pytest.mark.parametrize("engine", ["afpacket", "xdp"])

_counter = itertools.count()


class Rig:
    """One lab with one balancer run from a config file, and the ways to look at it."""

    def __init__(self, lab: Lab, engine: str, directory: Path) -> None:
        self.lab = lab
        self.engine = engine
        self.lb = lab.balancers[0]
        self.client = lab.clients[0]
        self.s1, self.s2 = lab.servers
        self.config = directory / "rusty-rail.toml"
        self.socket = directory / "ctl.sock"
        self.log_path = directory / "balancer.log"
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.procs[0]

    def write(self, backends: list[Host] | None = None, **kw: Any) -> None:
        hosts = self.lab.servers if backends is None else backends
        self.config.write_text(config_text(self.engine, self.socket, [h.address for h in hosts], **kw))

    def start(self) -> None:
        log = self.log_path.open("ab")
        try:
            self.procs = self.lab.start_balancers_with_config(str(self.config), stdout=log, stderr=log)
        finally:
            log.close()
        _wait_until_served(self.lab, 20)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    # -- ctl ---------------------------------------------------------------------------------

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`python -m rusty_rail ctl --socket S ...` from the host namespace: the socket is a file."""
        r = subprocess.run([self.lab.python, "-m", "rusty_rail", "ctl", "--socket", str(self.socket), *args],
                           capture_output=True, text=True, timeout=30)
        if check:
            assert r.returncode == 0, f"ctl {' '.join(args)} exited {r.returncode}: {r.stderr}"
        return r

    def status(self) -> dict[str, Any]:
        return json.loads(self.ctl("status", "--json").stdout)

    def backends(self) -> dict[str, dict[str, Any]]:
        (svc,) = self.status()["services"]
        return {b["address"]: b for b in svc["backends"]}

    def wait_health(self, server: Host, health: str, deadline_s: float) -> float:
        start = time.monotonic()
        wait_for(timeout=deadline_s, interval=0.02, what=f"{server.name} {health}", predicate=lambda: self.backends()[server.address]["health"] == health)
        return time.monotonic() - start

    # -- metrics, scraped inside the balancer's namespace ------------------------------------

    def scrape(self) -> dict[str, Any]:
        code = "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"
        out = self.lab.run(self.lb.namespace, [self.lab.python, "-c", code, f"http://127.0.0.1:{METRICS_PORT}/metrics"]).stdout
        return {family.name: family for family in text_string_to_metric_families(out)}

    # -- traffic -----------------------------------------------------------------------------

    def traffic(self, n: int = 20, **kw: Any) -> dict[str, int]:
        """n new connections; every one must succeed. Returns requests per server name."""
        results = self.lab.traffic(n=n, **kw)
        assert [r.error for r in results if not r.ok] == []
        counts: dict[str, int] = {}
        for r in results:
            assert r.server is not None
            counts[r.server] = counts.get(r.server, 0) + 1
        return counts

    def stop(self) -> dict[str, Any]:
        (report,) = stop_balancers(self.procs, logs=[self.log_path])
        self.procs = []
        assert report["engine"] == self.engine
        return report


@contextmanager
def lab_for() -> Iterator[Lab]:
    prefix = f"rc{os.getpid() % 100000}x{next(_counter)}-"
    with Lab(2, prefix) as lab:
        yield lab


@contextmanager
def running(engine: str, tmp_path: Path, backends: list[int] | None = None, **kw: Any) -> Iterator[Rig]:
    """A lab and a balancer serving VIP:80 over the servers numbered in `backends` (default both)."""
    with lab_for() as lab:
        rig = Rig(lab, engine, tmp_path)
        rig.write(None if backends is None else [lab.servers[i - 1] for i in backends], **kw)
        try:
            rig.start()
            yield rig
            assert rig.proc.poll() is None, "the balancer exited"
            rig.stop()
        except BaseException:
            print(rig.log()[-4000:])  # shown by pytest with the failure
            raise


def by_address(rig: Rig) -> dict[str, Host]:
    return {s.address: s for s in rig.lab.servers}


# -- 1. health --------------------------------------------------------------------------------


@ENGINES
def test_health_failover_and_recovery(engine: str, tmp_path: Path) -> None:
    with running(engine, tmp_path) as rig:
        assert set(rig.traffic(20)) == {"server1", "server2"}
        assert {b["health"] for b in rig.backends().values()} == {"up"}

        rig.lab.stop_httpd(rig.s1)
        took = rig.wait_health(rig.s1, "down", FALL * INTERVAL + 3)
        print(f"{engine}: server1 down after {took:.2f}s (fall x interval = {FALL * INTERVAL}s)")
        b = rig.backends()
        assert b[rig.s1.address]["state"] == "down" and b[rig.s1.address]["served_weight"] is None
        assert "refused" in b[rig.s1.address]["health_reason"].lower()
        assert b[rig.s2.address]["health"] == "up"
        # After the transition every new connection goes to server2, and none fails.
        assert rig.traffic(30) == {"server2": 30}

        rig.lab.start_httpd(rig.s1)
        took = rig.wait_health(rig.s1, "up", RISE * INTERVAL + 3)
        print(f"{engine}: server1 up again after {took:.2f}s (rise x interval = {RISE * INTERVAL}s)")
        counts = rig.traffic(30)
        assert set(counts) == {"server1", "server2"}
        assert rig.status()["control"]["health_transitions"] == 2


# -- 2. drain ---------------------------------------------------------------------------------


@ENGINES
def test_drain_keeps_established_connections(engine: str, tmp_path: Path) -> None:
    with running(engine, tmp_path) as rig:
        with rig.lab.keepalive() as conn:
            first = conn.get()
            assert first.ok, first.error
            names = {s.name: s for s in rig.lab.servers}
            mine = names[first.server]
            other = next(s for s in rig.lab.servers if s is not mine)

            rig.ctl("drain", SERVICE, mine.address)
            b = rig.backends()[mine.address]
            assert (b["drained"], b["state"], b["served_weight"]) == (True, "drained", 0)
            assert rig.traffic(30) == {other.name: 30}  # new connections avoid the drained backend
            for _ in range(3):  # the established one keeps its backend, on the same connection
                again = conn.get()
                assert again.ok, again.error
                assert (again.server, again.sport) == (mine.name, conn.sport)

            rig.ctl("undrain", SERVICE, mine.address)
            assert rig.backends()[mine.address]["state"] == "active"
            assert set(rig.traffic(30)) == {"server1", "server2"}
            last = conn.get()
            assert last.ok and last.server == mine.name


def test_changes_reach_every_afpacket_worker(tmp_path: Path) -> None:
    """Two forked workers, each with its own tables: ctl's answer comes only after every worker has
    applied the change (the supervisor waits for each one's reply over its pipe), status adds their
    counters up, and the established flow keeps its backend. (One client address means the inner-
    address fanout puts this client's flows on one worker; test_engine_afpacket checks the spread.)"""
    with running("afpacket", tmp_path, workers=2) as rig:
        before = rig.traffic(40)
        assert set(before) == {"server1", "server2"}
        status = rig.status()
        assert status["counters"]["forwarded"] >= 40 * 5  # both workers' packets, summed
        with rig.lab.keepalive() as conn:
            first = conn.get()
            assert first.ok, first.error
            mine = next(s for s in rig.lab.servers if s.name == first.server)
            other = next(s for s in rig.lab.servers if s is not mine)
            rig.ctl("drain", SERVICE, mine.address)
            assert rig.traffic(40) == {other.name: 40}
            again = conn.get()
            assert again.ok and (again.server, again.sport) == (mine.name, conn.sport)


# -- 3. add / remove --------------------------------------------------------------------------


@ENGINES
def test_add_and_remove_without_restart(engine: str, tmp_path: Path) -> None:
    with running(engine, tmp_path, backends=[1]) as rig:
        pid = rig.proc.pid
        assert rig.traffic(10) == {"server1": 10}
        with rig.lab.keepalive() as conn:
            assert conn.get().server == "server1"

            rig.ctl("add", SERVICE, rig.s2.address)
            assert set(rig.backends()) == {rig.s1.address, rig.s2.address}
            assert set(rig.traffic(30)) == {"server1", "server2"}  # new flows reach the new backend
            r = conn.get()  # and the established connection stays where it was
            assert r.ok and (r.server, r.sport) == ("server1", conn.sport), r.error

            rig.ctl("remove", SERVICE, rig.s2.address)
            assert set(rig.backends()) == {rig.s1.address}
            assert rig.traffic(30) == {"server1": 30}
            r = conn.get()
            assert r.ok and r.server == "server1", r.error
        assert rig.proc.pid == pid and rig.proc.poll() is None  # never restarted
        err = rig.ctl("remove", SERVICE, rig.s2.address, check=False)
        assert err.returncode == 1 and "is not a backend" in err.stderr


# -- 4. bad config, bad reload ----------------------------------------------------------------


def _attached(lab: Lab, lb: Host) -> tuple[bool, bool]:
    """(an XDP program on the balancer's device, the AF_PACKET engine's nft table)."""
    (link,) = json.loads(lab.run(lb.namespace, ["ip", "-j", "-d", "link", "show", "dev", lb.device]).stdout)
    tables = lab.run(lb.namespace, ["nft", "list", "tables"]).stdout
    return "xdp" in link, f"rusty_rail_{lb.device}" in tables.split()


BAD_CONFIGS = [
    # (what to break, the words the message must contain)
    (lambda text: text.replace('backends = ["192.168.137.21", "192.168.137.22"]',
                               'backends = ["192.168.137.21", { address = "192.168.137.22", weight = -1 }]'),
     ["services[0].backends[1].weight", "-1"]),
    (lambda text: text.replace("interval = 0.2", "intervall = 0.2"), ["services[0].health.intervall", "unknown key"]),
    (lambda text: text.replace('engine = "', 'engine = "ebpf'), ["engine", '"ebpf']),
]


@ENGINES
def test_bad_config_and_bad_reload(engine: str, tmp_path: Path) -> None:
    with lab_for() as lab:
        rig = Rig(lab, engine, tmp_path)
        rig.write()
        good = rig.config.read_text()
        bad = tmp_path / "bad.toml"
        for breaks, words in BAD_CONFIGS:
            bad.write_text(breaks(good))
            r = lab.run(rig.lb.namespace, [lab.python, "-m", "rusty_rail", "run", "--config", str(bad)], check=False)
            assert r.returncode == 1, r.stderr
            (line,) = r.stderr.strip().splitlines()  # one line, naming the key and the value
            assert all(w in line for w in words), line
            assert _attached(lab, rig.lb) == (False, False), "nothing may be attached for a bad file"
            assert not rig.socket.exists()

        try:
            rig.start()
            xdp_on, nft_on = _attached(lab, rig.lb)  # the check above would have seen a running engine
            assert (xdp_on, nft_on) == ((True, False) if engine == "xdp" else (False, True))
            before = rig.status()

            # A broken file and SIGHUP: rejected, logged, the running configuration stays.
            rig.config.write_text(config_text(engine, rig.socket, [rig.s1.address], timeout=0.5))
            rig.proc.send_signal(signal.SIGHUP)
            rejected = wait_for(timeout=10, interval=0.02, what="the reload rejection in the log",
                                predicate=lambda: [e for e in rig.log_events() if e.get("event") == "reload_failed"])
            assert "services[0].health.timeout" in rejected[0]["msg"] and "0.5" in rejected[0]["msg"]
            after = rig.status()
            assert [b["address"] for b in after["services"][0]["backends"]] == [rig.s1.address, rig.s2.address]
            assert after["services"][0]["health"] == before["services"][0]["health"]
            assert after["control"]["reload_failures"] == 1 and after["control"]["reloads"] == 0
            assert "services[0].health.timeout" in after["control"]["last_reload_error"]
            assert "last reload failed: " in rig.ctl("status").stdout
            assert set(rig.traffic(20)) == {"server1", "server2"}  # still serving the old configuration
            # ctl reload says the same, with exit status 1.
            r = rig.ctl("reload", check=False)
            assert r.returncode == 1 and "services[0].health.timeout" in r.stderr

            # A good, changed file and SIGHUP: applied.
            rig.write([rig.s1])
            rig.proc.send_signal(signal.SIGHUP)
            wait_for(timeout=10, interval=0.02, what="the reload applied", predicate=lambda: list(rig.backends()) == [rig.s1.address])
            control = rig.status()["control"]
            assert control["reloads"] == 1 and control["last_reload_error"] is None
            assert any(e.get("event") == "reloaded" for e in rig.log_events())
            assert rig.traffic(20) == {"server1": 20}
            assert rig.proc.poll() is None
            rig.stop()
            assert _attached(lab, rig.lb) == (False, False), "a stopped balancer leaves nothing attached"
        except BaseException:
            print(rig.log()[-4000:])
            raise


# -- 5. metrics -------------------------------------------------------------------------------


def _samples(families: dict[str, Any], name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for s in families[name].samples if not s.name.endswith("_created")}


@ENGINES
def test_metrics_endpoint(engine: str, tmp_path: Path) -> None:
    with running(engine, tmp_path, health="http") as rig:  # HTTP checks here, TCP elsewhere
        (svc,) = rig.status()["services"]
        service = svc["service"]
        key = {s.name: (("backend", s.address), ("service", service)) for s in rig.lab.servers}
        before = rig.scrape()
        counts = rig.traffic(40)
        after = rig.scrape()

        packets_before = _samples(before, "rusty_rail_backend_packets")
        packets_after = _samples(after, "rusty_rail_backend_packets")
        assert set(packets_after) == set(key.values())
        grown = {name: packets_after[k] - packets_before[k] for name, k in key.items()}
        forwarded = _samples(after, "rusty_rail_forwarded_packets")[()] - _samples(before, "rusty_rail_forwarded_packets")[()]
        assert forwarded >= 3 * sum(counts.values())  # SYN, ACK, request (and FIN, ACK) per request
        # Both engines count per backend (the XDP program in rr_backend_stats).
        for name, n in counts.items():
            assert grown[name] >= 3 * n, (name, grown, counts)
        assert sum(grown.values()) == forwarded  # one service: every forwarded packet is one of its backends'
        bytes_after = _samples(after, "rusty_rail_backend_bytes")
        assert all(bytes_after[k] >= 40 * packets_after[k] for k in key.values())  # inner IPv4 + TCP headers at least

        reasons = {labels[0][1] for labels in _samples(after, "rusty_rail_drops")}
        assert {r.name.lower() for r in DropReason} <= reasons
        up = _samples(after, "rusty_rail_backend_up")
        assert up == {k: 1.0 for k in key.values()}
        assert _samples(after, "rusty_rail_backend_weight") == {k: 1.0 for k in key.values()}
        assert _samples(after, "rusty_rail_backend_drained") == {k: 0.0 for k in key.values()}
        assert after["rusty_rail_connections"].type == "gauge"
        assert after["rusty_rail_forwarded_packets"].type == "counter"

        # A backend going down shows in its gauge and in the transitions counter.
        rig.lab.stop_httpd(rig.s2)
        rig.wait_health(rig.s2, "down", FALL * INTERVAL + 3)
        down = rig.scrape()
        assert _samples(down, "rusty_rail_backend_up") == {key["server1"]: 1.0, key["server2"]: 0.0}
        assert _samples(down, "rusty_rail_health_transitions")[()] == 1


# -- 6. ctl against a running balancer --------------------------------------------------------


@ENGINES
def test_ctl_against_a_running_balancer(engine: str, tmp_path: Path) -> None:
    with running(engine, tmp_path) as rig:
        rig.traffic(10)
        table = rig.ctl("status").stdout
        assert f"rusty-rail on eth0 ({engine}), table size {TABLE_SIZE}" in table
        assert f"TCP  {SERVICE}" in table and "tcp:80" in table
        for s in rig.lab.servers:
            (line,) = [ln for ln in table.splitlines() if f"-> {s.address}" in ln]
            assert line.split()[2:5] == ["1", "active", "up"], line

        status = rig.status()
        assert (status["device"], status["engine"], status["table_size"]) == ("eth0", engine, TABLE_SIZE)
        (svc,) = status["services"]
        assert (svc["vip"], svc["protocol"], svc["port"]) == (VIP, "tcp", 80)
        assert svc["health"] == {"type": "tcp", "port": 80, "path": "/", "interval": INTERVAL, "timeout": TIMEOUT,
                                 "rise": RISE, "fall": FALL}
        assert [b["address"] for b in svc["backends"]] == [rig.s1.address, rig.s2.address]
        assert status["counters"]["forwarded"] > 0

        with rig.lab.keepalive() as conn:
            r = conn.get()
            assert r.ok, r.error
            backend = next(s for s in rig.lab.servers if s.name == r.server)
            flow = f"{rig.client.address}:{conn.sport}"
            out = rig.ctl("explain", flow, SERVICE).stdout
            assert "connection entry" in out and f"backend {backend.address}" in out, out
            # `rusty-rail explain` is the same command.
            explain = subprocess.run([rig.lab.python, "-m", "rusty_rail", "explain", "--socket", str(rig.socket), flow, SERVICE],
                                     capture_output=True, text=True, timeout=30)
            assert explain.returncode == 0 and explain.stdout == out
            # Drained, the live flow still has its connection entry and its backend.
            rig.ctl("drain", SERVICE, backend.address)
            out = rig.ctl("explain", flow, SERVICE).stdout
            assert "connection entry" in out and f"backend {backend.address}" in out, out
            assert conn.get().server == backend.name

        # A flow never seen is placed by the table; an unconfigured port matches no service.
        out = rig.ctl("explain", f"{rig.client.address}:1", SERVICE).stdout
        assert "table slot" in out and "connection entry" not in out, out
        out = rig.ctl("explain", f"{rig.client.address}:1", f"{VIP}:81").stdout
        assert "dropped (no service matches)" in out, out

        rig.ctl("weight", SERVICE, rig.s1.address, "3")
        assert rig.backends()[rig.s1.address]["weight"] == 3
        for args, message in ((("drain", SERVICE, "10.9.9.9"), "is not a backend"),
                              (("drain", f"{VIP}:81", rig.s1.address), "no service"),
                              (("weight", SERVICE, rig.s1.address, "5000"), "weight")):
            failed = rig.ctl(*args, check=False)
            assert failed.returncode == 1 and message in failed.stderr and failed.stderr.count("\n") == 1, failed.stderr
        failed = subprocess.run([rig.lab.python, "-m", "rusty_rail", "ctl", "--socket", str(tmp_path / "nothing.sock"), "status"],
                           capture_output=True, text=True, timeout=30)
        assert failed.returncode == 1 and "cannot reach the daemon" in failed.stderr


# -- 7. unconfigured VIPs and ports -----------------------------------------------------------


@ENGINES
def test_unconfigured_vips_and_ports_never_reach_a_backend(engine: str, tmp_path: Path) -> None:
    with running(engine, tmp_path) as rig:
        lab = rig.lab
        service_net = lab.maps.config().service_net
        assert str(service_net) == "10.1.0.0/24", service_net  # the router wraps all of S, not only the VIP
        before = rig.status()["counters"]
        wrapped_before = lab.maps.stats()["encapsulated_wire"]
        sniffers = {s.name: Sniffer(s.namespace, s.device) for s in lab.servers}
        try:
            sent = 0
            for host, port in (("10.1.0.9", 80), (VIP, 81)):
                out = lab.run(rig.client.namespace, [lab.python, "-m", "rusty_rail.lab.traffic", "--host", host,
                                                     "--port", str(port), "-n", "2", "--timeout", "0.3"]).stdout
                assert [json.loads(line)["ok"] for line in out.splitlines()] == [False, False]
                sent += 2  # at least one SYN per attempt
            udp = ("import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                   "for _ in range(3): s.sendto(b'x', (sys.argv[1], 80))")
            lab.run(rig.client.namespace, [lab.python, "-c", udp, VIP])  # UDP to the TCP service's port
            sent += 3
            drops = wait_for(timeout=5, interval=0.02, what="drop_no_service to count what was sent", predicate=lambda: (
                d if (d := rig.status()["counters"]["drops"]["no_service"] - before["drops"]["no_service"]) >= sent else 0))
            frames = {name: s.frames() for name, s in sniffers.items()}
        finally:
            for s in sniffers.values():
                s.close()
        assert lab.maps.stats()["encapsulated_wire"] - wrapped_before >= sent  # they did reach the balancer
        after = rig.status()["counters"]
        print(f"{engine}: sent >= {sent}, no_service drops {drops}, forwarded {after['forwarded'] - before['forwarded']}")
        for name, fs in frames.items():
            gre = [f for f in fs if not f.outgoing and f.proto == 47]
            strays = [f for f in gre if f.inner is None or f.inner[0] != 6 or f.inner[2] != VIP
                      or f.inner_ports is None or f.inner_ports[1] != 80]
            assert strays == [], f"{name} received GRE for an unconfigured VIP or port: {strays}"
        # Only stragglers of the warm-up connections (their last ACKs) may have been forwarded.
        assert after["forwarded"] - before["forwarded"] <= sum(len(fs) for fs in frames.values())
        assert "no_service" in rig.ctl("status").stdout


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
