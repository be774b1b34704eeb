"""engines/xdp/mode.py: native or generic, per device, from fake device facts (no netlink, no BPF)."""

from __future__ import annotations

import errno

from rusty_rail.dataplane import EngineOptions, XdpMode
from rusty_rail.engines.device import DeviceFacts, PeerFacts, device_facts
from rusty_rail.engines.xdp.mode import GENERIC, NATIVE, attach_mode, decide
from tests.netlink_fakes import FakeLinks, link, native_xdp

VETH_ALONE = DeviceFacts("lb0", 2, "veth", PeerFacts(7, 3, "peer0", 0))
VETH_WITH_XDP = DeviceFacts("lb0", 2, "veth", PeerFacts(7, 3, "peer0", 41))
VETH_UNSEEN = DeviceFacts("lb0", 2, "veth", PeerFacts(7, 3, unseen="looking it up failed: EPERM"))
NIC = DeviceFacts("eth0", 2, None)


def test_auto_on_a_veth_whose_peer_runs_no_xdp_is_generic_and_says_why() -> None:
    choice = decide(XdpMode.AUTO, VETH_ALONE)
    assert choice.mode == GENERIC and choice.warning is None
    assert "lb0 is a veth whose peer peer0 in netns id 3 runs no XDP program" in choice.why
    unseen = decide(XdpMode.AUTO, VETH_UNSEEN)
    assert unseen.mode == GENERIC and "peer cannot be seen (looking it up failed: EPERM)" in unseen.why


def test_auto_is_native_where_native_delivers() -> None:
    with_xdp = decide(XdpMode.AUTO, VETH_WITH_XDP)
    assert with_xdp.mode == NATIVE and "runs XDP program 41" in with_xdp.why and with_xdp.warning is None
    assert decide(XdpMode.AUTO, NIC).mode == NATIVE
    assert decide(XdpMode.AUTO, DeviceFacts("vx0", 5, "vxlan")).why == "native mode (vx0 is a vxlan device)"
    assert decide(XdpMode.AUTO, None, "netlink said no").why == "native mode (the device's kind could not be read: netlink said no)"


def test_forced_modes_are_honoured_and_native_on_a_lone_veth_warns() -> None:
    assert decide(XdpMode.GENERIC, VETH_WITH_XDP).mode == GENERIC
    assert decide(XdpMode.GENERIC, NIC).mode == GENERIC
    forced = decide(XdpMode.NATIVE, VETH_ALONE)
    assert forced.mode == NATIVE and forced.warning is not None
    assert "tx_refused" in forced.warning and "xdp_mode = auto or generic" in forced.warning
    assert decide(XdpMode.NATIVE, VETH_UNSEEN).warning is not None
    assert decide(XdpMode.NATIVE, VETH_WITH_XDP).warning is None
    assert decide(XdpMode.NATIVE, NIC).warning is None


def test_attach_mode_reads_the_device_unless_generic_is_forced() -> None:
    ipr = FakeLinks(link("lb0", 2, "veth", peer=7, peer_nsid=3), elsewhere={3: [link("peer0", 7, "veth", peer=2)]})
    asked: list[str] = []

    def facts_of(device: str) -> DeviceFacts:
        asked.append(device)
        return device_facts(device, ipr)

    assert attach_mode(EngineOptions("lb0"), facts_of=facts_of).mode == GENERIC
    ipr.namespaces[3] = [link("peer0", 7, "veth", peer=2, xdp=native_xdp(41))]
    assert attach_mode(EngineOptions("lb0"), facts_of=facts_of).mode == NATIVE
    assert attach_mode(EngineOptions("lb0", xdp_mode=XdpMode.GENERIC), facts_of=facts_of).mode == GENERIC
    assert asked == ["lb0", "lb0"]

    def unreadable(device: str) -> DeviceFacts:
        raise OSError(errno.EPERM, "Operation not permitted")

    assert attach_mode(EngineOptions("lb0"), facts_of=unreadable).mode == NATIVE
