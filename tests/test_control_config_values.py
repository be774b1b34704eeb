"""The configuration's value checks: each returns the value or raises ConfigError naming where it was written."""

from __future__ import annotations

from typing import Any

import pytest

from rusty_rail.control import config_values as check
from rusty_rail.control.config_values import ConfigError


def _entry(raw: Any, path: str) -> dict:
    return dict(check.table(raw, path, {"name", "size"}))


def test_unique_list_parses_every_entry_with_its_path() -> None:
    seen: list[str] = []

    def item(raw: Any, path: str) -> str:
        seen.append(path)
        return check.string(raw, path)

    assert check.unique_list(["a", "b"], "x.things", item, lambda s: s) == ["a", "b"]
    assert seen == ["x.things[0]", "x.things[1]"]


@pytest.mark.parametrize(("value", "kwargs", "message"), [
    ([{"name": "a"}, {"name": "b"}, {"name": "a"}], {}, "pools[2]: a is already pools[0]"),
    ([{"name": "a"}, {"name": "a"}], {"key_name": "name"}, "pools[1].name: a is already pools[0]"),
    ([], {"none": "none configured"}, "pools: none configured"),
    ("a", {}, 'pools: "a" is not a list'),
    ([{"name": "a", "colour": 1}], {}, "pools[0].colour: unknown key (expected one of name, size)"),
])
def test_unique_list_names_the_bad_entry(value: Any, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        check.unique_list(value, "pools", _entry, lambda e: e["name"], **kwargs)
    assert str(err.value) == message


def test_an_empty_list_is_fine_without_a_message() -> None:
    assert check.unique_list([], "backends", _entry, lambda e: e["name"]) == []


def test_the_key_in_a_nested_list_names_only_its_own_list() -> None:
    with pytest.raises(ConfigError, match=r"^bgp.peers\[1\]: 1 is already peers\[0\]$"):
        check.unique_list([1, 1], "bgp.peers", lambda raw, path: raw, lambda v: v)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: check.integer(True, "workers", 1, 8), "workers: true is not a whole number"),
    (lambda: check.integer("9", "RR_WORKERS", 1, 8), "RR_WORKERS: 9 is not <= 8"),
    (lambda: check.seconds(0, "interval"), "interval: 0 is not > 0"),
    (lambda: check.flag("yes", "RR_XDP_DISPATCHER"), 'RR_XDP_DISPATCHER: "yes" is not true or false'),
    (lambda: check.table_size(65536, "table_size"), "table_size: 65536 is not prime"),
    (lambda: check.device_name("a b", "device"), 'device: "a b" is not an interface name'),
    (lambda: check.address("10.0.0.300", "vip"), 'vip: "10.0.0.300" is not an IPv4 or IPv6 address'),
    (lambda: check.socket_path("/" + "s" * 107, "control_socket"),
     f'control_socket: "/{"s" * 107}" is longer than a unix socket path may be (107 bytes)'),
])
def test_each_check_names_the_value_and_where(call: Any, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        call()
    assert str(err.value) == message


def test_values_that_pass_come_back_normalised() -> None:
    assert check.integer(" 7 ", "RR_WORKERS", 1, 8) == 7
    assert check.flag("TRUE", "RR_XDP_DISPATCHER") is True
    assert check.choice(" xdp ", "engine", ("auto", "xdp")) == "xdp"
    assert check.parse_metrics_address("127.0.0.1:9100") == ("127.0.0.1", 9100)
    assert check.join("", "device") == "device" and check.join("bgp", "peers") == "bgp.peers"
