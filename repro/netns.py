"""Two emulated "machines" on one host: network namespaces joined by a rate-limited veth link.

Each machine is a network namespace with its own loopback and one interface, ``emu0``; the two
``emu0`` ends form a veth pair, so everything the ranks send each other crosses that link and
nothing else. A token-bucket filter (``tc qdisc … tbf``) on both ends caps each direction at
the chosen rate, the way a narrow network between servers would. Processes run inside a
machine through ``ip netns exec``, with ``GLOO_SOCKET_IFNAME=emu0`` so gloo uses the link.

This needs root (``CAP_NET_ADMIN``) and the ``ip`` and ``tc`` tools. :func:`open_link` tries
and, when the machine does not allow it, falls back to :class:`LoopbackLink` — both ranks on
127.0.0.1, no shaping — and says why. Namespaces are removed on exit (including SIGINT/SIGTERM),
which removes the veth pair with them; nothing outside them is touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator

IFNAME = "emu0"


def tbf_command(namespace: str, rate_mbit: float, device: str = IFNAME) -> list[str]:
    """``tc`` command capping ``device``'s egress in ``namespace`` at ``rate_mbit`` Mbit/s.

    The bucket (burst) must hold at least one timer tick of traffic at the rate, or the filter
    cannot reach it: 1/250 s of it, and never under 32 KiB. ``latency`` bounds the queue.
    """
    if not rate_mbit > 0:
        raise ValueError(f"rate must be positive, got {rate_mbit!r} Mbit/s")
    burst = max(32 * 1024, int(rate_mbit * 1e6 / 8 / 250))
    return ["ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", device, "root", "tbf",
            "rate", f"{rate_mbit:g}mbit", "burst", str(burst), "latency", "100ms"]


def link_names(tag: int) -> dict[str, str]:
    """Namespace and temporary veth names for one run; interface names stay within 15 characters."""
    tag = tag % 100000
    return {"ns0": f"psemu{tag}m0", "ns1": f"psemu{tag}m1", "veth0": f"psemu{tag}a", "veth1": f"psemu{tag}b"}


def subnet_addresses(tag: int) -> tuple[str, str]:
    """Addresses of the two machines: a /24 that exists only inside the two namespaces."""
    third = tag % 250 + 1
    return f"10.231.{third}.1", f"10.231.{third}.2"


class LoopbackLink:
    """Both ranks on this machine's loopback: no namespaces, no shaping."""

    shaped = False
    rate_mbit: float | None = None

    def __init__(self, reason: str):
        self.reason = reason

    def hosts(self) -> list[str]:
        return ["127.0.0.1", "127.0.0.1"]

    def prefix(self, machine: int) -> list[str]:
        return ["env", "GLOO_SOCKET_IFNAME=lo"]

    def describe(self) -> str:
        return f"loopback, no shaping ({self.reason})"

    def close(self) -> None:
        pass


class NamespaceLink:
    """Two namespaces joined by a veth pair, each end shaped to ``rate_mbit`` (None: unshaped)."""

    shaped = True

    def __init__(self, rate_mbit: float | None, tag: int | None = None):
        self.rate_mbit = rate_mbit
        self.tag = os.getpid() if tag is None else tag
        self.names = link_names(self.tag)
        self.addresses = subnet_addresses(self.tag)
        self._created: list[str] = []

    def open(self) -> NamespaceLink:
        n = self.names
        for ns in (n["ns0"], n["ns1"]):
            _ip("netns", "add", ns)
            self._created.append(ns)
        _ip("link", "add", n["veth0"], "type", "veth", "peer", "name", n["veth1"])
        for i in (0, 1):
            ns, veth = n[f"ns{i}"], n[f"veth{i}"]
            _ip("link", "set", veth, "netns", ns)
            _ip("-n", ns, "link", "set", veth, "name", IFNAME)
            _ip("-n", ns, "addr", "add", f"{self.addresses[i]}/24", "dev", IFNAME)
            _ip("-n", ns, "link", "set", IFNAME, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            if self.rate_mbit is not None:
                _run(tbf_command(ns, self.rate_mbit))
        return self

    def unshape(self) -> None:
        """Remove the rate limit from both ends (the control runs: same link, no cap)."""
        if self.rate_mbit is None:
            return
        for i in (0, 1):
            _run(["ip", "netns", "exec", self.names[f"ns{i}"], "tc", "qdisc", "del", "dev", IFNAME, "root"])
        self.rate_mbit = None

    def hosts(self) -> list[str]:
        return list(self.addresses)

    def prefix(self, machine: int) -> list[str]:
        return ["ip", "netns", "exec", self.names[f"ns{machine}"], "env", f"GLOO_SOCKET_IFNAME={IFNAME}"]

    def describe(self) -> str:
        shaping = f"tc tbf {self.rate_mbit:g} Mbit/s each way" if self.rate_mbit is not None else "no shaping"
        return f"2 network namespaces, veth pair, {shaping}"

    def close(self) -> None:
        """Delete the namespaces (the veth pair goes with them); safe to call twice."""
        while self._created:
            ns = self._created.pop()
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise OSError(f"`{' '.join(cmd)}` failed: {(proc.stderr or proc.stdout).strip() or proc.returncode}")


def _ip(*args: str) -> None:
    _run(["ip", *args])


def namespaces_unavailable() -> str | None:
    """Why namespaces cannot be used here, or None if they can be tried."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "not a POSIX system"
    if os.geteuid() != 0:
        return "not running as root (ip netns needs CAP_NET_ADMIN)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (iproute2)"
    return None


@contextlib.contextmanager
def open_link(rate_mbit: float | None, use_namespaces: bool = True) -> Iterator[NamespaceLink | LoopbackLink]:
    """The emulated link, or loopback with the reason; cleaned up on exit and on SIGINT/SIGTERM/SIGHUP."""
    reason = None if use_namespaces else "namespaces turned off (--loopback)"
    reason = reason or namespaces_unavailable()
    link: NamespaceLink | LoopbackLink
    if reason is not None:
        yield LoopbackLink(reason)
        return
    link = NamespaceLink(rate_mbit)
    previous = {}

    def stop(signum, frame):  # turn a signal into an exception so the finally below runs
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, stop)
    try:
        try:
            link.open()
        except OSError as e:
            link.close()
            yield LoopbackLink(f"could not set up namespaces: {e}")
            return
        yield link
    finally:
        link.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
