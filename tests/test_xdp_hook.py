"""engines/xdp/hook.py: someone else's XDP program on the device is never replaced; ours still is.

In a tests.engine_netns.VethPair (both namespaces removed afterwards, also on failure). The foreign
program is a firewall's stand-in: an XDP_PASS program loaded under its own name, fw_filter, attached
plainly (as xdp-filter ends up on a kernel that refuses libxdp's dispatcher). The balancer runs as
people run it, `python -m rusty_rail` under `ip netns exec`, in the seed's environment form and with
`run --config`.

On this machine's kernel (6.18) libxdp's dispatcher cannot load (dispatcher.kernel_refusal: EPERM on
the freplace component), so the dispatcher path is refused here; where a kernel allows it,
test_xdp_dispatcher.py's either-outcome test exercises it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rusty_rail.bpf import libbpf
from rusty_rail.dataplane import EngineOptions, XdpMode
from rusty_rail.engines.xdp import XdpEngine, XdpProgram, attach_pass, default_object_path, dispatcher
from rusty_rail.engines.xdp.hook import HookRefused, only_ours, program_info, running_program
from rusty_rail.engines.xdp.program import running_mode
from rusty_rail.lab.events import logged
from tests.engine_netns import VethPair
from tests.xdp_support import catch_all_state

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, XDP)"),
              pytest.mark.skipif(not default_object_path().exists(), reason="run `make bpf` first")]

FOREIGN = "fw_filter"
BPF_PROG_TYPE_XDP = 6


@pytest.fixture
def pair(veth: VethPair) -> VethPair:
    """conftest's veth pair, under the name these tests use."""
    return veth


def attach_foreign(v: VethPair) -> int:
    """The stand-in firewall on the balancer's device, generic mode; its program id."""
    with v.inside(v.lb_ns):
        fd = libbpf.prog_load(BPF_PROG_TYPE_XDP, libbpf.XDP_PASS_INSNS, name=FOREIGN)
        try:
            libbpf.xdp_attach(socket.if_nametoindex(v.lb_dev), fd, libbpf.XDP_FLAGS_SKB_MODE)
        finally:
            os.close(fd)  # the device holds it
        return libbpf.xdp_query_id(socket.if_nametoindex(v.lb_dev))


def device_hook(v: VethPair) -> tuple[int, str | None]:
    """(the id of the program on the lb device, its mode)."""
    with v.inside(v.lb_ns):
        ifindex = socket.if_nametoindex(v.lb_dev)
        return libbpf.xdp_query_id(ifindex), running_mode(ifindex)


