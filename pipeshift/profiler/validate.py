"""Cross-check the hook-attributed backward times against isolated per-node measurements.

    python -m pipeshift.profiler.validate pipeshift.models:resnet50 --model-arg width=16 \\
        --model-arg image_size=64 -b 4 --threads 1

The profiler attributes backward time by hook timestamps inside real steps
(:mod:`pipeshift.profiler.timing`). A second, independent way to get a node's backward time is
to run that node alone: feed it detached copies of the inputs it saw in a real forward, run its
forward, then its backward with random output gradients, and time both. Isolation loses the
interactions of a real step (warm caches from the previous node, a gradient summed over several
consumers), so the two methods are not expected to agree exactly; they should rank nodes the
same way and agree on the heavy ones. This prints both, node by node, with the whole-step
reference, and summary figures (sums, rank correlation, median relative difference on the nodes
that carry 90% of the time).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pipeshift.errors import PipeshiftError
from pipeshift.graph.capture import flat_tensors
from pipeshift.profiler.profile import ModelProfile, profile_model
from pipeshift.profiler.runner import GroupRunner
from pipeshift.profiler.timing import output_tensors
from pipeshift.spec import add_spec_arguments, spec_from_args


def _detached(value: Any) -> Any:
    if torch.is_tensor(value):
        out = value.detach().clone()
        return out.requires_grad_(value.requires_grad and value.is_floating_point())
    if isinstance(value, tuple):
        return tuple(_detached(v) for v in value)
    if isinstance(value, list):
        return [_detached(v) for v in value]
    return value


def isolated_times(
    model: torch.nn.Module, runner: GroupRunner, inputs: Sequence[Any], iterations: int, warmup: int, progress: bool = True
) -> list[tuple[float, float]]:
    """Median (forward ms, backward ms) of every node run on its own (CPU wall clock)."""
    _, env = runner.forward(inputs)
    fx_of = {g.node_id: g.fx_name for g in runner.groups}
    out: list[tuple[float, float]] = []
    for i, group in enumerate(tqdm(runner.groups, desc="isolated nodes", disable=not progress, leave=False)):
        local = {fx_of[gid]: _detached(env[fx_of[gid]]) for gid in group.inputs}
        fwd: list[float] = []
        bwd: list[float] = []
        for it in range(warmup + iterations):
            scratch = dict(local)
            t0 = time.perf_counter()
            value = runner.run_group(i, scratch, inputs)
            t1 = time.perf_counter()
            pairs = [(t, torch.randn_like(t)) for t in flat_tensors(value) if t.grad_fn is not None]
            t2 = time.perf_counter()
            if pairs:
                torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
            t3 = time.perf_counter()
            for p in model.parameters():
                p.grad = None
            if it >= warmup:
                fwd.append((t1 - t0) * 1e3)
                bwd.append((t3 - t2) * 1e3 if pairs else 0.0)
        out.append((float(np.median(fwd)), float(np.median(bwd))))
    return out


def backward_execution_order(runner: GroupRunner, inputs: Sequence[Any]) -> list[int]:
    """The owning node index of every autograd function, in the order backward executes them.

    Each autograd function is owned by the node whose forward created it: walking from a node's
    outputs back through ``next_functions``, every function not owned by an earlier node is its
    own (a parameter's ``AccumulateGrad`` goes to the first node that uses the parameter). The
    hook timeline in :mod:`pipeshift.profiler.timing` is exact when each node's functions run
    back to back, i.e. when this list, with repeats collapsed, names no node twice.
    """
    env: dict[str, Any] = {}
    owner: dict[int, int] = {}
    keep: list[Any] = []
    executed: list[int] = []
    for i in range(len(runner)):
        value = runner.run_group(i, env, inputs)
        todo = [t.grad_fn for t in flat_tensors(value) if t.grad_fn is not None]
        while todo:
            fn = todo.pop()
            if fn is None or id(fn) in owner:
                continue
            owner[id(fn)] = i
            keep.append(fn)
            fn.register_prehook(lambda grads, i=i: executed.append(i))
            todo.extend(next_fn for next_fn, _ in fn.next_functions)
    outputs = output_tensors(runner.outputs(env))
    chosen = [t for t in outputs if t.requires_grad and t.is_floating_point()]
    torch.autograd.backward(chosen, [torch.randn_like(t) for t in chosen])
    return executed


def collapse_runs(order: Sequence[int]) -> list[int]:
    """``[3, 3, 2, 2, 2, 3]`` -> ``[3, 2, 3]``: one entry per run of equal neighbours."""
    return [x for k, x in enumerate(order) if k == 0 or order[k - 1] != x]


def compare(profile: ModelProfile, isolated: list[tuple[float, float]]) -> tuple[pd.DataFrame, dict[str, float]]:
    rows = []
    for group, prof, (ifwd, ibwd) in zip(profile.captured.groups, profile.nodes, isolated):
        rows.append({"node": group.node_id, "what": group.target if group.op == "call_module" else group.desc[:30],
                     "fwd hooks": prof.forward.median, "fwd isolated": ifwd,
                     "bwd hooks": prof.backward.median, "bwd isolated": ibwd})
    df = pd.DataFrame(rows)
    cost = df["bwd hooks"].to_numpy()
    order = np.argsort(-cost)
    heavy = order[: int(np.searchsorted(np.cumsum(cost[order]), 0.9 * cost.sum()) + 1)]
    rel = np.abs(df["bwd hooks"].to_numpy()[heavy] / np.maximum(df["bwd isolated"].to_numpy()[heavy], 1e-9) - 1)
    summary = {
        "sum fwd hooks": float(df["fwd hooks"].sum()),
        "sum fwd isolated": float(df["fwd isolated"].sum()),
        "sum bwd hooks": float(df["bwd hooks"].sum()),
        "sum bwd isolated": float(df["bwd isolated"].sum()),
        "whole step fwd": profile.whole_forward.median,
        "whole step bwd": profile.whole_backward.median,
        "bwd rank correlation": float(df["bwd hooks"].rank().corr(df["bwd isolated"].rank())),
        "heavy nodes (90% of bwd)": float(len(heavy)),
        "median |hooks/isolated - 1| on heavy nodes": float(np.median(rel)) if len(rel) else 0.0,
    }
    return df, summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeshift.profiler.validate", description=__doc__.splitlines()[0])
    add_spec_arguments(p)
    p.add_argument("-b", "--batch-size", type=int, required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    try:
        spec = spec_from_args(args)
        bundle = spec.build()
        inputs = bundle.example_inputs(args.batch_size)
        torch.set_num_threads(args.threads)
        profile = profile_model(bundle.model, inputs, batch_size=args.batch_size, threads=args.threads,
                                iterations=args.iterations, warmup=args.warmup, device="cpu", spec=spec)
        runner = GroupRunner(profile.captured)
        isolated = isolated_times(bundle.model, runner, inputs, args.iterations, args.warmup)
    except PipeshiftError as e:
        print(f"validate: error: {e}", file=sys.stderr)
        return 1
    df, summary = compare(profile, isolated)
    runs = collapse_runs(backward_execution_order(runner, inputs))
    split = len(runs) - len(set(runs))
    summary["nodes whose backward is split"] = float(split)
    if args.top > 0:
        heaviest = df.sort_values("bwd hooks", ascending=False).head(args.top)
        print(heaviest.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    for key, value in summary.items():
        print(f"{key}: {value:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
