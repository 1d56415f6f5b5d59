"""Train a stage package on this rank: ``pipeshift train PKG --schedule flush --microbatches 8 --steps N``.

This is :mod:`pipeshift.runtime.cli` (its flags and behaviour) with the control-plane client and
the experiment/test hooks (:mod:`pipeshift.testing`: ``--slowdown``, ``$PIPESHIFT_FAULT``) wired
in: the runtime (:mod:`pipeshift.runtime.cli`) speaks to a master only through the protocol of
:mod:`pipeshift.runtime.control`; this command gives it the network implementation
(:class:`pipeshift.launch.client.MasterClient`), so the runtime never imports launch.
"""

from __future__ import annotations

import argparse
import sys

from pipeshift.errors import PipeshiftError
from pipeshift.runtime import cli as train
from pipeshift.runtime.control import Connect, ControlPlane

add_arguments = train.add_arguments


def master_connector(address: str, token_file: str | None) -> Connect:
    """``(rank, stage) -> MasterClient`` for ``--master``: registered, heartbeating; offline if unreachable."""
    from pipeshift.launch import protocol
    from pipeshift.launch.client import MasterClient, MasterUnavailable

    def connect(rank: int, stage: int) -> ControlPlane:
        secret = protocol.read_token(token_file, "--master-token-file")
        if not secret:
            raise PipeshiftError(f"--master needs the master's token: --master-token-file FILE or ${protocol.TOKEN_ENV}")
        try:
            client = MasterClient.connect(address, secret, rank, stage)
        except protocol.AuthError as e:
            raise PipeshiftError(str(e)) from None
        except MasterUnavailable as e:  # an unreachable master only costs its commands
            print(f"pipeshift train: rank {rank}: {e}; training without it until it answers", file=sys.stderr)
            client = MasterClient(address, secret, rank, stage)
        client.start_heartbeat_thread()
        return client

    return connect


def run(args: argparse.Namespace) -> int:
    from pipeshift import testing

    connect = master_connector(args.master, args.master_token_file) if args.master else None
    return train.run(args, connect=connect, make_hooks=lambda rank: testing.install(rank, args.slowdown))
