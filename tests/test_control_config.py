from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest

import subprocess
import sys

from rusty_rail.control.config import BackendSpec, ConfigError, HealthType, from_environment, load_config, loads_config
from rusty_rail.core.constants import DEFAULT_CONN_CAPACITY, DEFAULT_PIN_ROOT
from rusty_rail.core.service import ServiceKey, ServiceProtocol
from rusty_rail.dataplane import EngineKind, XdpMode, default_workers

REPO = Path(__file__).resolve().parent.parent

ISSUE_EXAMPLE = """
device = "eth0"
engine = "auto"                 # auto | xdp | afpacket
table_size = 65537              # prime
control_socket = "/run/rusty-rail/control.sock"
metrics = "127.0.0.1:9100"      # Prometheus endpoint; absent = off
[[services]]
vip = "10.1.0.1"
protocol = "tcp"                # tcp | udp | any
port = 80                       # 0 = every port
backends = ["10.2.0.1", { address = "10.2.0.2", weight = 2 }]
[services.health]
type = "tcp"                    # tcp | http | none
port = 8080
interval = 1.0
timeout = 0.5
rise = 2
fall = 2
"""

MINIMAL = 'device = "eth0"\n[[services]]\nvip = "10.1.0.1"\nport = 80\nbackends = ["10.2.0.1"]\n'


def test_the_issue_example() -> None:
    config = loads_config(ISSUE_EXAMPLE)
    assert config.device == "eth0" and config.engine == EngineKind.AUTO and config.table_size == 65537
    assert config.metrics == "127.0.0.1:9100" and not any(s.key.is_catch_all for s in config.services)
    (service,) = config.services
    assert service.key == ServiceKey(IPv4Address("10.1.0.1"), ServiceProtocol.TCP, 80)
    assert service.backends == (BackendSpec(IPv4Address("10.2.0.1"), 1), BackendSpec(IPv4Address("10.2.0.2"), 2))
    assert service.health.type == HealthType.TCP and service.health.port == 8080
    assert (service.health.rise, service.health.fall, service.health.timeout) == (2, 2, 0.5)


def test_defaults() -> None:
    config = loads_config(MINIMAL)
    assert config.metrics is None and config.control_socket == "/run/rusty-rail/control.sock"
    assert config.services[0].key.protocol == ServiceProtocol.TCP
    assert config.services[0].health.type == HealthType.NONE
    every_port = loads_config('device = "eth0"\n[[services]]\nvip = "10.1.0.1"\nbackends = []\n')
    assert every_port.services[0].key == ServiceKey(IPv4Address("10.1.0.1"))


def test_http_check_and_udp() -> None:
    text = MINIMAL + '[services.health]\ntype = "http"\npath = "/healthz"\n' + \
        '[[services]]\nvip = "10.1.0.1"\nprotocol = "udp"\nport = 53\nbackends = ["10.2.0.1"]\n'
    config = loads_config(text)
    assert config.services[0].health.path == "/healthz"
    assert config.services[1].key == ServiceKey.parse("10.1.0.1:53/udp")


def _svc(extra: str = "", backends: str = '["10.2.0.1"]', health: str = "") -> str:
    text = f'device = "eth0"\n[[services]]\nvip = "10.1.0.1"\nport = 80\nbackends = {backends}\n{extra}'
    return text + (f"[services.health]\n{health}" if health else "")


