"""Hitless restart of the XDP engine (issue 5): `rusty-rail restart` in lab topology 2.

The running daemon hands over (SIGUSR2: exits leaving its program attached and rr_conns pinned in its
device's handover directory); the new one reuses that connection table and replaces the program
atomically. Checked from outside:

- the device always has an XDP program: a thread polls the attached program's id (bpf_xdp_query in the
  balancer's namespace) through the handover and never sees 0; the id changes once;
- a UDP stream sent at a steady rate through the VIP during the handover arrives complete (sequence
  numbers, nothing missing) and at one server;
- keep-alive TCP connections opened before keep their server, and the new daemon explains each of them
  by its connection entry (the entries written by the old program);
- a plain SIGTERM afterwards still detaches and leaves no pins.

Balancers are started with `nsenter --net` (host_bpffs): `ip netns exec` would remount /sys and hide
the host's bpffs, where the handover pins live. Everything is torn down by the Lab, also on failure.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from rusty_rail.bpf import libbpf
from rusty_rail.engines.xdp import default_object_path
from rusty_rail.bpf.netns import in_netns as _in_netns
from rusty_rail.lab import Lab
from rusty_rail.lab.events import logged
from tests.test_lab_netns import _wait_until_served

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(not default_object_path().exists(), reason="run `make bpf` first")]

_counter = itertools.count()
UDP_PORT = 9999

# A UDP receiver on a server (bound to every address, so to the VIP on lo): prints "ready", then on
# stdin EOF reads until 0.3 s of silence and prints the sorted sequence numbers it got as JSON.
RECEIVER = r"""
import json, select, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind(("0.0.0.0", %d))
print("ready", flush=True)
got, closing = [], False
while True:
    ready, _, _ = select.select([s] + ([] if closing else [sys.stdin]), [], [], 0.3)
    if not ready and closing:
        break
    for r in ready:
        if r is s:
            got.append(int(s.recv(64).split()[1]))
        elif not sys.stdin.readline():
            closing = True
print(json.dumps(sorted(got)), flush=True)
""" % UDP_PORT

# A UDP sender on a client: one flow (fixed source port), `seq N` datagrams at a steady rate until
# stdin closes; prints how many it sent.
SENDER = r"""
import select, socket, sys, time
rate = float(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 40404))
s.connect((sys.argv[1], %d))
print("sending", flush=True)
n, start = 0, time.monotonic()
while True:
    s.send(b"seq %%d" %% n)
    n += 1
    wait = start + n / rate - time.monotonic()
    if select.select([sys.stdin], [], [], max(wait, 0))[0] and not sys.stdin.readline():
        break