def run_daemon(v: VethPair, tmp: Path, argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    """`python -m rusty_rail [argv]` in the lb namespace until it exits: (status, its output)."""
    log = tmp / "daemon.log"
    with open(log, "wb") as out:
        status = subprocess.run(["ip", "netns", "exec", v.lb_ns, sys.executable, "-m", "rusty_rail", *argv],
                                env={**os.environ, "RR_CONTROL_SOCKET": str(tmp / "ctl.sock"), **env},
                                stdout=out, stderr=out, timeout=60).returncode
    return status, log.read_text()


def the_one_refusal(log: Path) -> str:
    failed = logged(log, "engine_failed")
    assert len(failed) == 1 and not logged(log, "started") and not logged(log, "xdp_attached"), log.read_text()
    assert "Traceback" not in log.read_text()
    message = failed[0]["msg"]
    assert "\n" not in message
    return message


def test_ours_and_anyone_elses_are_told_apart(pair: VethPair) -> None:
    foreign = attach_foreign(pair)
    with pair.inside(pair.lb_ns):
        running = running_program(socket.if_nametoindex(pair.lb_dev))
        assert running is not None and (running.id, running.name, running.ours) == (foreign, FOREIGN, False)
        with XdpProgram(table_size=251, conn_capacity=64) as ours:
            info = program_info(ours.prog_fd)
            assert info.ours and info.name == "rr_balance" and "rr_conns" in info.maps and len(info.tag) == 16
    pass_id = attach_pass(pair.peer_dev, netns=pair.peer_ns)  # the project's lab helper is not the balancer
    with pair.inside(pair.peer_ns):
        helper = running_program(socket.if_nametoindex(pair.peer_dev))
        assert helper is not None and helper.id == pass_id and not helper.ours


def test_the_seed_invocation_refuses_beside_a_foreign_program(pair: VethPair, tmp_path: Path) -> None:
    foreign = attach_foreign(pair)
    status, output = run_daemon(pair, tmp_path, [], {"RR_DEVICE": pair.lb_dev, "RR_TARGET_IPS": pair.peer_ip})
    assert status == 1, output
    message = the_one_refusal(tmp_path / "daemon.log")
    assert f"XDP program {foreign} '{FOREIGN}'" in message and pair.lb_dev in message, message
    assert "not replaced" in message and f"ip link set {pair.lb_dev} xdp off" in message, message
    refusal = dispatcher.kernel_refusal()
    assert (refusal or "attached without libxdp's dispatcher") in message, message
    assert device_hook(pair) == (foreign, "skb")  # the firewall still runs, in its mode, nothing beside it


def test_xdp_dispatcher_true_refuses_where_the_dispatcher_cannot_load(pair: VethPair, tmp_path: Path) -> None:
    if dispatcher.kernel_refusal() is None:
        pytest.skip("this kernel allows libxdp's dispatcher (test_xdp_dispatcher.py covers it)")
    config = tmp_path / "rusty-rail.toml"
    config.write_text(f'device = "{pair.lb_dev}"\nxdp_dispatcher = true\n\n[[services]]\nvip = "10.1.0.1"\n'
                      f'backends = ["{pair.peer_ip}"]\n')
    status, output = run_daemon(pair, tmp_path, ["run", "--config", str(config)], {})
    assert status == 1, output
    message = the_one_refusal(tmp_path / "daemon.log")
    assert message.endswith("set xdp_dispatcher = false for a plain attach") and "EPERM" in message, message
    assert pair.lb_dev in message
    assert device_hook(pair) == (0, None)  # nothing attached, nothing left


def test_only_ours_is_replaced_atomically(pair: VethPair) -> None:
    """The attach's own guard (a program that appears after the plan looked): anyone else's is refused
    on the very fd XDP_FLAGS_REPLACE would name; our leftover is replaced without a gap. The engine
    refuses before loading anything."""
    with pair.inside(pair.lb_ns), XdpProgram(table_size=251, conn_capacity=64) as first, \
            XdpProgram(table_size=251, conn_capacity=64) as second:
        ifindex = socket.if_nametoindex(pair.lb_dev)
        first.attach(ifindex, "skb")
        leftover = libbpf.xdp_query_id(ifindex)
        first._attached = None  # as if its process had died without detaching
        second.attach(ifindex, "skb", may_replace=only_ours(pair.lb_dev))
        assert second.replaced_program_id == leftover and libbpf.xdp_query_id(ifindex) not in (0, leftover)
        second.detach()
    foreign = attach_foreign(pair)
    with pair.inside(pair.lb_ns), XdpProgram(table_size=251, conn_capacity=64) as third:
        with pytest.raises(HookRefused, match=rf"XDP program {foreign} '{FOREIGN}' \(tag [0-9a-f]{{16}}\), not Rusty Rail's"):
            third.attach(pair.lb_dev, "skb", may_replace=only_ours(pair.lb_dev))
        assert third.attached_ifindex is None
    engine = XdpEngine(EngineOptions(device=pair.lb_dev, connection_capacity=1024, xdp_mode=XdpMode.GENERIC))
    engine.apply(catch_all_state([pair.peer_ip], 251))
    with pair.inside(pair.lb_ns):
        with pytest.raises(HookRefused, match=f"runs on {pair.lb_dev}; it is not replaced"):
            engine.start()
    assert engine.program is None and device_hook(pair) == (foreign, "skb")
