"""Flood (issue 5): 300,000 new flows at the sender's maximum rate, both engines, lab topology 2.

The balancer runs with a bounded connection table (RR_CONN_CAPACITY = CAPACITY). trafgen, in the
router's namespace, sends 300,000 GRE frames to the balancer as fast as it can, each carrying a UDP
packet of a different inner flow (three runtime byte counters of coprime periods 251, 255 and 253 in
the inner source address and port: 16 million distinct flows before one repeats). Keep-alive TCP
connections are established before. Afterwards:

- the balancer process is alive and stops cleanly;
- memory stays within what CAPACITY implies:
  - AF_PACKET: the process's RSS outside its packet rings (mmapped socket memory, fixed size) grows by
    at most CAPACITY * BYTES_PER_ENTRY + SLACK. BYTES_PER_ENTRY = 512: a core/conntrack.py entry costs
    about 260 bytes (16-byte key, OrderedDict node, [backend, expiry] list; measured with 16k-300k
    entries), doubled for allocator slack. The flood offers ~20 times CAPACITY flows: an unbounded
    table would grow by tens of MB;
  - XDP: rr_conns is the configured size (max_entries == CAPACITY) and its kernel memory
    (bpftool's bytes_memlock) at most CAPACITY * LRU_ENTRY_BYTES + 64 KiB (an LRU hash element: a
    48-byte header, the 16-byte key and the rr_conn value, plus a bucket per entry; 136 bytes measured
    with the 56-byte rr_conn); the daemon's own memory does not follow
    the flows (it never sees them);
- the table holds at most CAPACITY entries, and (AF_PACKET) evictions were counted;
- every established connection still works, with its server. (The flood may evict their entries;
  Maglev then sends them to the same backend, which is the design: we assert on behaviour.) A request
  sent right after the flood waits behind what the AF_PACKET worker's RX ring still holds (32 MiB: about
  230,000 of these 84-byte frames, ~1 s of work on an idle machine, several seconds on a loaded one), so
  the connections' clients wait up to DRAIN_SECONDS for an answer: the test asserts that they are
  answered, not how fast.

The test removes everything it created (the Lab, the trafgen config in tmp_path).
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from rusty_rail.engines.xdp import default_object_path
from rusty_rail.engines.xdp import maps as m
from rusty_rail.lab import Lab
from tests.test_lab_netns import _wait_until_served, stop_balancers

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(shutil.which("trafgen") is None, reason="trafgen (netsniff-ng) not installed")]

FLOWS = 300_000
CAPACITY = 16_384
BYTES_PER_ENTRY = 512
SLACK = 8 << 20
DRAIN_SECONDS = 30.0
_counter = itertools.count()

LRU_ENTRY_BYTES = 48 + 16 + ctypes.sizeof(m.RrConn) + 16 + 8
"""Kernel memory per rr_conns entry: htab_elem's header, the key, the value, a bucket, 8 bytes of slack."""


def trafgen_config(dst_mac: str, src_mac: str, src_ip: str, dst_ip: str, vip: str) -> str:
    """One frame: Ethernet | IPv4 (GRE, constant: its checksum computed once) | GRE | inner IPv4 UDP
    from 10.9.<counter>.<counter> : <counter><counter> to VIP:9. The inner header checksum is left 0, so
    the servers drop what the balancer forwards to them (no replies, no ICMP)."""
    mac = lambda m: ", ".join(f"0x{b}" for b in m.split(":"))  # noqa: E731
    ip = lambda a: ", ".join(a.split("."))  # noqa: E731
    payload = 18
    inner_len = 20 + 8 + payload
    outer_len = 20 + 4 + inner_len
    return f"""{{
  {mac(dst_mac)}, {mac(src_mac)}, 0x08, 0x00,
  0x45, 0x00, const16({outer_len}), 0x00, 0x00, 0x40, 0x00, 64, 47, csumip(14, 33),
  {ip(src_ip)}, {ip(dst_ip)},
  0x00, 0x00, 0x08, 0x00,
  0x45, 0x00, const16({inner_len}), 0x00, 0x00, 0x40, 0x00, 64, 17, 0x00, 0x00,
  10, 9, 0, dinc(0, 250, 1), {ip(vip)},
  dinc(0, 254, 1), dinc(0, 252, 1), 0x00, 0x09, const16({8 + payload}), 0x00, 0x00,
  fill(0x72, {payload})
}}
"""


def rss_outside_sockets(pid: int) -> tuple[int, int]:
    """(RSS of the process outside socket mappings (AF_PACKET rings), RSS of those), in bytes."""
    other = sockets = 0
    in_socket = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                in_socket = len(head) >= 6 and head[5].startswith("socket:")
            elif head and head[0] == "Rss:":
                if in_socket:
                    sockets += int(head[1]) * 1024
                else:
                    other += int(head[1]) * 1024
    return other, sockets


