"""Profile a model layer by layer into graph.txt + profile.json (one set per batch size).

    pipeshift profile pipeshift.models:resnet50 -b 32 -o prof/
    pipeshift profile mypkg.nets:make_net --input-shape 3,64,64 -b 16 -b 64 -o prof/ --threads 4

With one ``-b`` the files go straight into the output directory; with several, into ``b16/``,
``b64/``, … beneath it. Each set is graph.txt (PipeDream's format), profile.json, a picture
(graph.svg, or graph.dot without graphviz) and, on the terminal, a table of the heaviest nodes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pipeshift.tp_plan import parse_rules as parse_tp_rules
from pipeshift.errors import PipeshiftError
from pipeshift.graph.capture import LeafPolicy
from pipeshift.profiler.profile import profile_model
from pipeshift.profiler.report import format_table, write_picture, write_profile
from pipeshift.runspec import (FunctionSpec, add_data_arguments, add_loss_arguments, data_spec_from_args,
                               loss_spec_from_args, resolve_data, resolve_loss)
from pipeshift.spec import ModelSpec, add_spec_arguments, spec_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_spec_arguments(p)
    add_data_arguments(p)
    add_loss_arguments(p)
    p.add_argument("-b", "--batch-size", dest="batch_sizes", type=int, action="append", required=True,
                   metavar="B", help="minibatch size to profile at (repeat for several)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="directory for graph.txt, profile.json, picture")
    leaves = p.add_argument_group("graph granularity (which modules become one graph node)")
    leaves.add_argument("--leaf", action="append", default=[], metavar="FQN",
                        help="keep this submodule whole, e.g. layer1.0 (repeatable)")
    leaves.add_argument("--leaf-type", action="append", default=[], metavar="CLASS",
                        help="keep every module of this class whole, e.g. Bottleneck (repeatable)")
    leaves.add_argument("--depth", type=int, default=None, metavar="N",
                        help="keep modules N levels below the root whole (1 = the root's children)")
    leaves.add_argument("--no-model-leaves", action="store_true",
                        help="without --leaf/--leaf-type/--depth, do not keep the classes the model names as "
                             "unsplittable (Hugging Face's _no_split_modules) whole")
    timing = p.add_argument_group("timing")
    timing.add_argument("--threads", type=int, default=None,
                        help=f"torch intra-op threads, fixed for the run (default: torch's, here {torch.get_num_threads()})")
    timing.add_argument("--iterations", type=int, default=20, help="measured steps (default 20)")
    timing.add_argument("--warmup", type=int, default=3, help="unmeasured steps first (default 3)")
    timing.add_argument("--remeasure", type=int, default=1, metavar="N",
                        help="measure again up to N times when the noise checks find the steps disturbed "
                             "(default %(default)s; profile.json's 'noise' says what was found)")
    timing.add_argument("--materialize", choices=["auto", "whole", "per-node"], default="auto",
                        help="whole: build the model and time real steps; per-node: build it on the meta device "
                             "and materialise, time and free one graph node at a time (peak memory: the largest "
                             "node, not the model); auto (default): per-node when the model's training state "
                             "would not fit in the memory available")
    timing.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda when available)")
    timing.add_argument("--no-malloc-tuning", action="store_true",
                        help="leave glibc malloc as it is (default: tuned as `pipeshift train` tunes it, so the "
                             "profile times what training will run; see runtime/allocator.py)")
    p.add_argument("--tp-plan", action="append", default=[], metavar="PATTERN=STYLE|FILE|generic",
                   help="which modules a tensor-parallel stage shards (default: the model's own plan, e.g. a "
                        "Hugging Face config's base_model_tp_plan, else the generic column/row rule); recorded in "
                        "profile.json for `plan --tp` and codegen")
    p.add_argument("--top", type=int, default=15, metavar="N", help="rows in the heaviest-nodes table (0: none)")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no table")


def leaf_policy_from_args(args: argparse.Namespace, model_leaves: tuple[str, ...] = ()) -> LeafPolicy:
    """The user's --leaf/--leaf-type/--depth; without any, the classes the model bundle names."""
    if args.depth is not None and args.depth < 1:
        raise PipeshiftError(f"--depth must be at least 1, got {args.depth}")
    if not (args.leaf or args.leaf_type or args.depth is not None or getattr(args, "no_model_leaves", False)):
        return LeafPolicy(leaf_types=tuple(model_leaves))
    return LeafPolicy(leaf_types=tuple(args.leaf_type), leaf_modules=tuple(args.leaf), max_depth=args.depth)


def check_policy(policy: LeafPolicy, model: torch.nn.Module) -> None:
    """A ``--leaf`` that names no submodule is a typo; say so instead of silently ignoring it."""
    names = dict(model.named_modules())
    for fqn in policy.leaf_modules:
        if fqn not in names or not fqn:
            raise PipeshiftError(f"--leaf {fqn!r}: the model has no submodule of that name")
    classes = {type(m).__name__ for m in names.values()} | {
        f"{type(m).__module__}.{type(m).__qualname__}" for m in names.values()
    }
    for cls in policy.leaf_types:
        if cls not in classes:
            raise PipeshiftError(f"--leaf-type {cls!r}: the model has no module of that class")


