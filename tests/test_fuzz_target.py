"""A short slice of the fuzz run (bench/fuzz.py runs a million inputs): mutated fixtures and noise."""

from __future__ import annotations

import random

import pytest

from rusty_rail.engines.xdp import default_object_path
from tests.fuzz_target import Target, seeds

pytestmark = [pytest.mark.netns, pytest.mark.skipif(not default_object_path().exists(), reason="run `make bpf` first")]


def mutate(rng: random.Random, frame: bytes) -> bytes:
    data = bytearray(frame)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(4)
        if op == 0 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif op == 1 and data:
            del data[rng.randrange(len(data)) :]
        elif op == 2:
            data += rng.randbytes(rng.randint(1, 16))
        elif data:
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    return bytes(data)


def test_fuzz_slice_parsers_and_engines_agree() -> None:
    rng = random.Random(20261126)
    corpus = seeds()
    target = Target()
    try:
        for _ in range(4000):
            data = mutate(rng, rng.choice(corpus)) if rng.random() < 0.9 else rng.randbytes(rng.randint(0, 120))
            target.check(data)
        target.check_counters()
    finally:
        target.close()
    counters = target.balancer.counters()
    assert counters["forwarded"] > 100 and counters["passed"] > 50  # the slice reached both ends
    assert counters["forwarded_ipv6"] > 50, counters  # and the IPv6 paths
    # and the options' paths (docs/WIRE.md section 11): echo and "too big" answers, QUIC server IDs
    assert min(counters["icmp_echo_replies"], counters["icmp_too_big"], counters["quic_routed"]) > 0, counters