@pytest.mark.parametrize(
    "text, message",
    [
        ('engine = "dpdk"\n' + MINIMAL, 'engine: "dpdk" is not one of auto, afpacket, xdp'),
        ("table_size = 65536\n" + MINIMAL, "table_size: 65536 is not prime"),
        ("table_size = true\n" + MINIMAL, "table_size: true is not a whole number"),
        ('colour = "red"\n' + MINIMAL, "colour: unknown key"),
        ('metrics = "9100"\n' + MINIMAL, 'metrics: "9100" is not host:port'),
        ('metrics = "127.0.0.1:99999"\n' + MINIMAL, "port 99999 is not in 1..65535"),
        ('control_socket = "rel/ctl.sock"\n' + MINIMAL, "control_socket: \"rel/ctl.sock\" is not an absolute path"),
        ('device = "eth0"\n', "services: none configured"),
        ('[[services]]\nvip = "10.1.0.1"\n', "device: missing"),
        ('device = "eth 0"\n' + MINIMAL.split("\n", 1)[1], 'device: "eth 0" is not an interface name'),
        (_svc(backends='["10.2.0.1", { address = "10.2.0.2", weight = -1 }]'), "services[0].backends[1].weight: -1 is not >= 0"),
        (_svc(backends='["10.2.0.1", "10.2.0.300"]'), 'services[0].backends[1]: "10.2.0.300" is not an IPv4 or IPv6 address'),
        (_svc(backends='["10.2.0.1", "2001:db8::zz"]'), 'services[0].backends[1]: "2001:db8::zz" is not an IPv4 or IPv6 address'),
        (_svc(backends='["::ffff:10.2.0.1"]'), 'services[0].backends[0]: "::ffff:10.2.0.1" is IPv4-mapped (write the IPv4 address)'),
        (_svc(backends='["fe80::1"]'), 'services[0].backends[0]: "fe80::1" is link-local'),
        (_svc(backends='["::1"]'), 'services[0].backends[0]: "::1" is in ::/96'),
        (_svc(backends='[{ address = "ff02::1" }]'), 'services[0].backends[0].address: "ff02::1" is multicast'),
        (_svc(backends='["2001:db8::1", "2001:db8:0::1"]'), "services[0].backends[1]: 2001:db8::1 is already backends[0]"),
        ('device = "eth0"\n[[services]]\nvip = "ff05::1"\n', 'services[0].vip: "ff05::1" is multicast'),
        (_svc(backends='["10.2.0.1", "10.2.0.1"]'), "services[0].backends[1]: 10.2.0.1 is already backends[0]"),
        (_svc(backends='[{ address = "10.2.0.1", wieght = 2 }]'), "services[0].backends[0].wieght: unknown key"),
        (_svc(backends='[{ weight = 2 }]'), "services[0].backends[0].address: missing"),
        (_svc(backends='"10.2.0.1"'), 'services[0].backends: "10.2.0.1" is not a list'),
        (_svc('protocol = "sctp"\n'), 'services[0].protocol: "sctp" is not one of tcp, udp, any'),
        (_svc('protocol = "any"\n'), "services[0].port: 80 needs protocol"),
        ('device = "eth0"\n[[services]]\nvip = "10.1.0.1"\nport = 70000\n', "services[0].port: 70000 is not <= 65535"),
        ('device = "eth0"\n[[services]]\nvip = "nope"\n', 'services[0].vip: "nope" is not an IPv4 or IPv6 address'),
        ('device = "eth0"\n[[services]]\nport = 80\n', "services[0].vip: missing"),
        (MINIMAL + MINIMAL.split("\n", 1)[1], "services[1]: 10.1.0.1:80/tcp is already services[0]"),
        (_svc(health='type = "icmp"\n'), 'services[0].health.type: "icmp" is not one of tcp, http, none'),
        (_svc(health='type = "tcp"\nintervall = 2\n'), "services[0].health.intervall: unknown key"),
        (_svc(health='type = "tcp"\ninterval = 0\n'), "services[0].health.interval: 0 is not > 0"),
        (_svc(health='type = "tcp"\ninterval = 1.0\ntimeout = 2.0\n'), "services[0].health.timeout: 2.0 is not <= interval (1.0)"),
        (_svc(health='type = "tcp"\nrise = 0\n'), "services[0].health.rise: 0 is not >= 1"),
        (_svc(health='type = "tcp"\npath = "/x"\n'), 'services[0].health.path: "/x" is only for type "http"'),
        (_svc(health='type = "http"\npath = "x"\n'), 'services[0].health.path: "x" is not an absolute URL path'),
        ('device = "eth0"\n[[services]]\nvip = "10.1.0.1"\n[services.health]\ntype = "tcp"\n', "services[0].health.port: 0"),
        ("device = \n", "not valid TOML"),
    ],
)
def test_errors_name_key_and_value(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        loads_config(text)
    assert message in str(info.value)


def test_load_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("device = [")
    with pytest.raises(ConfigError, match=f"{bad}: not valid TOML"):
        load_config(bad)


def test_the_example_in_deploy_loads() -> None:
    config = load_config(REPO / "deploy" / "config.example.toml")
    assert config.services and config.metrics


def test_connection_capacity() -> None:
    assert loads_config(MINIMAL).connection_capacity == DEFAULT_CONN_CAPACITY
    assert loads_config("connection_capacity = 65536\n" + MINIMAL).connection_capacity == 65536
    for value, words in (("0", "0 is not >= 1"), ('"big"', '"big" is not a whole number'),
                         (str(1 << 27), "134217728 is not <= 67108864")):
        with pytest.raises(ConfigError, match=f"^connection_capacity: {words}"):
            loads_config(f"connection_capacity = {value}\n" + MINIMAL)


def test_a_file_may_add_a_catch_all_service() -> None:
    config = loads_config(MINIMAL + '[[services]]\nvip = "*"\nbackends = ["10.2.0.9"]\n')
    assert [s.key for s in config.services] == [ServiceKey.parse("10.1.0.1:80"), ServiceKey.catch_all()]
    with pytest.raises(ConfigError, match=r'^services\[0\].port: 80: the catch-all service \(vip "\*"\) covers'):
        loads_config('device = "eth0"\n[[services]]\nvip = "*"\nport = 80\nbackends = []\n')


def test_xdp_mode_and_pin_root() -> None:
    config = loads_config('xdp_mode = "generic"\npin_root = "/sys/fs/bpf/rr-test"\n' + MINIMAL)
    assert config.xdp_mode == XdpMode.GENERIC and config.pin_root == "/sys/fs/bpf/rr-test"
    assert loads_config(MINIMAL).pin_root == DEFAULT_PIN_ROOT
    with pytest.raises(ConfigError, match='^xdp_mode: "skb" is not one of auto, native, generic'):
        loads_config('xdp_mode = "skb"\n' + MINIMAL)
    with pytest.raises(ConfigError, match='^pin_root: "bpf" is not an absolute path'):
        loads_config('pin_root = "bpf"\n' + MINIMAL)


# -- the environment form: the same validators, errors named by the variable ----------------------------

ENV = {"RR_DEVICE": "eth0", "RR_TARGET_IPS": "10.2.0.1;10.2.0.2"}


def test_xdp_dispatcher_key_and_variable() -> None:
    """engines/xdp/hook.py: false by default; true or false in the file and the environment, else an
    error naming the key or the variable and the value."""
    assert loads_config(MINIMAL).xdp_dispatcher is False
    config = loads_config("xdp_dispatcher = true\n" + MINIMAL)
    assert config.xdp_dispatcher is True and config.engine_options().xdp_dispatcher is True
    assert loads_config("xdp_dispatcher = false\n" + MINIMAL).engine_options().xdp_dispatcher is False
    with pytest.raises(ConfigError, match='^xdp_dispatcher: "yes" is not true or false$'):
        loads_config('xdp_dispatcher = "yes"\n' + MINIMAL)
    with pytest.raises(ConfigError, match="^xdp_dispatcher: 1.5 is not true or false$"):
        loads_config("xdp_dispatcher = 1.5\n" + MINIMAL)
    assert from_environment({**ENV, "RR_XDP_DISPATCHER": "true"}).engine_options().xdp_dispatcher is True
    assert from_environment({**ENV, "RR_XDP_DISPATCHER": "0"}).xdp_dispatcher is False
    with pytest.raises(ConfigError, match='^RR_XDP_DISPATCHER: "sometimes" is not true or false$'):
        from_environment({**ENV, "RR_XDP_DISPATCHER": "sometimes"})


def test_the_originals_form_is_one_catch_all_service() -> None:
    config = from_environment(ENV)
    assert config.device == "eth0" and config.control_socket is None and config.metrics is None
    (service,) = config.services
    assert service.key == ServiceKey.catch_all() and service.key.is_catch_all
    assert service.backends == (BackendSpec(IPv4Address("10.2.0.1")), BackendSpec(IPv4Address("10.2.0.2")))
    assert service.health.type == HealthType.NONE
    assert config.engine == EngineKind.AUTO and config.workers == default_workers() and config.table_size == 65537


def test_ipv6_vips_backends_and_targets() -> None:
    config = loads_config('device = "eth0"\n[[services]]\nvip = "2001:db8:1::1"\nport = 443\n'
                          'backends = ["10.2.0.1", { address = "2001:db8:2::2", weight = 3 }]\n')
    (service,) = config.services
    assert service.key == ServiceKey.parse("[2001:db8:1::1]:443/tcp")
    assert service.backends == (BackendSpec(IPv4Address("10.2.0.1")), BackendSpec(IPv6Address("2001:db8:2::2"), 3))
    env = from_environment({"RR_DEVICE": "eth0", "RR_TARGET_IPS": "2001:db8:2::1; 10.2.0.1,2001:db8:2::2"})
    assert [b.address for b in env.services[0].backends] == [IPv6Address("2001:db8:2::1"), IPv4Address("10.2.0.1"),
                                                             IPv6Address("2001:db8:2::2")]


def test_single_target_and_separators() -> None:
    def targets(value: str) -> int:
        return len(from_environment({"RR_DEVICE": "eth0", "RR_TARGET_IPS": value}).services[0].backends)

    assert targets("10.1.0.1") == 1
    assert targets(" 10.2.0.1, 10.2.0.2 ;") == 2


def test_every_setting_from_the_environment() -> None:
    config = from_environment({**ENV, "RR_ENGINE": "xdp", "RR_XDP_MODE": "native", "RR_WORKERS": "2",
                               "RR_TABLE_SIZE": "251", "RR_CONTROL_SOCKET": "/run/rr.sock",
                               "RR_METRICS": "127.0.0.1:9100", "RR_CONN_CAPACITY": "4096", "RR_PIN_ROOT": "/tmp/pins"})
    assert (config.engine, config.xdp_mode, config.workers, config.table_size) == (EngineKind.XDP, XdpMode.NATIVE, 2, 251)
    assert (config.control_socket, config.metrics, config.connection_capacity, config.pin_root) == \
        ("/run/rr.sock", "127.0.0.1:9100", 4096, "/tmp/pins")


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RR_TARGET_IPS": "10.2.0.1"}, "RR_DEVICE: is not set"),
        ({"RR_DEVICE": "eth0"}, "RR_TARGET_IPS: is not set"),
        ({"RR_DEVICE": "eth0", "RR_TARGET_IPS": "10.2.0.1;nope"}, 'RR_TARGET_IPS: "nope" is not an IPv4 or IPv6 address'),
        ({"RR_DEVICE": "eth0", "RR_TARGET_IPS": "10.2.0.1;fe80::9"}, 'RR_TARGET_IPS: "fe80::9" is link-local'),
        ({"RR_DEVICE": "eth0", "RR_TARGET_IPS": "2001:db8::1;2001:db8::0:1"}, "RR_TARGET_IPS: an address is listed twice"),
        ({"RR_DEVICE": "eth0", "RR_TARGET_IPS": "10.2.0.1;10.2.0.1"}, "RR_TARGET_IPS: an address is listed twice"),
        ({"RR_DEVICE": "eth0 x", "RR_TARGET_IPS": "10.2.0.1"}, 'RR_DEVICE: "eth0 x" is not an interface name'),
        ({**ENV, "RR_ENGINE": "netmap"}, 'RR_ENGINE: "netmap" is not one of auto, afpacket, xdp'),
        ({**ENV, "RR_WORKERS": "two"}, 'RR_WORKERS: "two" is not a whole number'),
        ({**ENV, "RR_TABLE_SIZE": "65536"}, "RR_TABLE_SIZE: 65536 is not prime"),
        ({**ENV, "RR_METRICS": "bad_host:9100"}, "RR_METRICS: \"bad_host:9100\": 'bad_host' is not an IPv4 address or host name"),
        ({**ENV, "RR_METRICS": "127.0.0.1:0"}, "RR_METRICS: \"127.0.0.1:0\": port 0 is not in 1..65535"),
        ({**ENV, "RR_CONTROL_SOCKET": "rr.sock"}, 'RR_CONTROL_SOCKET: "rr.sock" is not an absolute path'),
        ({**ENV, "RR_CONN_CAPACITY": "0"}, "RR_CONN_CAPACITY: 0 is not >= 1"),
        ({**ENV, "RR_CONN_CAPACITY": "lots"}, 'RR_CONN_CAPACITY: "lots" is not a whole number'),
        ({**ENV, "RR_CONN_CAPACITY": str(1 << 27)}, "RR_CONN_CAPACITY: 134217728 is not <= 67108864"),
        ({**ENV, "RR_XDP_MODE": "skb"}, 'RR_XDP_MODE: "skb" is not one of auto, native, generic'),
        ({**ENV, "RR_PIN_ROOT": "pins"}, 'RR_PIN_ROOT: "pins" is not an absolute path'),
    ],
)
def test_environment_errors_name_the_variable_and_the_value(env: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_environment(env)
    assert str(info.value) == message


def test_the_environment_form_and_the_file_share_validators() -> None:
    """The same value is refused for the same reason in both forms, only the name differs."""
    file_error = env_error = ""
    try:
        loads_config('metrics = "bad_host:9100"\n' + MINIMAL)
    except ConfigError as exc:
        file_error = str(exc)
    try:
        from_environment({**ENV, "RR_METRICS": "bad_host:9100"})
    except ConfigError as exc:
        env_error = str(exc)
    assert file_error.removeprefix("metrics") == env_error.removeprefix("RR_METRICS") != ""


@pytest.mark.parametrize(
    "env, config_text",
    [({**ENV, "RR_METRICS": "bad_host:9100"}, None), ({}, 'device = "eth0"\n[[services]]\nvip = "10.1.0.1"\nport = 80\nbackends = ["10.2.0.1", { address = "10.2.0.2", weight = -1 }]\n')],
)
def test_the_command_exits_with_one_line_and_no_traceback(tmp_path: Path, env: dict, config_text: str | None) -> None:
    argv = [sys.executable, "-m", "rusty_rail"]
    if config_text is not None:
        path = tmp_path / "bad.toml"
        path.write_text(config_text)
        argv += ["run", "--config", str(path)]
    clean = {k: v for k, v in __import__("os").environ.items() if not k.startswith("RR_")}
    result = subprocess.run(argv, env={**clean, **env}, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    expected = "RR_METRICS" if config_text is None else "services[0].backends[1].weight: -1 is not >= 0"
    assert expected in lines[0]