def _batch_sizes(values: list[int]) -> list[int]:
    out: list[int] = []
    for b in values:
        if b < 1:
            raise PipeshiftError(f"-b {b}: a batch size must be at least 1")
        if b not in out:
            out.append(b)
    return out


def _example_batch(spec: ModelSpec, bundle, data: FunctionSpec | None, loss: FunctionSpec | None,
                   batch_size: int) -> tuple[torch.Tensor, ...]:
    """The inputs to profile on: the first batch of ``--data`` when given (the shapes training
    runs), else the model's example inputs; ``--loss`` is checked on the model's output here."""
    if data is None or data.callable == "synthetic":
        inputs = tuple(bundle.example_inputs(batch_size))
        target = None
    else:
        inputs, target = next(resolve_data(data, bundle, spec.callable)(batch_size, "train", spec.seed))
    if loss is not None:
        criterion = resolve_loss(loss, bundle, spec.callable)()
        if target is None:
            target = next(bundle.synthetic_data(batch_size, spec.seed))[1]
        try:
            with torch.no_grad():
                criterion(bundle.model(*inputs), target)
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PipeshiftError(f"--loss {loss.callable} fails on the model's output and the target: {first}") from None
    return inputs


def profile_to_directory(spec: ModelSpec, args: argparse.Namespace, batch_size: int,
                         directory: Path) -> tuple[list[Path], str | None]:
    mode = materialize_mode(spec, args)
    bundle = spec.build(weights=mode == "whole")  # fresh weights and statistics for every batch size
    policy = leaf_policy_from_args(args, bundle.leaf_types)
    check_policy(policy, bundle.model)
    # per node, the model has no weights to run the loss check on; the data still gives the inputs
    loss = loss_spec_from_args(args) if mode == "whole" else None
    inputs = _example_batch(spec, bundle, data_spec_from_args(args), loss, batch_size)
    profile_fn = profile_model
    if mode == "per-node":
        from pipeshift.profiler.per_node import profile_model_per_node as profile_fn
    tp_rules = parse_tp_rules(args.tp_plan)
    extra = {} if mode == "per-node" else {"remeasure": args.remeasure, "tp_rules": tp_rules}
    profile = profile_fn(
        bundle.model,
        inputs,
        batch_size=batch_size,
        policy=policy,
        threads=args.threads,
        iterations=args.iterations,
        warmup=args.warmup,
        device=args.device,
        spec=spec,
        progress=not args.quiet,
        **extra,
    )
    if profile.tp_plan is None:  # the per-node path captures on meta: the plan is resolved on its graph here
        from pipeshift.tp_plan import resolve

        profile.tp_plan = resolve(bundle.model, profile.captured.gm, tp_rules)
    for finding in profile.noise_findings:
        attempts = (profile.noise or {}).get("attempts", 1)
        print(f"pipeshift profile: warning: b={batch_size}: {finding} (kept the steadiest of {attempts} "
              f"measurement{'s' if attempts > 1 else ''}; the times may be too high)", file=sys.stderr)
    written = write_profile(profile, directory)
    picture, warning = write_picture(profile, directory)
    if not args.quiet and args.top > 0:
        print(format_table(profile, args.top))
    return [*written, *([picture] if picture is not None else [])], warning


def materialize_mode(spec: ModelSpec, args: argparse.Namespace) -> str:
    """``--materialize``, with ``auto`` resolved (and said plainly when it picks per-node)."""
    if args.materialize != "auto":
        return args.materialize
    from pipeshift.profiler.per_node import available_bytes, training_state_bytes

    need = training_state_bytes(spec.build(weights=False).model)
    have = available_bytes()
    if have is None or need <= 0.8 * have:
        return "whole"
    print(f"pipeshift profile: the model's training state (~{need / 1e9:.3g} GB: weights, gradients and Adam's two "
          f"moments) exceeds the {have / 1e9:.3g} GB of memory available, so it is profiled one node at a time "
          "(--materialize per-node: in-isolation times; --materialize whole to insist)", file=sys.stderr)
    return "per-node"


def run(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    leaf_policy_from_args(args)  # a bad --depth is reported before anything is built
    batch_sizes = _batch_sizes(args.batch_sizes)
    if args.iterations < 1 or args.warmup < 0:
        raise PipeshiftError("--iterations must be at least 1 and --warmup at least 0")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise PipeshiftError(f"-o {out}: exists and is not a directory")
    if not args.no_malloc_tuning:
        # Train keeps freed memory for reuse; profiling without it measured backward 15–25% slower
        # than training runs it (benchmarks/bench_prediction.py), so profile under the same allocator.
        from pipeshift.runtime.allocator import keep_freed_memory

        keep_freed_memory()
    warned = False
    for b in batch_sizes:
        directory = out if len(batch_sizes) == 1 else out / f"b{b}"
        paths, warning = profile_to_directory(spec, args, b, directory)
        if warning and not warned:
            print(f"pipeshift profile: warning: {warning}", file=sys.stderr)
            warned = True
        print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0
