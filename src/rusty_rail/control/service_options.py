"""A [[services]] table's backends and option keys (docs/WIRE.md section 11), through config.py's
checks (config_values.py): errors name the key path and the value, like every other key.

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

from rusty_rail.control import config_values as check
from rusty_rail.control.config import BackendSpec
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
        raise check.fail(check.join(path, key), f"{check.show(value)} is not true or false")
    return value


def _backend(value: Any, path: str) -> BackendSpec:
    if isinstance(value, str):
        return BackendSpec(check.address(value, path))
    table = check.table(value, path, BACKEND_KEYS)
    if "address" not in table:
        raise check.fail(check.join(path, "address"), "missing")
    weight = check.integer(table.get("weight", 1), check.join(path, "weight"), 0, MAX_WEIGHT)
    return BackendSpec(check.address(table["address"], check.join(path, "address")), weight, parse_server_id(table, path))


def parse_backends(raw: Any, path: str) -> tuple[BackendSpec, ...]:
    return tuple(check.unique_list(raw, path, _backend, lambda b: b.address))


def parse_server_id(table: Mapping[str, Any], path: str) -> int | None:
    """A backend's `server_id` (0..65535), None when it has none."""
    if "server_id" not in table:
        return None
    return check.integer(table["server_id"], check.join(path, "server_id"), 0, MAX_SERVER_ID)


def parse_options(table: Mapping[str, Any], path: str, protocol: ServiceProtocol,
                  backends: Sequence[BackendSpec]) -> ServiceOptions:
    """A service's options out of its [[services]] table (`protocol`: its own; ANY for the catch-all),
    checked against its backends' server IDs."""
    defaults = ServiceOptions()
    names = tuple(f.text for f in HashFields)
    fields = HashFields.from_text(check.choice(table.get("hash", defaults.hash.text), check.join(path, "hash"), names))
    quic = _bool(table, "quic", path, defaults.quic)
    if quic and protocol != ServiceProtocol.UDP:
        raise check.fail(check.join(path, "quic"), f"true needs protocol \"udp\" (QUIC runs over UDP), not "
                    f"\"{protocol.name.lower()}\"")
    ids: list[tuple[int, int]] = []
    seen: dict[int, int] = {}
    for i, backend in enumerate(backends):
        where = f"{check.join(path, 'backends')}[{i}]"
        if backend.server_id is None:
            if quic:
                raise check.fail(check.join(where, "server_id"), "missing (every backend of a service with quic = true has "
                            "one: the server ID its QUIC connection IDs carry)")
            continue
        if not quic:
            raise check.fail(check.join(where, "server_id"), f"{backend.server_id}: only for a service with quic = true")
        if backend.server_id in seen:
            raise check.fail(check.join(where, "server_id"), f"{backend.server_id} is already backends[{seen[backend.server_id]}]'s")
        seen[backend.server_id] = i
        ids.append((int(backend.address), backend.server_id))
    return ServiceOptions(hash=fields,
                          connection_table=_bool(table, "connection_table", path, defaults.connection_table),
                          answer_ping=_bool(table, "answer_ping", path, defaults.answer_ping),
                          quic=quic, server_ids=tuple(sorted(ids)))