print(n, flush=True)
""" % UDP_PORT


class ProgramWatch:
    """Polls the id of the XDP program on a device in a namespace, from a thread, until stopped."""

    def __init__(self, namespace: str, device: str) -> None:
        self.ifindex = _ifindex(namespace, device)
        self.fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
        self.ids: list[tuple[float, int]] = []  # (time, id) at each change
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="xdp-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with _in_netns(self.fd):
            while not self._stop.is_set():
                pid = libbpf.xdp_query_id(self.ifindex, 0)
                self.polls += 1
                if not self.ids or self.ids[-1][1] != pid:
                    self.ids.append((time.monotonic(), pid))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        os.close(self.fd)


def _ifindex(namespace: str, device: str) -> int:
    out = subprocess.run(["ip", "-n", namespace, "-j", "link", "show", "dev", device], capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out)[0]["ifindex"]


def _ctl(lab: Lab, socket_path: Path, *args: str) -> str:
    r = subprocess.run([lab.python, "-m", "rusty_rail", "ctl", "--socket", str(socket_path), *args],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _stopped_report(log: Path) -> dict:
    """The "stopped" event a daemon logged (on stderr, into `log`) as it exited."""
    (report,) = logged(log, "stopped")
    return report


def test_restart_hands_over_without_a_gap(tmp_path: Path) -> None:
    prefix = f"rh{os.getpid() % 100000}x{next(_counter)}-"
    socket_path = tmp_path / "ctl.sock"
    env = {"RR_ENGINE": "xdp", "RR_TABLE_SIZE": "1009", "RR_CONTROL_SOCKET": str(socket_path)}
    old_log, new_log = tmp_path / "old.log", tmp_path / "new.log"
    log = old_log.open("w+b")
    with Lab(2, prefix) as lab:
        lb, client = lab.balancers[0], lab.clients[0]
        handover_dir = f"/sys/fs/bpf/rusty_rail/{os.stat(f'/run/netns/{lb.namespace}').st_ino}-{lb.device}"
        try:
            (old,) = lab.start_balancers(env=env, host_bpffs=True, stdout=log, stderr=log)
            _wait_until_served(lab, 20)
            receivers = [lab.popen(s.namespace, [lab.python, "-c", RECEIVER], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE) for s in lab.servers]
            for r in receivers:
                assert r.stdout is not None and r.stdout.readline() == b"ready\n"

            # Long-lived connections, each with its server and its connection entry.
            conns = [lab.keepalive() for _ in range(6)]
            try:
                before = {}
                for c in conns:
                    r = c.get()
                    assert r.ok, r.error
                    before[c.sport] = r.server
                    assert "connection entry" in _ctl(lab, socket_path, "explain", f"{client.address}:{c.sport}",
                                                      f"{lab.vip}:80")
                print("servers before:", sorted(before.values()))

                watch = ProgramWatch(lb.namespace, lb.device)
                sender = lab.popen(client.namespace, [lab.python, "-c", SENDER, lab.vip, "2000"],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                try:
                    assert sender.stdout is not None and sender.stdout.readline() == b"sending\n"
                    time.sleep(0.3)  # some of the stream before the handover
                    first_id = watch.ids[-1][1]
                    assert first_id != 0
                    started = time.monotonic()
                    with new_log.open("ab") as new_err:
                        new = lab.popen(lb.namespace, [lab.python, "-m", "rusty_rail", "restart"],
                                        env={**lab.balancer_env(lb), **env}, host_bpffs=True,
                                        stdout=new_err, stderr=new_err)
                    old.wait(timeout=30)
                    old_exited = time.monotonic()
                    deadline = time.monotonic() + 30
                    while watch.ids[-1][1] == first_id:
                        assert new.poll() is None and time.monotonic() < deadline, "the new daemon did not take over"
                        time.sleep(0.01)  # polling the watcher's record
                    replaced = watch.ids[-1][0]
                    time.sleep(0.3)  # some of the stream after it
                finally:
                    assert sender.stdin is not None
                    sender.stdin.close()
                    sent = int(sender.stdout.read().split()[-1])
                    sender.wait(10)
                    watch.stop()
            finally:
                results = []
                for r in receivers:
                    assert r.stdin is not None and r.stdout is not None
                    r.stdin.close()
                    results.append(json.loads(r.stdout.read()))
                    r.wait(10)

            # The old daemon handed over (exit 75, a report saying so) and left no gap.
            assert old.returncode == 75
            assert _stopped_report(old_log)["handover"] is True
            ids = [pid for _, pid in watch.ids]
            print(f"program ids seen: {ids} in {watch.polls} polls; old exited {old_exited - started:.3f}s "
                  f"after restart began, program replaced {replaced - started:.3f}s after "
                  f"(the old program forwarded alone for {replaced - old_exited:.3f}s)")
            assert 0 not in ids, "the device was without a program during the handover"
            assert len(ids) == 2 and ids[0] == first_id

            # The stream: every datagram arrived, all at one server (its flow kept its backend).
            got = [n for seqs in results for n in seqs]
            missing = sorted(set(range(sent)) - set(got))
            print(f"UDP stream: sent {sent} at 2000/s, received {len(got)}, missing {len(missing)}")
            assert missing == [] and len(got) == sent
            assert sum(1 for seqs in results if seqs) == 1

            # Established connections: same server, same connection, and the new daemon's table has them.
            try:
                for c in conns:
                    out = _ctl(lab, socket_path, "explain", f"{client.address}:{c.sport}", f"{lab.vip}:80")
                    server = next(s for s in lab.servers if s.name == before[c.sport])
                    assert "connection entry" in out and f"backend {server.address}" in out, out
                    r = c.get()
                    assert r.ok and (r.server, r.sport) == (before[c.sport], c.sport), r.error
            finally:
                for c in conns:
                    c.close()
            assert not os.path.exists(handover_dir), "the new daemon removes the handover pins"
            assert set(lab.traffic(n=20)) and all(r.ok for r in lab.traffic(n=10))

            # A plain stop still detaches and cleans up.
            new.send_signal(signal.SIGTERM)
            new.wait(timeout=30)
            assert new.returncode == 0 and _stopped_report(new_log)["handover"] is False
            (link,) = json.loads(lab.run(lb.namespace, ["ip", "-j", "-d", "link", "show", "dev", lb.device]).stdout)
            assert "xdp" not in link, "a stopped balancer leaves nothing attached"
            assert not os.path.exists(handover_dir)
        except BaseException:
            for path in (old_log, new_log):
                if path.exists():
                    print(f"-- {path.name}:\n{path.read_text(errors='replace')[-4000:]}")
            raise
