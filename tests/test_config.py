from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from rusty_rail.config import ConfigError, EngineKind, from_environment


def test_the_originals_form() -> None:
    config = from_environment({"RR_DEVICE": "eth0", "RR_TARGET_IPS": "10.2.0.1;10.2.0.2"})
    assert config.device == "eth0"
    assert config.targets == (IPv4Address("10.2.0.1"), IPv4Address("10.2.0.2"))
    assert config.engine == EngineKind.AUTO and config.workers == 1 and config.table_size == 65537


def test_single_target_and_separators() -> None:
    assert len(from_environment({"RR_DEVICE": "eth0", "RR_TARGET_IPS": "10.1.0.1"}).targets) == 1
    assert len(from_environment({"RR_DEVICE": "eth0", "RR_TARGET_IPS": " 10.2.0.1, 10.2.0.2 ;"}).targets) == 2


@pytest.mark.parametrize(
    "env, names",
    [
        ({"RR_TARGET_IPS": "10.2.0.1"}, "RR_DEVICE"),
        ({"RR_DEVICE": "eth0"}, "RR_TARGET_IPS"),
        ({"RR_DEVICE": "eth0", "RR_TARGET_IPS": "10.2.0.1;nope"}, "RR_TARGET_IPS"),
        ({"RR_DEVICE": "eth0", "RR_TARGET_IPS": "10.2.0.1;10.2.0.1"}, "RR_TARGET_IPS"),
        ({"RR_DEVICE": "eth0 x", "RR_TARGET_IPS": "10.2.0.1"}, "RR_DEVICE"),
        ({"RR_DEVICE": "eth0", "RR_TARGET_IPS": "10.2.0.1", "RR_ENGINE": "netmap"}, "RR_ENGINE"),
        ({"RR_DEVICE": "eth0", "RR_TARGET_IPS": "10.2.0.1", "RR_WORKERS": "two"}, "RR_WORKERS"),
        ({"RR_DEVICE": "eth0", "RR_TARGET_IPS": "10.2.0.1", "RR_TABLE_SIZE": "65536"}, "RR_TABLE_SIZE"),
    ],
)
def test_errors_name_the_variable(env: dict, names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        from_environment(env)


def test_connection_capacity() -> None:
    base = {"RR_DEVICE": "eth0", "RR_TARGET_IPS": "10.2.0.1"}
    assert from_environment(base).connection_capacity is None  # the default, 1 << 20
    assert from_environment({**base, "RR_CONN_CAPACITY": "65536"}).connection_capacity == 65536
    for bad, words in (("0", "below 1"), ("lots", "not a whole number"), (str(1 << 27), "above")):
        with pytest.raises(ConfigError, match=f"RR_CONN_CAPACITY.*{words}"):
            from_environment({**base, "RR_CONN_CAPACITY": bad})
