"""Coverage-guided fuzzing of the parsers and both engines (atheris), a million inputs by default.

    sudo .venv/bin/python bench/fuzz.py [-runs=1000000] [other libFuzzer flags]

The invariant is tests/fuzz_target.py's: parse or raise ParseError; decide() never raises; XDP and
Python agree on verdict and bytes. The golden fixtures seed the corpus. Prints inputs per second and
the result; a disagreement or crash stops the run with the input written by libFuzzer (crash-*).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import atheris  # noqa: E402

# Coverage feedback from the project's own code only (the codecs and the decision), not from scapy.
with atheris.instrument_imports(include=["rusty_rail"]):
    from tests.fuzz_target import Target, seeds  # noqa: E402

TARGET = Target()
START = time.monotonic()
RUNS = 1_000_000


def _report() -> None:
    elapsed = max(time.monotonic() - START, 1e-9)
    print(f"fuzz: {TARGET.inputs} inputs in {elapsed:.0f}s ({TARGET.inputs / elapsed:.0f}/s), "
          f"no disagreement; counters {TARGET.balancer.counters()}", flush=True)
    TARGET.close()


def one_input(data: bytes) -> None:
    TARGET.check(data)
    if TARGET.inputs == RUNS:  # libFuzzer _exit()s when -runs is reached: report on the last input
        _report()


def main() -> None:
    corpus = tempfile.mkdtemp(prefix="rr-fuzz-")
    for i, frame in enumerate(seeds()):
        with open(os.path.join(corpus, f"seed-{i}"), "wb") as f:
            f.write(frame)
    global RUNS
    flags = sys.argv[1:] or [f"-runs={RUNS}"]
    if not any(f.startswith("-rss_limit_mb=") for f in flags):
        # libFuzzer's default 2 GB stops a million-input run near 860,000: the process grows ~2.4 KB per
        # input under atheris' instrumentation while the target itself holds ~45 B per input (its bounded
        # connection tables; measured without atheris over 40,000 inputs).
        flags.append("-rss_limit_mb=4096")
    RUNS = next((int(f.split("=", 1)[1]) for f in flags if f.startswith("-runs=")), -1)
    argv = [sys.argv[0], corpus, "-max_len=1600", *flags]
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
