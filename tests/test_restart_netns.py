"""Hitless restart of the XDP engine (issue 13): `rusty-rail restart` as people run it, in lab topology 2.

Every daemon and every restart is started plainly with `ip netns exec` (Lab.popen's default): each gets
a mount namespace of its own where /sys/fs/bpf is an empty sysfs directory, so the restarter mounts a
bpffs of its own and the running daemon pins through /proc/<restarter>/root (bpf/bpffs.py). Checked
from outside, for the environment form (RR_PIN_ROOT a directory not there yet: bpffs mounted on it) and
the config form (the default pin root: bpffs mounted on /sys/fs/bpf):

- 200 UDP flows, 2,000 sequence-numbered datagrams a second in all, stream through the restart;
- the device always has an XDP program: a thread polls the attached program's id every 10 ms and never
  sees 0; the id changes once;
- at most 0.1% of the datagrams are lost, and every flow arrives at one server only;
- the old daemon exits 75 having handed over; the new one took its connection table, then removed the
  pins; (config form) a backend the checks had found down is down in the new daemon without a check of
  its own having failed (the health state came with the handover).

And a restart that cannot hand over: a pin root that cannot be used fails it, naming RR_PIN_ROOT,
before anything is asked of the running daemon; a daemon that cannot pin answers why. Either way the
daemon serves on, its program attached throughout (traffic proves it). The Lab tears everything down,
also on failure.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from rusty_rail.bpf import libbpf
from rusty_rail.bpf.netns import in_netns
from rusty_rail.control.ctl import ControlClient
from rusty_rail.engines.xdp import default_object_path
from rusty_rail.lab import Lab
from rusty_rail.lab.events import logged
from tests.engine_netns import wait_for

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(not default_object_path().exists(), reason="run `make bpf` first")]

_counter = itertools.count()
UDP_PORT = 9999
FLOWS = 200
RATE = 2000  # datagrams a second, all flows together
DEAD_BACKEND = "192.168.137.250"  # on the servers' network, nobody there: its checks fail

# A UDP receiver on a server (bound to every address, so to the VIP on lo): prints "ready", then on
# stdin EOF reads until 0.3 s of silence and prints {flow: [sequence numbers]} as JSON.
RECEIVER = r"""
import json, select, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind(("0.0.0.0", %d))
print("ready", flush=True)
got, closing = {}, False
while True:
    ready, _, _ = select.select([s] + ([] if closing else [sys.stdin]), [], [], 0.3)
    if not ready and closing:
        break
    for r in ready:
        if r is s:
            flow, seq = map(int, s.recv(64).split())
            got.setdefault(flow, []).append(seq)
        elif not sys.stdin.readline():
            closing = True
print(json.dumps(got), flush=True)
""" % UDP_PORT

# A UDP sender on a client: FLOWS flows (a socket, so a source port, each), datagram n going to flow
# n %% FLOWS as "flow seq", at RATE a second in all until stdin closes; prints how many it sent.
SENDER = r"""
import select, socket, sys, time
vip, flows, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
socks = []
for _ in range(flows):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((vip, %d))
    socks.append(s)
