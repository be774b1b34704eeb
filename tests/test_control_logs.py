from __future__ import annotations

import io
import json
import logging

from rusty_rail.control.logs import setup_logging


def test_json_lines_when_not_a_terminal() -> None:
    stream = io.StringIO()
    handler = setup_logging(verbose=False, stream=stream)
    try:
        log = logging.getLogger("rusty_rail.test")
        log.debug("not shown")
        log.warning("backend %s down", "10.2.0.1", extra={"backend": "10.2.0.1", "up": False})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    finally:
        logging.getLogger().removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 2
    first = lines[0]
    assert first["level"] == "warning" and first["logger"] == "rusty_rail.test"
    assert first["msg"] == "backend 10.2.0.1 down" and first["backend"] == "10.2.0.1" and first["up"] is False
    assert first["ts"].endswith("+00:00")
    assert "ValueError: boom" in lines[1]["exc"]


def test_human_format_on_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Tty()
    handler = setup_logging(verbose=True, stream=stream)
    try:
        logging.getLogger("rusty_rail.test").debug("hello")
    finally:
        logging.getLogger().removeHandler(handler)
    assert stream.getvalue().rstrip().endswith("DEBUG rusty_rail.test: hello")
