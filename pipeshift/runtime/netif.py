"""Which network interface the collective backends use: the one that routes to the rendezvous.

gloo (and NCCL's bootstrap) pick their interface from the machine's hostname unless
``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME`` say otherwise. Where the hostname resolves to
loopback (Ubuntu's ``127.0.1.1`` line in /etc/hosts) or a machine has several interfaces, a rank
then binds an address its peers cannot reach: they fail with "connection refused,
remote=[127.0.0.1]" while rank 0 waits in gloo's full-mesh connect. The address the peers
*can* reach is the one this machine uses to reach the rendezvous host, so we ask the kernel:
a UDP socket "connected" to that host (no packet is sent) reports the local address the route
uses, and the interface holding that address is the one to bind.

A user's own ``*_SOCKET_IFNAME`` wins; ``--iface NAME`` replaces the choice.
"""

from __future__ import annotations

import dataclasses
import fcntl
import ipaddress
import os
import socket
import struct
from collections.abc import Mapping, MutableMapping

from pipeshift.errors import PipeshiftError

IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
_SIOCGIFADDR = 0x8915
_LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")
TEST_NET = "192.0.2.1"  # TEST-NET-1: never answers; connecting a UDP socket sends nothing


@dataclasses.dataclass(frozen=True)
class Choice:
    iface: str | None  # None: left to the backend (the user set the variables, or no interface matched)
    address: str | None  # this machine's address on it
    why: str

    def describe(self) -> str:
        where = f"{self.iface} ({self.address})" if self.iface else "the backend's default"
        return f"network interface {where}: {self.why}"


def interface_addresses() -> dict[str, str]:
    """IPv4 address of each interface that has one (Linux ioctl; empty elsewhere)."""
    out: dict[str, str] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
            out[name] = socket.inet_ntoa(packed[20:24])
    return out


def local_address_towards(ip: str) -> str | None:
    """The local IPv4 address the kernel's route to ``ip`` uses; None without a route."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((ip, 9))
        except OSError:
            return None
        return str(s.getsockname()[0])


def resolve_ipv4(host: str) -> str | None:
    try:
        return str(socket.getaddrinfo(host, None, socket.AF_INET)[0][4][0])
    except (socket.gaierror, IndexError, UnicodeError):
        return None


def choose(host: str, override: str | None = None, env: Mapping[str, str] | None = None,
           one_machine: bool = False) -> Choice:
    """The interface for reaching ``host``, the rendezvous host (see the module docstring).

    ``one_machine``: every rank runs here (torchrun's LOCAL_WORLD_SIZE == WORLD_SIZE), so a name
    that resolves to loopback may stay on loopback.
    """
    values: Mapping[str, str] = os.environ if env is None else env
    addresses = interface_addresses()
    if override:
        if addresses and override not in addresses:
            known = ", ".join(sorted(addresses)) or "none"
            raise PipeshiftError(f"--iface {override}: no such interface with an IPv4 address (this machine has: {known})")
        return Choice(override, addresses.get(override), "--iface")
    given = [v for v in IFNAME_VARS if values.get(v)]
    if given:
        return Choice(None, None, f"{given[0]}={values[given[0]]} set by the user")
    ip = resolve_ipv4(host)
    if ip is None:
        return Choice(None, None, f"{host!r} does not resolve to an IPv4 address")
    why = f"routes to {host}" + (f" ({ip})" if ip != host else "")
    named_loopback = host.lower() not in _LOOPBACK_NAMES and not _is_literal(host)
    if ipaddress.ip_address(ip).is_loopback and named_loopback and not one_machine:
        # a machine name that resolves to loopback here: peers elsewhere reach this machine through
        # the interface of its default route, not through lo
        towards = local_address_towards(TEST_NET)
        if towards is not None and not ipaddress.ip_address(towards).is_loopback:
            ip, why = TEST_NET, f"{host} resolves to loopback {resolve_ipv4(host)} here; using the default route's"
    local = local_address_towards(ip)
    if local is None:
        return Choice(None, None, f"no route to {host} ({ip})")
    for name, addr in addresses.items():
        if addr == local:
            return Choice(name, local, why)
    if ipaddress.ip_address(local).is_loopback and "lo" in addresses:
        return Choice("lo", local, why)
    return Choice(None, local, f"no interface holds {local}")


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def apply(choice: Choice, env: MutableMapping[str, str] | None = None) -> None:
    """Set the backends' interface variables for this process (and the processes it starts)."""
    target: MutableMapping[str, str] = os.environ if env is None else env
    if choice.iface is None:
        return
    for var in IFNAME_VARS:
        target[var] = choice.iface