print("sending", flush=True)
n, start = 0, time.monotonic()
while True:
    socks[n %% flows].send(b"%%d %%d" %% (n %% flows, n // flows))
    n += 1
    wait = start + n / rate - time.monotonic()
    if select.select([sys.stdin], [], [], max(wait, 0))[0] and not sys.stdin.readline():
        break
print(n, flush=True)
""" % UDP_PORT


class ProgramWatch:
    """Polls the id of the XDP program on a device in a namespace every 10 ms, from a thread."""

    def __init__(self, namespace: str, device: str) -> None:
        self.ifindex = _ifindex(namespace, device)
        self.fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
        self.ids: list[tuple[float, int]] = []  # (time, id) at each change
        self.polls = 0
        self.empty_polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="xdp-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with in_netns(self.fd):
            while not self._stop.is_set():
                prog_id = libbpf.xdp_query_id(self.ifindex, 0)
                self.polls += 1
                self.empty_polls += prog_id == 0
                if not self.ids or self.ids[-1][1] != prog_id:
                    self.ids.append((time.monotonic(), prog_id))
                self._stop.wait(0.01)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        os.close(self.fd)


def _ifindex(namespace: str, device: str) -> int:
    out = subprocess.run(["ip", "-n", namespace, "-j", "link", "show", "dev", device], capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out)[0]["ifindex"]


def _status(socket_path: Path) -> dict[str, Any]:
    with ControlClient(str(socket_path), timeout=5) as client:
        return client.request({"cmd": "status"})


def _answers(socket_path: Path) -> dict[str, Any] | None:
    try:
        return _status(socket_path)
    except Exception:  # not listening yet, or gone
        return None


def _wait_until_both_serve(lab: Lab) -> None:
    """Both servers answer through the balancer (both next hops resolved), before the stream starts."""
    def served() -> bool:
        results = lab.traffic(n=8, timeout=1)
        return all(r.ok for r in results) and len({r.server for r in results}) == len(lab.servers)
    wait_for(served, 30, what="both servers answering through the balancer")


def _backend(status: dict[str, Any], service: str, address: str) -> dict[str, Any]:
    (svc,) = [s for s in status["services"] if s["service"] == service]
    (backend,) = [b for b in svc["backends"] if b["address"] == address]
    return backend


def _config(path: Path, socket_path: Path, lab: Lab) -> None:
    servers = ", ".join(f'"{s.address}"' for s in lab.servers)
    path.write_text(f"""\
device = "{lab.balancers[0].device}"
engine = "xdp"
table_size = 1009
control_socket = "{socket_path}"

[[services]]
vip = "{lab.vip}"
protocol = "udp"
port = {UDP_PORT}
backends = [{servers}, "{DEAD_BACKEND}"]
[services.health]
type = "tcp"
port = 80
interval = 0.3
timeout = 0.25
rise = 2
fall = 2

[[services]]
vip = "{lab.vip}"
protocol = "tcp"
port = 80
backends = [{servers}]
""")


def _restart_under_stream(tmp_path: Path, config_form: bool) -> None:
    prefix = f"rr{os.getpid() % 100000}x{next(_counter)}-"
    socket_path = tmp_path / "ctl.sock"
    old_log, new_log = tmp_path / "old.log", tmp_path / "new.log"
    with Lab(2, prefix) as lab:
        lb, client = lab.balancers[0], lab.clients[0]
        config = tmp_path / "config.toml"
        if config_form:
            _config(config, socket_path, lab)
            argv = [lab.python, "-m", "rusty_rail", "run", "--config", str(config)]
            restart_argv = [lab.python, "-m", "rusty_rail", "restart", "--config", str(config)]
            env: dict[str, str] = {}
            udp_service = f"{lab.vip}:{UDP_PORT}/udp"
        else:
            env = {"RR_ENGINE": "xdp", "RR_TABLE_SIZE": "1009", "RR_CONTROL_SOCKET": str(socket_path),
                   "RR_PIN_ROOT": str(tmp_path / "pins")}
            argv = [lab.python, "-m", "rusty_rail"]
            restart_argv = [lab.python, "-m", "rusty_rail", "restart"]
        try:
            with old_log.open("wb") as log:
                (old,) = lab.start_balancers(argv, env=env, stdout=log, stderr=log)
            _wait_until_both_serve(lab)
            if config_form:  # the dead backend is found down before the stream: no flow is sent to it
                wait_for(lambda: _backend(_status(socket_path), udp_service, DEAD_BACKEND)["health"] == "down", 20,
                         what="the dead backend found down")
            receivers = [lab.popen(s.namespace, [lab.python, "-c", RECEIVER], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE) for s in lab.servers]
            for r in receivers:
                assert r.stdout is not None and r.stdout.readline() == b"ready\n"

            watch = ProgramWatch(lb.namespace, lb.device)
            sender = lab.popen(client.namespace, [lab.python, "-c", SENDER, lab.vip, str(FLOWS), str(RATE)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            try:
                assert sender.stdout is not None and sender.stdout.readline() == b"sending\n"
                # Every flow has its connection entry before the restart.
                wait_for(lambda: _status(socket_path)["counters"]["connections"] >= FLOWS, 10,
                         what=f"{FLOWS} connection entries")
                first_id = watch.ids[-1][1]
                assert first_id != 0
                started = time.monotonic()
                with new_log.open("wb") as log:
                    new = lab.popen(lb.namespace, restart_argv, env={**lab.balancer_env(lb), **env},
                                    stdout=log, stderr=log)
                assert old.wait(timeout=30) == 75, "the old daemon did not hand over"
                old_exited = time.monotonic()
                wait_for(lambda: watch.ids[-1][1] != first_id or new.poll() is not None, 30,
                         what="the new daemon's program")
                assert new.poll() is None, "the new daemon exited"
                replaced = watch.ids[-1][0]
                answered = wait_for(lambda: _answers(socket_path), 10, what="the new daemon's control socket")
                # Stream through the new program for a while: a duration of traffic, not a wait for an event.
                time.sleep(0.5)
            finally:
                assert sender.stdin is not None and sender.stdout is not None
                sender.stdin.close()
                sent = int(sender.stdout.read().split()[-1])
                sender.wait(10)
                watch.stop()
            results: list[dict[str, list[int]]] = []
            for r in receivers:
                assert r.stdin is not None and r.stdout is not None
                r.stdin.close()
                results.append(json.loads(r.stdout.read()))
                r.wait(10)

            # The device always had a program: the old one until the new one replaced it atomically.
            ids = [prog_id for _, prog_id in watch.ids]
            print(f"program ids {ids} in {watch.polls} polls ({watch.empty_polls} without a program); old daemon "
                  f"exited {old_exited - started:.3f}s after restart began, its program was replaced "
                  f"{replaced - started:.3f}s after")
            assert watch.empty_polls == 0 and 0 not in ids, "the device was without a program"
            assert len(ids) == 2 and ids[0] == first_id

            # The stream: at most 0.1% lost, every flow at one server.
            expected = {(n % FLOWS, n // FLOWS) for n in range(sent)}
            got = {(int(flow), seq) for seqs in results for flow, ss in seqs.items() for seq in ss}
            missing = expected - got
            servers_of = {f: {i for i, seqs in enumerate(results) if str(f) in seqs} for f in range(FLOWS)}
            moved = sorted(f for f, where in servers_of.items() if len(where) > 1)
            print(f"UDP: {FLOWS} flows, sent {sent} at {RATE}/s, lost {len(missing)} "
                  f"({100 * len(missing) / sent:.3f}%), flows at more than one server: {len(moved)}")
            assert len(missing) <= sent / 1000, sorted(missing)[:20]
            assert moved == [], moved
            assert all(len(where) == 1 for where in servers_of.values())

            # The handover: reported by the old daemon, taken over (its table) by the new one, pins gone.
            after: dict[str, Any] = answered or {}
            (stopped,) = logged(old_log, "stopped")
            assert stopped["handover"] is True
            assert after["counters"]["connections"] >= FLOWS
            pin_root = f"/proc/{new.pid}/root{env.get('RR_PIN_ROOT', '/sys/fs/bpf/rusty_rail')}"
            assert os.path.ismount(pin_root) or os.path.ismount(os.path.dirname(pin_root))  # its own bpffs
            handover_dir = f"{pin_root}/{os.stat(f'/run/netns/{lb.namespace}').st_ino}-{lb.device}"
            assert not os.path.exists(handover_dir), "the new daemon removes the pins"
            if config_form:  # down without a check of its own failing: the state came with the handover
                dead = _backend(after, udp_service, DEAD_BACKEND)
                assert dead["health"] == "down" and "checks failed" in dead["health_reason"], dead
                assert after["control"]["health_carried"] == 3
                went_down = [e for e in logged(new_log) if e.get("backend") == DEAD_BACKEND and e.get("up") is False]
                assert went_down == [], "the new daemon found the dead backend down itself: nothing was carried"
            assert all(r.ok for r in lab.traffic(n=10))
        except BaseException:
            for path in (old_log, new_log):
                if path.exists():
                    print(f"-- {path.name}:\n{path.read_text(errors='replace')[-4000:]}")
            raise


def test_restart_environment_form_under_200_flows(tmp_path: Path) -> None:
    _restart_under_stream(tmp_path, config_form=False)


def test_restart_config_form_under_200_flows_keeps_health(tmp_path: Path) -> None:
    _restart_under_stream(tmp_path, config_form=True)


def test_a_restart_that_cannot_hand_over_leaves_the_daemon_forwarding(tmp_path: Path) -> None:
    """Twice: the restarter's pin root cannot be used (a plain directory with something in it, where
    bpffs is not mounted over files), and the running daemon cannot pin in the restarter's bpffs (a
    directory sits where rr_backends goes). Each restart exits 1 naming why; the daemon never stops,
    its program never leaves the device, and traffic still reaches both servers."""
    pin_root = tmp_path / "not-bpffs"
    pin_root.mkdir()
    (pin_root / "keep").write_text("a directory with something in it: bpffs is not mounted over it")
    socket_path = tmp_path / "ctl.sock"
    env = {"RR_ENGINE": "xdp", "RR_TABLE_SIZE": "1009", "RR_CONTROL_SOCKET": str(socket_path),
           "RR_PIN_ROOT": str(pin_root)}
    prefix = f"rp{os.getpid() % 100000}x{next(_counter)}-"
    with Lab(2, prefix) as lab:
        lb = lab.balancers[0]
        (old,) = lab.start_balancers(env=env)
        _wait_until_both_serve(lab)
        restart_env = {**os.environ, **lab.balancer_env(lb), **env}
        watch = ProgramWatch(lb.namespace, lb.device)
        try:
            unusable = lab.run(lb.namespace, [lab.python, "-m", "rusty_rail", "restart"], env=restart_env,
                               check=False, timeout=60)
            # A bpffs of the restarter's own (a mount namespace of its own, so the host never sees it)
            # with a directory where the daemon would pin rr_backends.
            bpf = tmp_path / "bpf"
            bpf.mkdir()
            blocked = bpf / f"{os.stat(f'/run/netns/{lb.namespace}').st_ino}-{lb.device}" / "rr_backends"
            script = (f"mount -t bpf bpf {bpf} && mkdir -p {blocked} && "
                      f"exec ip netns exec {lb.namespace} {lab.python} -m rusty_rail restart")
            refused = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                                     env={**restart_env, "RR_PIN_ROOT": str(bpf)}, capture_output=True, text=True,
                                     timeout=60)
        finally:
            watch.stop()
        print(unusable.stderr, refused.stderr, sep="\n")
        assert unusable.returncode == 1
        assert f"RR_PIN_ROOT={pin_root}" in unusable.stderr and "not a bpffs" in unusable.stderr
        assert "not asked to hand over and serves on" in unusable.stderr
        assert refused.returncode == 1
        assert "did not hand over" in refused.stderr and "rr_backends" in refused.stderr
        assert "serves on" in refused.stderr
        assert old.poll() is None, "the running daemon kept running"
        assert len(watch.ids) == 1 and watch.ids[0][1] != 0, "its program stayed attached throughout"
        results = lab.traffic(n=10)
        assert all(r.ok for r in results) and len({r.server for r in results}) == len(lab.servers)
        assert os.listdir(pin_root) == ["keep"]  # nothing mounted over it, nothing pinned
        assert "handover_refused" in {e.get("event") for e in logged(lab.balancer_log(lb))}
