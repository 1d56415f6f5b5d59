"""Run the control-plane master that training ranks report to and operators talk to.

``pipeshift master [--port P] [--plan plan.json [--graph graph.txt]] [--log decisions.jsonl]``.
With ``--plan`` the master also runs the automatic repartitioning policy on the workers'
reports; without it, it only relays operators' ``pipeshift ctl repartition`` commands.
The token comes from ``--token-file FILE``, else ``$PIPESHIFT_TOKEN``; when that file does not
exist yet, a fresh token is written to it (readable by its owner only). Tokens never appear on
command lines or in output: ``ps`` shows every user's command line.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import signal
import socket
import sys
from contextlib import ExitStack

from pipeshift.errors import PipeshiftError
from pipeshift.launch import protocol
from pipeshift.launch.master import DEFAULT_MAX_WORKERS, Master, load_policy_driver
from pipeshift.runtime.policy import OPTIMIZER_STATE_FACTOR, PolicyConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 for all; default %(default)s)")
    parser.add_argument("--port", type=int, default=protocol.DEFAULT_PORT, help="TCP port, 0 for any free one (default %(default)s)")
    parser.add_argument("--token-file", default=None, metavar="FILE",
                        help=f"file holding the shared secret (default ${protocol.TOKEN_ENV}); created with a fresh "
                             "token if missing")
    parser.add_argument("--max-workers", type=int, default=DEFAULT_MAX_WORKERS, metavar="N",
                        help="largest rank count a resize may ask for, and rank numbers accepted (default %(default)s)")
    parser.add_argument("--heartbeat-timeout", type=float, default=10.0, metavar="S",
                        help="seconds of silence after which a worker is reported dead (default %(default)s)")
    parser.add_argument("--max-message-bytes", type=int, default=protocol.DEFAULT_MAX_MESSAGE_BYTES,
                        help="largest message accepted (default %(default)s)")
    parser.add_argument("--log", default=None, metavar="FILE", help="append every event and decision as JSON lines")
    policy = parser.add_argument_group("automatic repartitioning policy")
    policy.add_argument("--plan", default=None, metavar="PLAN_JSON", help="the plan the job starts with (enables the policy)")
    policy.add_argument("--graph", default=None, metavar="GRAPH_TXT", help="the profiled graph (default: the plan's 'graph')")
    policy.add_argument("--policy", choices=["on", "off"], default="on", help="start with the policy on or off (default %(default)s)")
    policy.add_argument("--optimizer", choices=sorted(OPTIMIZER_STATE_FACTOR), default="adam",
                        help="optimizer whose state migrates with the parameters (default %(default)s)")
    policy.add_argument("--total-steps", type=int, default=None, help="the job's length, if reports do not say")
    defaults = PolicyConfig()
    policy.add_argument("--threshold", type=float, default=defaults.threshold,
                        help="relative deviation of a stage that counts as imbalance (default %(default)s)")
    policy.add_argument("--clear-threshold", type=float, default=defaults.clear_threshold,
                        help="deviation below which the imbalance streak resets (default %(default)s)")
    policy.add_argument("--persist-windows", type=int, default=defaults.persist_windows,
                        help="windows the imbalance must persist (default %(default)s)")
    policy.add_argument("--cooldown-windows", type=int, default=defaults.cooldown_windows,
                        help="windows ignored after a repartition (default %(default)s)")
    policy.add_argument("--bandwidth", type=float, default=defaults.bandwidth_bytes_per_s, metavar="BYTES_PER_S",
                        help="link bandwidth for activations and migration (default %(default)s)")
    policy.add_argument("--fixed-pause", type=float, default=defaults.fixed_pause_s, metavar="S",
                        help="cost of a migration beyond its bytes (default %(default)s)")
    policy.add_argument("--horizon-steps", type=int, default=defaults.default_horizon_steps,
                        help="remaining steps assumed when the job length is unknown (default %(default)s)")
    policy.add_argument("--confidence-z", type=float, default=defaults.confidence_z,
                        help="the gain counted is its mean minus Z standard errors over the windows (default %(default)s)")
    policy.add_argument("--warmup-windows", type=int, default=defaults.warmup_windows,
                        help="windows ignored before calibrating profiled against measured times (default %(default)s)")


def worker_address(host: str, port: int) -> tuple[str, str | None]:
    """The HOST:PORT workers should be given for a master bound to ``host``, and a warning when
    workers on other machines cannot reach it."""
    from pipeshift.runtime import netif

    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        resolved = netif.resolve_ipv4(host)
        ip = ipaddress.ip_address(resolved) if resolved else None
    outward = netif.local_address_towards(netif.TEST_NET)  # the default route's address, if any
    if outward is None or ipaddress.ip_address(outward).is_loopback:  # no default route: any real interface
        outward = next((a for a in netif.interface_addresses().values() if not ipaddress.ip_address(a).is_loopback),
                       None)
    if ip is not None and ip.is_unspecified:
        return f"{outward or socket.gethostname()}:{port}", None
    if ip is not None and ip.is_loopback:
        hint = f" (this machine's address: {outward})" if outward else ""
        return f"{host}:{port}", (f"listening on loopback {host}: only processes on this machine can reach it; "
                                  f"for workers on other machines start it with --host 0.0.0.0{hint}")
    return f"{host}:{port}", None


def _write_token(path: str, token: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise PipeshiftError(f"--token-file {path}: cannot create: {e.strerror or e}") from None
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")


def run(args: argparse.Namespace) -> int:
    generated = None
    if args.token_file and not os.path.exists(args.token_file):
        generated = args.token_file
        _write_token(args.token_file, protocol.new_token())
    token = protocol.read_token(args.token_file)
    if not token:
        raise PipeshiftError(f"no token: set ${protocol.TOKEN_ENV} or pass --token-file FILE (a fresh token is "
                             "written there if FILE does not exist)")
    driver = None
    if args.plan:
        config = PolicyConfig(
            threshold=args.threshold, clear_threshold=args.clear_threshold, persist_windows=args.persist_windows,
            cooldown_windows=args.cooldown_windows, bandwidth_bytes_per_s=args.bandwidth,
            fixed_pause_s=args.fixed_pause, default_horizon_steps=args.horizon_steps,
            confidence_z=args.confidence_z, warmup_windows=args.warmup_windows,
        )
        driver = load_policy_driver(args.plan, args.graph, config, args.optimizer, args.total_steps)
    elif args.graph:
        raise PipeshiftError("--graph needs --plan (the policy needs the plan the job runs)")
    with ExitStack() as stack:
        log = None
        if args.log:
            try:
                log = stack.enter_context(open(args.log, "a", encoding="utf-8"))
            except OSError as e:
                raise PipeshiftError(f"cannot open the log {args.log}: {e.strerror or e}") from None
        master = Master(
            token, host=args.host, port=args.port, heartbeat_timeout_s=args.heartbeat_timeout,
            max_message_bytes=args.max_message_bytes, log=log, policy=driver, policy_enabled=args.policy == "on",
            max_workers=args.max_workers, total_steps=args.total_steps,
        )

        def on_listening(address: tuple[str, int]) -> None:
            where = f"{address[0]}:{address[1]}"
            print(f"pipeshift master: listening on {where}", flush=True)
            advertised, warning = worker_address(address[0], address[1])
            if warning:
                print(f"pipeshift master: warning: {warning}", file=sys.stderr, flush=True)
            if generated:
                print(f"pipeshift master: wrote a fresh token to {generated} (give workers and ctl "
                      f"--token-file {generated}, or {protocol.TOKEN_ENV}; {protocol.MASTER_ENV}={advertised})",
                      flush=True)
            else:
                print(f"pipeshift master: workers and ctl use {protocol.MASTER_ENV}={advertised}", flush=True)
            state = "off" if args.policy == "off" else ("on" if driver else "on, inactive (no --plan)")
            print(f"pipeshift master: policy {state}", flush=True)

        async def serve() -> None:
            loop = asyncio.get_running_loop()
            try:
                loop.add_signal_handler(signal.SIGTERM, master.request_stop)
            except (NotImplementedError, RuntimeError):  # not the main thread, or not POSIX
                pass
            await master.serve_forever(on_listening)

        asyncio.run(serve())
    print("pipeshift master: stopped", file=sys.stderr)
    return 0
