"""control/selfcheck.py: a warning when the device refuses what the engine sends; quiet otherwise."""

from __future__ import annotations

import logging
import threading
from typing import cast

import pytest

from rusty_rail.control.selfcheck import DeliveryCheck
from rusty_rail.dataplane import Counters, Engine
from tests.engine_netns import wait_for


class Figures:
    """An engine as far as the check sees one: counters() only."""

    def __init__(self) -> None:
        self.forwarded, self.refused, self.ready = 0, 0, True
        self.looks = 0

    def counters(self, *, walk: bool = True) -> Counters:
        assert not walk, "the check needs no connection-table walk"
        self.looks += 1
        return Counters(forwarded=self.forwarded, drops={"tx_refused": self.refused, "no_service": 3}, ready=self.ready)


def check_of(figures: Figures, now: list[float]) -> DeliveryCheck:
    return DeliveryCheck(cast(Engine, figures), "lb0", repeat=60.0, clock=lambda: now[0])


def test_refusals_warn_with_the_figures_and_repeat_at_most_every_minute(caplog: pytest.LogCaptureFixture) -> None:
    figures, now = Figures(), [0.0]
    check = check_of(figures, now)
    assert check.look() is None  # ready, nothing sent yet
    figures.forwarded, figures.refused = 5, 995
    now[0] = 3.0
    warning = check.look()
    assert warning is not None and "SELF-CHECK FAILED on lb0" in warning
    assert "refused 995 of the 1000 frames the engine sent out in the last 3 s" in warning and "xdp_mode" in warning
    record = next(r for r in caplog.records if getattr(r, "event", None) == "self_check_failed")
    assert record.levelno == logging.WARNING and (record.sent, record.refused) == (1000, 995)  # type: ignore[attr-defined]
    figures.refused += 1000
    now[0] = 13.0
    assert check.look() is None  # within the minute: counted, not repeated
    figures.refused += 1000
    now[0] = 63.0
    again = check.look()
    assert again is not None and "refused 2000 of the 2000 frames" in again and "last 60 s" in again
    assert check.warnings == 2 and not check.passed


def test_a_clean_start_passes_once_and_an_idle_or_unready_engine_says_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    figures, now = Figures(), [0.0]
    figures.ready = False
    check = check_of(figures, now)
    assert check.look() is None and check.look() is None  # not ready: nothing to judge
    figures.ready = True
    assert check.look() is None and not check.passed  # nothing sent yet
    figures.forwarded = 2000
    assert check.look() is None and check.passed
    figures.forwarded = 4000
    assert check.look() is None
    passes = [r for r in caplog.records if getattr(r, "event", None) == "self_check_passed"]
    assert len(passes) == 1 and "2000 frames sent out, none refused" in passes[0].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_refusals_before_the_first_look_count() -> None:
    figures, now = Figures(), [0.0]
    figures.forwarded, figures.refused = 0, 2000  # all sent and refused before the check first looked
    warning = check_of(figures, now).look()
    assert warning is not None and "refused 2000 of the 2000 frames" in warning


def test_the_thread_waits_for_the_engine_then_looks_after_first_and_every_interval() -> None:
    figures = Figures()
    figures.ready = False
    check = DeliveryCheck(cast(Engine, figures), "lb0", first=0.05, interval=0.05)
    check.start()
    try:
        assert figures.looks == 0  # not ready: no look
        figures.forwarded = 100
        figures.ready = True
        wait_for(lambda: check.passed, what="the first look")
        figures.refused = 20
        wait_for(lambda: check.warnings == 1, what="a warning from the thread")
    finally:
        check.stop()
    assert not any(t.name == "rr-selfcheck" and t.is_alive() for t in threading.enumerate())
