"""Follow a lab helper process that reports JSON lines on stdout (streams.py), or
read the events a daemon logged (its structured log: one JSON object a line, `event` naming it).

A reader thread collects the events as they come, so a test can wait for one with a deadline while the
process keeps running; nothing sleeps.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import netns

Event = dict[str, Any]


def logged(path: Path, name: str | None = None) -> list[Event]:
    """The JSON objects in a log file, in order (other lines skipped); only those named `name` if given."""
    events = []
    with open(path, errors="replace") as f:
        for line in f:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and (name is None or event.get("event") == name):
                events.append(event)
    return events


class Events:
    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.events: list[Event] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="rr-events", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()
        with self._cond:
            self.events.append({"event": "exited"})
            self._cond.notify_all()

    def wait(self, match: str | Callable[[Event], bool], timeout: float) -> Event:
        """The first event named `match` (or for which match(event) is true). TimeoutError at the
        deadline, or when the process exits without one."""
        test = (lambda e: e.get("event") == match) if isinstance(match, str) else match
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for e in self.events:
                    if test(e):
                        return e
                if any(e.get("event") == "exited" for e in self.events):
                    raise TimeoutError(f"the process exited before {match!r}: last events {self.events[-5:]}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {match!r} event within {timeout}s: last events {self.events[-5:]}")
                self._cond.wait(left)

    def of(self, name: str) -> list[Event]:
        with self._cond:
            return [e for e in self.events if e.get("event") == name]

    def close(self) -> None:
        netns.stop(self.proc, 5)
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> Events:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
