"""engines/device.py: the device's facts and refused frames, from fake netlink and ethtool answers."""

from __future__ import annotations

import errno

import pytest

from rusty_rail.engines.device import TxRefusals, device_facts, xdp_tx_error_stat
from tests.netlink_fakes import FakeLinks, generic_xdp, link, native_xdp


def test_a_veth_whose_peer_is_in_another_namespace_and_runs_native_xdp() -> None:
    ipr = FakeLinks(link("lb0", 2, "veth", peer=7, peer_nsid=3),
                    elsewhere={3: [link("peer0", 7, "veth", peer=2, peer_nsid=0, xdp=native_xdp(41))]})
    facts = device_facts("lb0", ipr)
    assert (facts.name, facts.ifindex, facts.kind, facts.is_veth) == ("lb0", 2, "veth", True)
    assert facts.peer is not None
    assert (facts.peer.name, facts.peer.netnsid, facts.peer.xdp_prog_id, facts.peer.unseen) == ("peer0", 3, 41, "")
    assert facts.peer.where == "peer0 in netns id 3"
    assert ipr.asked[-1] == {"index": 7, "IFLA_IF_NETNSID": 3}  # looked up where the peer lives
    assert not ipr.closed  # the caller's socket stays open


def test_a_peer_in_the_same_namespace_with_nothing_or_only_generic_xdp() -> None:
    for xdp in (None, generic_xdp(9)):  # a generic-mode program gives the peer no XDP receive ring
        ipr = FakeLinks(link("a", 2, "veth", peer=3), link("b", 3, "veth", peer=2, xdp=xdp))
        peer = device_facts("a", ipr).peer
        assert peer is not None and (peer.name, peer.netnsid, peer.xdp_prog_id) == ("b", None, 0)
        assert peer.where == "b"


def test_a_peer_that_cannot_be_looked_up_is_unseen() -> None:
    ipr = FakeLinks(link("lb0", 2, "veth", peer=7, peer_nsid=3), refuse={3: errno.EPERM})
    peer = device_facts("lb0", ipr).peer
    assert peer is not None and peer.name is None and "looking it up failed" in peer.unseen
    gone = device_facts("lb0", FakeLinks(link("lb0", 2, "veth", peer=7, peer_nsid=4))).peer
    assert gone is not None and gone.unseen and gone.where == "ifindex 7 in netns id 4"


def test_other_devices_have_no_peer_and_a_missing_one_is_an_error() -> None:
    nic = device_facts("eth0", FakeLinks(link("eth0", 2)))
    assert (nic.kind, nic.peer, nic.is_veth) == (None, None, False)
    assert device_facts("br0", FakeLinks(link("br0", 4, "bridge"))).kind == "bridge"
    with pytest.raises(LookupError, match="eth9"):
        device_facts("eth9", FakeLinks(link("eth0", 2)))


class FakeEthtool:
    def __init__(self, stats: list[tuple[str, int]]) -> None:
        self.stats, self.closed = stats, False

    def get_statistics(self) -> list[tuple[str, int]]:
        return self.stats

    def close(self) -> None:
        self.closed = True


def test_tx_refusals_of_a_veth_are_its_tx_dropped_growth() -> None:
    lb0 = link("lb0", 2, "veth", peer=3, tx_dropped=5)
    opened: list[str] = []
    refusals = TxRefusals("lb0", FakeLinks(lb0), ethtool_of=lambda d: opened.append(d))
    assert opened == [], "veth counts its XDP TX errors in tx_dropped: no ethtool statistics"
    assert refusals.read() == 0  # since start, not since the device was made
    lb0.attrs["IFLA_STATS64"] = {"tx_dropped": 105}
    assert refusals.read() == 100


def test_tx_refusals_of_other_drivers_add_their_xdp_tx_error_statistics() -> None:
    nic = link("eth0", 2, tx_dropped=1)
    ethtool = FakeEthtool([("rx_packets", 10), ("tx_xdp_err", 2), ("rx_queue_0_xdp_tx_drops", 3), ("tx_xdp_xmit", 50)])
    refusals = TxRefusals("eth0", FakeLinks(nic), ethtool_of=lambda d: ethtool)
    nic.attrs["IFLA_STATS64"] = {"tx_dropped": 2}
    ethtool.stats = [("rx_packets", 99), ("tx_xdp_err", 12), ("rx_queue_0_xdp_tx_drops", 3), ("tx_xdp_xmit", 90)]
    assert refusals.read() == 1 + 10
    refusals.close()
    assert ethtool.closed


def test_tx_refusals_never_go_backwards_and_survive_an_unreadable_device() -> None:
    lb0 = link("lb0", 2, "veth", tx_dropped=50)
    ipr = FakeLinks(lb0)
    refusals = TxRefusals("lb0", ipr)
    lb0.attrs["IFLA_STATS64"] = {"tx_dropped": 60}
    assert refusals.read() == 10
    lb0.attrs["IFLA_STATS64"] = {"tx_dropped": 3}  # the device was re-created: counting goes on from here
    assert refusals.read() == 10
    lb0.attrs["IFLA_STATS64"] = {"tx_dropped": 8}
    assert refusals.read() == 15
    ipr.namespaces[None] = []  # gone
    assert refusals.read() == 15
    refusals.close()
    refusals.close()
    assert ipr.closed and refusals.read() == 15


def test_which_ethtool_statistics_count_as_xdp_tx_errors() -> None:
    assert all(map(xdp_tx_error_stat, ["rx_queue_0_xdp_tx_errors", "tx_xdp_err", "rx_xdp_tx_drops", "xdp_tx_fail"]))
    assert not any(map(xdp_tx_error_stat, ["rx_queue_0_xdp_tx", "tx_errors", "rx_xdp_drop", "xdp_redirect_err"]))
