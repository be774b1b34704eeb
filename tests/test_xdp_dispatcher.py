"""engines/xdp/dispatcher.py: libxdp's multi-program dispatcher through its C API (ctypes).

In a VethPair (the test process enters only the lb namespace's network, so libxdp sees the host's
bpffs): xdp_pass.o attached through the dispatcher either runs as one of its components, or, where the
kernel refuses the dispatcher (libxdp then falls back to a plain attach), attach_object refuses with
DispatcherError and leaves the device without a program. Never a silent plain attach.
"""

from __future__ import annotations

import errno
import socket

import pytest

from rusty_rail.bpf import build
from rusty_rail.bpf.netns import in_netns
from rusty_rail.engines.xdp import dispatcher
from rusty_rail.engines.xdp.program import running_mode
from tests.engine_netns import VethPair

pytestmark = pytest.mark.netns


def test_libxdp_is_found() -> None:
    ok, why = dispatcher.available()
    assert ok, why


def test_attach_through_the_dispatcher_or_refuse_loudly(veth: VethPair) -> None:
    with in_netns(veth.lb_ns):
        ifindex = socket.if_nametoindex(veth.lb_dev)
        assert dispatcher.components(ifindex) == [] and not dispatcher.has_dispatcher(ifindex)
        try:
            component = dispatcher.XdpComponent.attach_object(str(build.object_path("xdp_pass")), ifindex, "skb")
        except dispatcher.DispatcherError as exc:
            assert exc.errno == errno.EOPNOTSUPP and "attach without the dispatcher" in str(exc), exc
            assert running_mode(ifindex) is None, "the fallback's plain attach was left behind"
            assert dispatcher.kernel_refusal() is not None, "libxdp refused, yet the check says the kernel allows it"
            print(f"refused: {exc}")
            return
        try:
            assert dispatcher.has_dispatcher(ifindex)
            assert dispatcher.kernel_refusal() is None, "libxdp built a dispatcher the check says the kernel refuses"
            assert [c.name for c in dispatcher.components(ifindex)] == ["rr_pass"]
        finally:
            component.detach()
        assert running_mode(ifindex) is None
