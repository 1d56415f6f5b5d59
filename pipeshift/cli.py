"""The ``pipeshift`` command: one subcommand per pipeline step (DESIGN.md, "Commands").

Each step owns its command-line in its own module with two functions, ``add_arguments(parser)``
and ``run(args) -> int``. This file only dispatches, and imports only the module of the
subcommand named: a step's dependencies (torch for training, numpy for planning) are paid for
by that step alone, and ``pipeshift --help`` imports none of them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from pipeshift.errors import PipeshiftError

# name -> (module owning it, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "profile": ("pipeshift.profiler.cli", "profile a model layer by layer into graph.txt + profile.json"),
    "plan": ("pipeshift.optimizer.cli", "split a profiled graph into pipeline stages"),
    "simulate": ("pipeshift.optimizer.simulate_cli", "simulate a plan's pipeline schedule"),
    "codegen": ("pipeshift.codegen.cli", "generate per-stage nn.Module files from a plan"),
    "train": ("pipeshift.launch.train", "train a stage package on this rank"),
    "launch": ("pipeshift.launch.cli", "launch ranks locally or print per-host commands"),
    "export": ("pipeshift.runtime.export_cli", "re-assemble stage checkpoints into one state_dict"),
    "master": ("pipeshift.launch.master_cli", "run the control-plane master"),
    "ctl": ("pipeshift.launch.ctl_cli", "talk to a running master (status, repartition, policy)"),
    "netcheck": ("pipeshift.launch.netcheck", "measure latency/bandwidth between hosts"),
    "serve": ("pipeshift.serve.cli", "serve a stage package over HTTP (batching, pipelined forward)"),
    "loadtest": ("pipeshift.serve.loadtest", "load-test a pipeshift serve endpoint"),
    "show": ("pipeshift.show", "summarise a graph.txt, plan.json or stage package"),
    "demo": ("pipeshift.demo", "run the end-to-end demo"),
}


def _named_command(argv: Sequence[str]) -> str | None:
    """The subcommand in ``argv``: the top-level parser takes no options but ``-h``, so it is the first word."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every subcommand listed; only ``command``'s arguments are added (its module imported)."""
    parser = argparse.ArgumentParser(prog="pipeshift", description=(__doc__ or "").splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        if name == command:
            mod = importlib.import_module(module_name)
            p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip().splitlines()[0])
            mod.add_arguments(p)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `torchrun … -m pipeshift -- train …`: the separator that shields our flags
        argv = argv[1:]
    command = _named_command(argv)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)
    except PipeshiftError as e:
        print(f"pipeshift {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"pipeshift {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
