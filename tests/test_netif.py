"""The network interface a rank binds, and a join that can never hang silently."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from pipeshift.errors import PipeshiftError
from pipeshift.launch.cli import host_commands
from pipeshift.runtime import netif


def test_loopback_rendezvous_binds_lo() -> None:
    choice = netif.choose("127.0.0.1", env={})
    assert (choice.iface, choice.address) == ("lo", "127.0.0.1")
    env: dict[str, str] = {}
    netif.apply(choice, env)
    assert env == {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}


def test_route_to_this_machines_own_address_is_its_interface() -> None:
    others = {name: addr for name, addr in netif.interface_addresses().items() if name != "lo"}
    if not others:
        pytest.skip("this machine has no interface besides loopback")
    name, addr = next(iter(others.items()))
    assert netif.choose(addr, env={}).iface == name


def test_user_setting_and_override_win() -> None:
    kept = netif.choose("127.0.0.1", env={"GLOO_SOCKET_IFNAME": "eth7"})
    assert kept.iface is None and "set by the user" in kept.why
    assert netif.choose("127.0.0.1", override="lo", env={"GLOO_SOCKET_IFNAME": "eth7"}).iface == "lo"
    with pytest.raises(PipeshiftError, match="--iface nosuchif0: no such interface"):
        netif.choose("127.0.0.1", override="nosuchif0", env={})


def test_hostname_resolving_to_loopback_is_not_bound_to_lo_across_machines() -> None:
    name = socket.gethostname()
    ip = netif.resolve_ipv4(name)
    if ip is None or not ip.startswith("127.") or netif.local_address_towards(netif.TEST_NET) is None:
        pytest.skip("needs a hostname that resolves to loopback and a default route")
    assert netif.choose(name, env={}).iface not in (None, "lo")  # peers elsewhere could not reach lo
    assert netif.choose(name, env={}, one_machine=True).iface == "lo"  # torchrun with every rank here


def test_join_is_bounded_by_the_timeout(tmp_path) -> None:
    """Rank 0 of 2 with no rank 1: one line naming the address and the interface, in bounded time."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pipeshift", "train", str(tmp_path), "--rank", "0", "--world-size",
                           "2", "--dist-addr", f"127.0.0.1:{port}", "--timeout", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"rank 0 of 2 could not join the process group at 127.0.0.1:{port} over lo within 2 s" in proc.stderr
    assert time.monotonic() - t0 < 100


def test_watchdog_ends_a_stuck_join() -> None:
    code = ("import time; from pipeshift.runtime.distributed import watchdog; "
            "watchdog(0.5, 'pipeshift train: error: stuck joining'); time.sleep(60)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.strip() == "pipeshift train: error: stuck joining"


def test_launch_hosts_tells_torchrun_the_address_and_the_store_host() -> None:
    plans = host_commands("python", [("node-a", 2), ("10.0.0.7", 1)], 29999, ["stages/"])
    (ha, a), (hb, b) = plans
    assert a[a.index("--local-addr") + 1] == "node-a" and b[b.index("--local-addr") + 1] == "10.0.0.7"
    assert a[a.index("--rdzv-conf") + 1] == "is_host=true" and b[b.index("--rdzv-conf") + 1] == "is_host=false"
    assert a.index("--local-addr") < a.index("pipeshift")  # a torchrun flag, before the module
