"""The golden fixtures through the Python core: verdict and exact bytes."""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from rusty_rail.core.verdict import Action
from tests.fixtures.golden import fixtures, golden_balancer


@pytest.mark.parametrize("fx", fixtures(), ids=lambda fx: fx.description)
def test_golden_fixture(fx) -> None:
    balancer = golden_balancer()
    verdict = balancer.decide(fx.frame, now=0.0)
    assert verdict.action == fx.action
    if fx.action == Action.DROP:
        assert verdict.reason == fx.reason
        assert balancer.drops[fx.reason] == 1
    if fx.action == Action.FORWARD:
        assert str(ip_address(verdict.backend)) == fx.backend
    if fx.action in (Action.FORWARD, Action.REPLY):
        assert verdict.frame.hex() == fx.output.hex()


def test_fixtures_cover_every_wire_drop_reason() -> None:
    from rusty_rail.core.verdict import DropReason

    covered = {fx.reason for fx in fixtures() if fx.reason is not None}
    # TX_REFUSED is the device's verdict after the engine's: no frame alone produces it; ICMP_RATE_LIMITED
    # needs an emptied token bucket (tests/test_options.py, tests/test_xdp_options.py)
    engine_only = {DropReason.NO_BACKEND, DropReason.NO_NEIGHBOUR, DropReason.NO_SERVICE, DropReason.TX_FAILED,
                   DropReason.TX_REFUSED, DropReason.ICMP_RATE_LIMITED}
    assert set(DropReason) - engine_only <= covered