def _ctl_status(lab: Lab, socket_path: Path) -> dict:
    r = subprocess.run([lab.python, "-m", "rusty_rail", "ctl", "--socket", str(socket_path), "status", "--json"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _conns_map(lab: Lab, namespace: str, device: str) -> dict:
    (link,) = json.loads(lab.run(namespace, ["ip", "-j", "-d", "link", "show", "dev", device]).stdout)
    prog_id = link["xdp"]["prog"]["id"]
    prog = json.loads(subprocess.run(["bpftool", "-j", "prog", "show", "id", str(prog_id)], capture_output=True,
                                     text=True, check=True).stdout)
    for map_id in prog["map_ids"]:
        info = json.loads(subprocess.run(["bpftool", "-j", "map", "show", "id", str(map_id)], capture_output=True,
                                         text=True, check=True).stdout)
        if info["name"] == "rr_conns":
            return info
    raise AssertionError(f"program {prog_id} has no rr_conns map")


@pytest.mark.parametrize("engine", ["afpacket", "xdp"])
def test_flood_of_new_flows(engine: str, tmp_path: Path) -> None:
    if engine == "xdp" and not default_object_path().exists():
        pytest.skip("run `make bpf` first")
    prefix = f"rf{os.getpid() % 100000}x{next(_counter)}-"
    socket_path = tmp_path / "ctl.sock"
    env = {"RR_ENGINE": engine, "RR_TABLE_SIZE": "1009", "RR_CONTROL_SOCKET": str(socket_path),
           "RR_CONN_CAPACITY": str(CAPACITY)}
    log = (tmp_path / "balancer.log").open("w+b")
    with Lab(2, prefix) as lab:
        lb, router = lab.balancers[0], lab.router
        conf = tmp_path / "flood.trafgen"
        conf.write_text(trafgen_config(lb.mac, router.mac, router.address, lb.address, lab.vip))
        procs = lab.start_balancers(env=env, stdout=log, stderr=log)
        try:
            (proc,) = procs
            _wait_until_served(lab, 20)
            assert "rusty_rail" in Path(f"/proc/{proc.pid}/cmdline").read_text()  # ip netns exec execs it
            conns = [lab.keepalive(timeout=DRAIN_SECONDS) for _ in range(4)]
            try:
                servers = {}
                for c in conns:
                    r = c.get()
                    assert r.ok, r.error
                    servers[c.sport] = r.server
                rss_before, rings_before = rss_outside_sockets(proc.pid)

                started = time.monotonic()
                sent = lab.run(router.namespace, ["trafgen", "--dev", router.device, "--conf", str(conf),
                                                  "--num", str(FLOWS), "--cpus", "1", "--no-sock-mem"], timeout=120)
                took = time.monotonic() - started
                print(f"{engine}: trafgen sent {FLOWS} frames in {took:.2f}s: {sent.stdout.strip()[-200:]!r}")

                # The balancer is up, still serving old and new connections, with their servers.
                assert proc.poll() is None, "the balancer died under the flood"
                for c in conns:
                    r = c.get()
                    assert r.ok and (r.server, r.sport) == (servers[c.sport], c.sport), r.error
                    print(f"{engine}: kept connection {c.sport} answered {time.monotonic() - started - took:.2f}s "
                          f"after the flood")
                assert all(r.ok for r in lab.traffic(n=10))
            finally:
                for c in conns:
                    c.close()

            rss_after, rings_after = rss_outside_sockets(proc.pid)
            status = _ctl_status(lab, socket_path)
            counters = status["counters"]
            grown = rss_after - rss_before
            print(f"{engine}: RSS outside rings {rss_before >> 20} -> {rss_after >> 20} MiB (+{grown / 2**20:.1f}), "
                  f"rings {rings_before >> 20} -> {rings_after >> 20} MiB; connections {counters['connections']}, "
                  f"evictions {counters['connection_evictions']}, forwarded {counters['forwarded']}")
            assert counters["connections"] <= CAPACITY
            assert grown <= CAPACITY * BYTES_PER_ENTRY + SLACK, f"grew by {grown} bytes"
            if engine == "afpacket":
                assert counters["connection_evictions"] > 0  # the flood overflowed the table
                assert counters["forwarded"] > 2 * CAPACITY
            else:
                info = _conns_map(lab, lb.namespace, lb.device)
                print(f"xdp: rr_conns max_entries {info['max_entries']}, bytes_memlock {info.get('bytes_memlock')}")
                assert info["max_entries"] == CAPACITY
                assert int(info["bytes_memlock"]) <= CAPACITY * LRU_ENTRY_BYTES + (64 << 10)
                assert counters["forwarded"] > 2 * CAPACITY  # (a loaded machine's veth may drop some)
                assert counters["connections"] > CAPACITY // 2  # the flood filled the table
            (report,) = stop_balancers(procs, logs=[tmp_path / "balancer.log"])
            assert report["engine"] == engine
        except BaseException:
            log.seek(0)
            print(log.read().decode(errors="replace")[-4000:])
            raise
