from __future__ import annotations

import copy
import io

from rusty_rail.control.plane import ControlPlane
from rusty_rail.control.top import render, render_text
from tests.control_fakes import B1, WEB, FakeEngine, two_services


def test_render_shows_services_and_backends() -> None:
    plane = ControlPlane(two_services(), FakeEngine())
    plane.drain(WEB, B1)
    text = render_text(plane.status())
    assert "10.1.0.1:80/tcp" in text and "10.1.0.1:53/udp" in text
    assert "-> 10.2.0.1" in text and "-> 10.2.0.2" in text
    assert "drained" in text and "no_service 2" in text


def test_rates_from_the_previous_status() -> None:
    status = ControlPlane(two_services(), FakeEngine()).status()
    later = copy.deepcopy(status)
    later["services"][0]["backends"][0]["packets"] += 500
    from rich.console import Console

    console = Console(width=140, record=True, color_system=None, file=io.StringIO())
    console.print(render(later, status, elapsed=0.5))
    assert "1000" in console.export_text()
