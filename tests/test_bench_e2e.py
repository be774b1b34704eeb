"""The end-to-end comparison's pieces that need no lab: the balancer's configuration file (through the
real validators), the peers' configurations (nft checks the ruleset in a namespace of its own), and
the medians and ratios of the summary."""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from rusty_rail.bench import e2e, peers
from rusty_rail.control.config import load_config
from rusty_rail.engines.device import native_xdp_prog_id
from rusty_rail.lab import netns
from rusty_rail.lab.lab import Lab
from rusty_rail.lab.topology import plan


def lab() -> Lab:
    return Lab(topology=2, prefix="rrb-unit-")  # a plan only: never brought up here


def test_balancer_config_passes_the_validators(tmp_path) -> None:
    path = tmp_path / "rr.toml"
    path.write_text(e2e.balancer_config(lab(), "xdp", "generic"))
    config = load_config(path)
    assert (config.engine.value, config.xdp_mode.value) == ("xdp", "generic")
    assert config.control_socket == str(lab().log_dir / "rr-bench.sock")  # not the default a host's daemon holds
    ports = {s.key.port: [str(b.address) for b in s.backends] for s in config.services}
    assert ports == {80: ["192.168.137.21", "192.168.137.22"], 5201: ["192.168.137.21"]}


def test_haproxy_and_nginx_configs_name_every_server() -> None:
    p = plan(2, "rrb-unit-")
    text = peers.haproxy_config(p.balancers[0], p.servers)
    assert "mode tcp" in text and "bind 192.168.137.11:80" in text and "bind 192.168.137.11:5201" in text
    assert "server server2 192.168.137.22:80" in text and "192.168.137.22:5201" not in text
    nginx = peers.nginx_config(Path("/run/lab"), "server1", Path("/run/lab/www"))
    assert "listen 80 reuseport" in nginx and "root /run/lab/www;" in nginx
    assert "/var/" not in nginx  # pid, logs and temp files stay in the lab's directory


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0, reason="nft -c needs root (a namespace of its own)")
def test_nft_dnat_ruleset_is_accepted_by_nft() -> None:
    p = plan(2, "rrb-unit-")
    ns = f"rrbnft{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        done = subprocess.run(["ip", "netns", "exec", ns, "nft", "-c", "-f", "-"], capture_output=True, text=True,
                              input=peers.nft_dnat_ruleset(p.balancers[0], p.servers))
        assert done.returncode == 0, done.stderr
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)


def test_receiver_frames_are_counted_in_its_namespace() -> None:
    """netns.rx_packets reads the device of the namespace named, not the host's: 7 frames sent into a
    veth pair of a namespace of its own show as 7 at the peer."""
    ns = f"rrbrx{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        # no IPv6 on the new links: their own router solicitations and MLD reports would be counted too
        netns.sysctl(ns, {"net.ipv6.conf.all.disable_ipv6": 1, "net.ipv6.conf.default.disable_ipv6": 1})
        with IPRoute(netns=ns) as ipr:
            ipr.link("add", ifname="rxa", kind="veth", peer="rxb")
            for name in ("rxa", "rxb"):
                ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")
        before = netns.rx_packets(ns, "rxb")
        send = ("import socket; s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); s.bind(('rxa', 0)); "
                "[s.send(b'\\xff' * 6 + bytes.fromhex('020000000001') + b'\\x88\\xb5' + bytes(46)) for _ in range(7)]")
        subprocess.run(["ip", "netns", "exec", ns, "python3", "-c", send], check=True)
        assert netns.rx_packets(ns, "rxb") - before == 7
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)


def test_summary_medians_and_ratios() -> None:
    def rounds(*values: float) -> list[dict[str, float]]:
        return [{"value": v, "retransmits": 10 * v, "ofo_queued": 0.0, "reorder_seen": 1.0, "frames_per_mb": 700.0 * v}
                for v in values]

    samples = {"wire": {"direct": {"upload": rounds(2.0, 4.0, 3.0)}, "gre": {"upload": rounds(1.0, 1.5, 2.0)},
                        "rr-xdp": {"upload": rounds(1.5, 0.1, 1.5)}}}
    row = e2e.summarise(samples)["wire"]["upload"]
    assert row["direct"]["median"] == 3.0 and row["direct"]["ratio_direct"] == 1.0
    assert row["gre"]["ratio_direct"] == 0.5
    assert row["rr-xdp"]["ratio_gre"] == 1.0 and (row["rr-xdp"]["min"], row["rr-xdp"]["max"]) == (0.1, 1.5)
    assert row["rr-xdp"]["retransmits"] == 15.0 and row["rr-xdp"]["frames_per_mb"] == 1050.0


def test_unknown_path_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown path"):
        with e2e.path(lab(), "ipvs"):
            pass


def test_missing_tools_names_debian_packages(monkeypatch) -> None:
    monkeypatch.setattr(peers.shutil, "which", lambda tool: None if tool in ("wrk", "nft") else "/usr/bin/" + tool)
    assert peers.missing_tools() == ["nftables", "wrk"]


@pytest.mark.netns
def test_wire_like_and_the_bridge_ports_without_xdp() -> None:
    with Lab(topology=1, prefix=f"rrb{os.getpid() % 100000}w-") as up:
        e2e.wire_like(up)
        p = up.plan
        for h in (*p.clients, p.router, *p.balancers, *p.servers):
            assert not any(netns.offload_on(p.net_ns, h.bridge_port, f) for f in e2e.WIRE_OFF), h.bridge_port
        rps = {h.bridge_port: int(up.run(p.net_ns, ["cat", f"/sys/class/net/{h.bridge_port}/queues/rx-0/rps_cpus"])
                                  .stdout.strip().replace(",", ""), 16) for h in (*p.clients, *p.servers)}
        everyone = sum(1 << cpu for cpu in os.sched_getaffinity(0))
        assert rps == {port: everyone for port in rps}

        def bridge_port_xdp() -> list[int]:
            with IPRoute(netns=p.net_ns) as ipr:
                return [native_xdp_prog_id(ipr.get_links(ifname=b.bridge_port)[0]) for b in p.balancers]

        assert all(bridge_port_xdp())
        with e2e.no_peer_xdp(up):
            assert not any(bridge_port_xdp())
        assert all(bridge_port_xdp()), "put back for the path that needs it"
