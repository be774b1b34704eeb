"""The delivery self-check: warns loudly when the device refuses frames the engine sent out.

An engine counts a frame forwarded when it hands it to the device; the device may still refuse it (native
XDP on a veth whose peer runs no XDP program drops every one). The engines read those refusals from the
device and report them as tx_refused drops (engines/device.py), so `forwarded` never counts them; this
check makes sure an operator hears of them without looking:

- `first` seconds after the engine is ready, then every `interval` seconds, it compares the counters
  with the previous look (the first, with zero: an engine's counters start at zero when it starts);
- if tx_refused grew, it logs a warning (event "self_check_failed") with the figures and what to do; a
  failure that goes on is logged again at most every `repeat` seconds, with the totals since;
- the first time frames went out and none was refused, it logs once that the check passed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from rusty_rail.core.verdict import DropReason
from rusty_rail.dataplane import Engine

log = logging.getLogger("rusty_rail.selfcheck")

REFUSED = DropReason.TX_REFUSED.name.lower()
HINT = ("native XDP on a veth whose peer runs no XDP program does this: set xdp_mode = auto or generic "
        "(RR_XDP_MODE), or run an XDP program on the peer; otherwise look at the device (down, its peer "
        "gone, its queue full)")


class DeliveryCheck:
    """Looks at `engine`'s counters from a thread of its own (start/stop), or when look() is called."""

    def __init__(self, engine: Engine, device: str, *, first: float = 3.0, interval: float = 10.0,
                 repeat: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.engine, self.device = engine, device
        self.first, self.interval, self.repeat, self.clock = first, interval, repeat, clock
        self.passed = False
        self.warnings = 0
        self._baseline = (0, 0)                         # (sent, refused) at the last look
        self._pending = (0, 0)                          # (sent, refused) not reported yet
        self._since: float | None = None                # the start of the span `_pending` covers
        self._last_warning: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def look(self) -> str | None:
        """One look; the warning logged, if any."""
        counters = self.engine.counters(walk=False)  # packet figures only: no connection-table walk
        if not counters.ready:
            return None
        refused = counters.drops.get(REFUSED, 0)
        sent = counters.forwarded + refused
        now = self.clock()
        if self._since is None:
            self._since = now
        d_sent, d_refused = sent - self._baseline[0], refused - self._baseline[1]
        self._baseline = (sent, refused)
        pending_sent, pending_refused = self._pending[0] + d_sent, self._pending[1] + d_refused
        self._pending = (pending_sent, pending_refused)
        if pending_refused > 0:
            if self._last_warning is not None and now - self._last_warning < self.repeat:
                return None
            message = (f"SELF-CHECK FAILED on {self.device}: the device refused {pending_refused} of the "
                       f"{pending_sent} frames the engine sent out in the last {now - self._since:.0f} s (drops "
                       f"{REFUSED}); they reached no backend. {HINT}")
            log.warning("%s", message, extra={"event": "self_check_failed", "device": self.device,
                                              "sent": pending_sent, "refused": pending_refused})
            self.warnings += 1
            self._last_warning, self._since, self._pending = now, now, (0, 0)
            return message
        if d_sent > 0 and not self.passed and not self.warnings:
            self.passed = True
            log.info("self-check on %s: %d frames sent out, none refused by the device", self.device, d_sent,
                     extra={"event": "self_check_passed", "device": self.device, "sent": d_sent})
        if pending_refused == 0:
            self._pending, self._since = (0, 0), now
        return None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="rr-selfcheck", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        try:
            while not self.engine.ready:
                if self._stop.wait(0.5):
                    return
            self._since = self.clock()
            wait = self.first
            while not self._stop.wait(wait):
                self.look()
                wait = self.interval
        except Exception:  # the check must never take the daemon down; say that it stopped, and why
            log.exception("the delivery self-check stopped")
