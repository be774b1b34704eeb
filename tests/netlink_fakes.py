"""Fake rtnetlink answers for engines/device.py: links as pyroute2 returns them (get_attr, ["index"])."""

from __future__ import annotations

import errno
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError


class Attrs:
    """A message or a nested attribute: get_attr(name) and [field]."""

    def __init__(self, fields: dict[str, Any] | None = None, **attrs: Any) -> None:
        self.fields, self.attrs = fields or {}, attrs

    def get_attr(self, name: str) -> Any:
        return self.attrs.get(name)

    def __getitem__(self, name: str) -> Any:
        return self.fields[name]


def link(name: str, index: int, kind: str | None = None, peer: int | None = None, peer_nsid: int | None = None,
         xdp: Attrs | None = None, tx_dropped: int = 0) -> Attrs:
    attrs: dict[str, Any] = {"IFLA_IFNAME": name, "IFLA_STATS64": {"tx_dropped": tx_dropped}}
    if kind is not None:
        attrs["IFLA_LINKINFO"] = Attrs(IFLA_INFO_KIND=kind)
    if peer is not None:
        attrs["IFLA_LINK"] = peer
    if peer_nsid is not None:
        attrs["IFLA_LINK_NETNSID"] = peer_nsid
    if xdp is not None:
        attrs["IFLA_XDP"] = xdp
    return Attrs({"index": index}, **attrs)


def native_xdp(prog_id: int) -> Attrs:
    return Attrs(IFLA_XDP_ATTACHED="xdp", IFLA_XDP_PROG_ID=prog_id, IFLA_XDP_DRV_PROG_ID=prog_id)


def generic_xdp(prog_id: int) -> Attrs:
    return Attrs(IFLA_XDP_ATTACHED="xdpgeneric", IFLA_XDP_PROG_ID=prog_id, IFLA_XDP_SKB_PROG_ID=prog_id)


class FakeLinks:
    """Answers RTM_GETLINK like pyroute2's IPRoute.link("get", ...): by name or index, in our namespace
    or (IFLA_IF_NETNSID) in one ours numbers; ENODEV for anything else, `refuse` for listed nsids."""

    def __init__(self, *ours: Attrs, elsewhere: dict[int, list[Attrs]] | None = None,
                 refuse: dict[int, int] | None = None) -> None:
        self.namespaces = {None: list(ours), **(elsewhere or {})}
        self.refuse = refuse or {}
        self.closed = False
        self.asked: list[dict[str, Any]] = []

    def link(self, command: str, **kw: Any) -> list[Attrs]:
        assert command == "get" and not self.closed
        self.asked.append(kw)
        nsid = kw.get("IFLA_IF_NETNSID")
        if nsid in self.refuse:
            raise NetlinkError(self.refuse[nsid])
        for message in self.namespaces.get(nsid, []):
            if message.get_attr("IFLA_IFNAME") == kw.get("ifname") or message["index"] == kw.get("index"):
                return [message]
        raise NetlinkError(errno.ENODEV)

    def close(self) -> None:
        self.closed = True
