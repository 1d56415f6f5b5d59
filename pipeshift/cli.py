"""The ``pipeshift`` command: one subcommand per pipeline step (DESIGN.md, "Commands").

Each step owns its command-line in ``pipeshift/<step>/cli.py`` with two functions,
``add_arguments(parser)`` and ``run(args) -> int``. This file only dispatches, so steps can be
built and tested independently; a step whose module does not exist yet says so and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pipeshift.errors import PipeshiftError

# name -> (module owning it, one-line help, issue that delivers it)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "profile": ("pipeshift.profiler.cli", "profile a model layer by layer into graph.txt + profile.json", "#3"),
    "plan": ("pipeshift.optimizer.cli", "split a profiled graph into pipeline stages", "#4"),
    "simulate": ("pipeshift.optimizer.simulate_cli", "simulate a plan's pipeline schedule", "#4"),
    "codegen": ("pipeshift.codegen.cli", "generate per-stage nn.Module files from a plan", "#5"),
    "train": ("pipeshift.runtime.cli", "train a stage package on this rank", "#6"),
    "launch": ("pipeshift.launch.cli", "launch ranks locally or print per-host commands", "#6"),
    "export": ("pipeshift.runtime.export_cli", "re-assemble stage checkpoints into one state_dict", "#6"),
    "master": ("pipeshift.launch.master_cli", "run the control-plane master", "#7"),
    "ctl": ("pipeshift.launch.ctl_cli", "talk to a running master (status, repartition, policy)", "#7"),
    "netcheck": ("pipeshift.launch.netcheck", "measure latency/bandwidth between hosts", "#7"),
    "show": ("pipeshift.show", "summarise a graph.txt, plan.json or stage package", "#2"),
    "demo": ("pipeshift.demo", "run the end-to-end demo", "#8"),
}


def _load(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            return None
        raise


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    parser = argparse.ArgumentParser(prog="pipeshift", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules: dict[str, object] = {}
    for name, (module_name, help_text, issue) in COMMANDS.items():
        mod = _load(module_name)
        if mod is None:
            p = sub.add_parser(name, help=f"{help_text} (not implemented yet: issue {issue})", add_help=False)
            p.add_argument("rest", nargs=argparse.REMAINDER)
        else:
            p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip().splitlines()[0])
            mod.add_arguments(p)
        modules[name] = mod
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    mod = modules[args.command]
    if mod is None:
        issue = COMMANDS[args.command][2]
        print(f"pipeshift {args.command}: not implemented yet (issue {issue} has not landed)", file=sys.stderr)
        return 2
    try:
        return int(mod.run(args) or 0)
    except PipeshiftError as e:
        print(f"pipeshift {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"pipeshift {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
