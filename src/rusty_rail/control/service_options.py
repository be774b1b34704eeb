"""A [[services]] table's backends and option keys (docs/WIRE.md section 11), through config.py's
validators: errors name the key path and the value, like every other key.

    [[services]]
    vip = "10.1.0.1"
    protocol = "udp"
    port = 443
    hash = "5-tuple"            # | "source-ip" | "source-ip-port"
    connection_table = true     # false: no per-flow state (every packet by its Maglev slot)
    answer_ping = true          # echo requests to the VIP answered by the balancer
    quic = true                 # udp only: short headers routed by the server ID in their connection ID
    backends = [{ address = "10.2.0.1", server_id = 1 }, { address = "10.2.0.2", server_id = 2 }]

The defaults are core/options.py's ServiceOptions; the environment form's catch-all keeps today's
behaviour (ENVIRONMENT_OPTIONS: echo requests go to a backend).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rusty_rail.control.config import BackendSpec, _address, _choice, _fail, _int, _join, _show, _table
from rusty_rail.core.address import Address
from rusty_rail.core.constants import MAX_WEIGHT
from rusty_rail.core.options import HashFields, ServiceOptions
from rusty_rail.core.service import ServiceProtocol

BACKEND_KEYS = {"address", "weight", "server_id"}
OPTION_KEYS = {"hash", "connection_table", "answer_ping", "quic"}
"""Keys of a [[services]] table that are its options (ServiceOptions)."""
MAX_SERVER_ID = 0xFFFF  # two bytes of QUIC-LB plaintext server ID (core/options.py)


def _bool(table: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise _fail(_join(path, key), f"{_show(value)} is not true or false")
    return value


def _backend(value: Any, path: str) -> BackendSpec:
    if isinstance(value, str):
        return BackendSpec(_address(value, path))
    table = _table(value, path, BACKEND_KEYS)
    if "address" not in table:
        raise _fail(_join(path, "address"), "missing")
    weight = _int(table.get("weight", 1), _join(path, "weight"), 0, MAX_WEIGHT)
    return BackendSpec(_address(table["address"], _join(path, "address")), weight, parse_server_id(table, path))


def parse_backends(raw: Any, path: str) -> tuple[BackendSpec, ...]:
    if not isinstance(raw, list):
        raise _fail(path, f"{_show(raw)} is not a list")
    backends: list[BackendSpec] = []
    seen: dict[Address, int] = {}
    for i, item in enumerate(raw):
        where = f"{path}[{i}]"
        backend = _backend(item, where)
        if backend.address in seen:
            raise _fail(where, f"{backend.address} is already {path.rsplit('.', 1)[-1]}[{seen[backend.address]}]")
        seen[backend.address] = i
        backends.append(backend)
    return tuple(backends)


def parse_server_id(table: Mapping[str, Any], path: str) -> int | None:
    """A backend's `server_id` (0..65535), None when it has none."""
    if "server_id" not in table:
        return None
    return _int(table["server_id"], _join(path, "server_id"), 0, MAX_SERVER_ID)


def parse_options(table: Mapping[str, Any], path: str, protocol: ServiceProtocol,
                  backends: Sequence[BackendSpec]) -> ServiceOptions:
    """A service's options out of its [[services]] table (`protocol`: its own; ANY for the catch-all),
    checked against its backends' server IDs."""
    defaults = ServiceOptions()
    names = tuple(f.text for f in HashFields)
    fields = HashFields.from_text(_choice(table.get("hash", defaults.hash.text), _join(path, "hash"), names))
    quic = _bool(table, "quic", path, defaults.quic)
    if quic and protocol != ServiceProtocol.UDP:
        raise _fail(_join(path, "quic"), f"true needs protocol \"udp\" (QUIC runs over UDP), not "
                    f"\"{protocol.name.lower()}\"")
    ids: list[tuple[int, int]] = []
    seen: dict[int, int] = {}
    for i, backend in enumerate(backends):
        where = f"{_join(path, 'backends')}[{i}]"
        if backend.server_id is None:
            if quic:
                raise _fail(_join(where, "server_id"), "missing (every backend of a service with quic = true has "
                            "one: the server ID its QUIC connection IDs carry)")
            continue
        if not quic:
            raise _fail(_join(where, "server_id"), f"{backend.server_id}: only for a service with quic = true")
        if backend.server_id in seen:
            raise _fail(_join(where, "server_id"), f"{backend.server_id} is already backends[{seen[backend.server_id]}]'s")
        seen[backend.server_id] = i
        ids.append((int(backend.address), backend.server_id))
    return ServiceOptions(hash=fields,
                          connection_table=_bool(table, "connection_table", path, defaults.connection_table),
                          answer_ping=_bool(table, "answer_ping", path, defaults.answer_ping),
                          quic=quic, server_ids=tuple(sorted(ids)))
