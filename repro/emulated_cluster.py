"""Data parallelism against a pipeline on two emulated machines with a narrow link.

``python -m repro.emulated_cluster [--rate-mbit 200] [--repeats 3] [-o DIR]`` (as root):

1. two "machines" = two network namespaces joined by a veth pair, each direction capped by
   ``tc tbf`` (:mod:`repro.netns`); without root or iproute2 both ranks run on loopback and the
   output says plainly that nothing was shaped;
2. ``pipeshift profile`` a VGG-like model (VGG-16 at width 8 on 32×32 images with a 1024-wide
   classifier: 18 MB of weights, mostly the classifier's, but activations of tens of KB per sample
   where a pipeline would cut) — the shape that makes data parallelism's all-reduce expensive on a
   narrow link while a pipeline sends little;
3. ``pipeshift netcheck`` between the two machines measures the link, and ``pipeshift plan
   --topology`` plans for it: the table shows which configuration the planner picks;
4. the same model is trained for a few steps on the two machines twice — (a) data parallelism,
   one stage replicated on both; (b) the two-stage pipeline — through the per-machine commands
   ``pipeshift launch --hosts`` prints (``pipeshift train --rank R --world-size 2 --dist-addr``),
   ``--repeats`` times each, alternating, and samples/s is reported as the median with its range.

Not part of ``make test``: it needs root and takes a few minutes. Only the namespaces it creates
(and loopback) carry traffic, and they are deleted at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeshift.errors import PipeshiftError
from repro.netns import LoopbackLink, NamespaceLink, open_link
from repro.notation import paper_notation

MODEL = "pipeshift.models:vgg16"
MODEL_ARGS = {"width": "8", "image_size": "32", "hidden": "1024", "num_classes": "10"}
CONFIGS = ("data parallel", "pipeline")


# -- pure helpers (tested in tests/test_repro_emulated.py) ---------------------------------
def data_parallel_plan(plan: dict[str, Any], world: int) -> dict[str, Any]:
    """``plan`` with all its stages merged into one stage replicated on ranks ``0..world-1``.

    The nodes stay in pipeline order (each stage's list is topologically ordered and stages
    follow each other), so codegen sees a valid one-stage plan over the same model. The merged
    stage's ``costs`` are the sums of the stages' and a ring all-reduce of all the weights over
    the plan's outermost link (pipeshift's cost model), so the simulator can replay it too.
    """
    stages = plan.get("stages")
    if not isinstance(stages, list) or not stages:
        raise PipeshiftError("plan has no stages to merge")
    if world < 1:
        raise PipeshiftError(f"world size must be >= 1, got {world}")
    out = copy.deepcopy(plan)
    nodes = [n for st in stages for n in st["nodes"]]
    fqns = list(dict.fromkeys(f for st in stages for f in st.get("fqns", [])))
    merged: dict[str, Any] = {"stage_id": 0, "nodes": nodes, "fqns": fqns, "replicas": world,
                              "ranks": list(range(world)), "workers": list(range(world))}
    costs = [st.get("costs") for st in stages]
    levels = (plan.get("topology") or {}).get("levels") or []
    if all(isinstance(c, dict) for c in costs) and levels:
        from pipeshift.optimizer.cost import ring_allreduce

        params = sum(c["parameter_bytes"] for c in costs)
        link = levels[-1]
        merged["costs"] = {
            "forward_s": sum(c["forward_s"] for c in costs),
            "backward_s": sum(c["backward_s"] for c in costs),
            "parameter_bytes": params,
            "stash_bytes_per_microbatch": sum(c.get("stash_bytes_per_microbatch", 0.0) for c in costs),
            "output_bytes": 0.0,
            "output_link": None,
            "allreduce_s": float(ring_allreduce(params, world, link["bandwidth_bytes_per_s"], link.get("latency_s", 0.0))),
        }
    out["stages"] = [merged]
    out["num_workers"] = world
    out["rank_to_worker"] = list(range(world))
    out["notes"] = list(plan.get("notes", [])) + ["data-parallel variant: every stage merged into one replicated stage"]
    out.pop("memory_per_worker_bytes", None)
    predicted = plan.get("predicted") or {}
    dp_time = predicted.get("data_parallel_time_s")
    batch = plan.get("batch_size")
    out["predicted"] = {  # the planner's own estimate for data parallelism, not the pipeline's figures
        "time_per_minibatch_s": dp_time,
        "data_parallel_time_s": dp_time,
        "speedup_over_data_parallel": 1.0 if dp_time else None,
        "throughput_samples_per_s": batch / dp_time if dp_time and isinstance(batch, int) else None,
    }
    return out


def on_link(plan: dict[str, Any], bandwidth: float, latency: float) -> dict[str, Any]:
    """``plan`` with every inter-stage link and its topology set to one measured link (same split).

    The control runs reuse the stage packages planned for the narrow link on a faster one; to
    simulate them there, only the link changes, not the split.
    """
    out = copy.deepcopy(plan)
    for level in (out.get("topology") or {}).get("levels") or []:
        level["bandwidth_bytes_per_s"], level["latency_s"] = bandwidth, latency
    for st in out.get("stages", []):
        link = (st.get("costs") or {}).get("output_link")
        if isinstance(link, dict):
            link["bandwidth_bytes_per_s"], link["latency_s"] = bandwidth, latency
    return out


def simulated_rate(plan: dict[str, Any], microbatches: int, batch_size: int, steps: int) -> float:
    """samples/s the simulator predicts for a flush run of ``plan`` (profiled speeds, fill and drain included)."""
    from pipeshift.optimizer.simulator import simulate, stages_from_plan
    from pipeshift.plan import parse_plan

    result = simulate(stages_from_plan(parse_plan(plan, "plan.json")), "flush", microbatches, steps)
    return batch_size / result.time_per_microbatch_s


def read_metrics(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return [row for row in csv.DictReader(f) if row.get("split") == "train"]


def throughput(rows: Sequence[dict[str, str]], samples_per_step: int, warmup: int) -> float:
    """Samples/s over the steps after ``warmup``, from one rank's metrics rows (``time_s`` is cumulative).

    Taking the elapsed time over a span, rather than the median per-step rate, counts every
    stall; the first steps (connection set-up, allocator warm-up) are left out.
    """
    times = [float(r["time_s"]) for r in rows]
    if len(times) <= warmup:
        raise PipeshiftError(f"need more than {warmup} training steps to measure, got {len(times)}")
    start = times[warmup - 1] if warmup > 0 else 0.0
    elapsed = times[-1] - start
    if not elapsed > 0:
        raise PipeshiftError("metrics show no elapsed time")
    return samples_per_step * (len(times) - warmup) / elapsed


def median_and_range(values: Sequence[float]) -> tuple[float, float, float]:
    if not values:
        raise ValueError("no values")
    return statistics.median(values), min(values), max(values)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def configuration_of(plan: dict[str, Any]) -> str:
    return paper_notation(plan["stages"])


# -- running things --------------------------------------------------------------------------
def _python() -> list[str]:
    return [sys.executable]


def run_checked(cmd: list[str], what: str, timeout: float) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise PipeshiftError(f"{what} failed (exit {proc.returncode}): {' / '.join(tail)}")
    return proc.stdout


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_on_machines(link, commands: list[list[str]], logs: list[Path], timeout: float) -> None:
    """Start ``commands[i]`` on machine ``i`` and wait for all; on failure or timeout stop them all."""
    procs: list[subprocess.Popen] = []
    try:
        for i, (cmd, log) in enumerate(zip(commands, logs)):
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "w") as f:
                procs.append(subprocess.Popen(link.prefix(i) + cmd, stdout=f, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, start_new_session=True))
        deadline = time.monotonic() + timeout
        for i, proc in enumerate(procs):
            left = max(0.1, deadline - time.monotonic())
            try:
                code = proc.wait(timeout=left)
            except subprocess.TimeoutExpired:
                raise PipeshiftError(f"machine {i} did not finish within {timeout:g} s (log: {logs[i]})") from None
            if code != 0:
                tail = logs[i].read_text(errors="replace").strip().splitlines()[-2:]
                raise PipeshiftError(f"machine {i} exited with {code}: {' / '.join(tail)} (log: {logs[i]})")
    finally:
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # our own child's session, nothing else
                proc.wait()


def profile(work: Path, model_args: dict[str, str], batch_size: int) -> Path:
    out = work / "profile"
    cmd = _python() + ["-m", "pipeshift", "profile", MODEL, "-b", str(batch_size), "--threads", "1",
                       "--iterations", "10", "--quiet", "-o", str(out)]
    for k, v in model_args.items():
        cmd += ["--model-arg", f"{k}={v}"]
    run_checked(cmd, "pipeshift profile", timeout=600)
    return out / "graph.txt"


def netcheck(link, work: Path, name: str = "topology") -> Path:
    """Measure the link between the two machines with `pipeshift netcheck` (a topology file)."""
    topo = work / f"{name}.json"
    hosts = link.hosts()
    if isinstance(link, LoopbackLink):
        run_checked(_python() + ["-m", "pipeshift", "netcheck", "--local", "2", "--rounds", "5", "-o", str(topo)],
                    "pipeshift netcheck", timeout=300)
        return topo
    port = free_port()
    cmds = [_python() + ["-m", "pipeshift", "netcheck", "--hosts", ",".join(hosts), "--rank", str(r),
                         "--dist-addr", f"{hosts[0]}:{port}", "--rounds", "5", "--large-bytes", str(4 << 20),
                         "-o", str(topo)] for r in range(2)]
    run_on_machines(link, cmds, [work / "logs" / f"{name}_rank{r}.txt" for r in range(2)], timeout=300)
    return topo


def plan(graph: Path, out: Path, topology_flags: list[str], microbatches: int) -> dict[str, Any]:
    run_checked(_python() + ["-m", "pipeshift", "plan", str(graph), *topology_flags, "--schedule", "flush",
                             "--microbatches", str(microbatches), "-q", "-o", str(out)], "pipeshift plan", timeout=300)
    return json.loads((out / "plan.json").read_text())


def train_commands(hosts: list[str], package: Path, out: Path, args: argparse.Namespace) -> list[list[str]]:
    """The per-machine commands `pipeshift launch --hosts` prints (explicit ranks, one per machine)."""
    from pipeshift.launch.cli import explicit_commands

    train_args = [str(package), "--schedule", "flush", "--microbatches", str(args.microbatches),
                  "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--threads", "1",
                  "--no-progress", "--trace-steps", "0", "--timeout", "120", "--output-dir", str(out)]
    per_host = explicit_commands(sys.executable, [(h, 1) for h in hosts], free_port(), train_args)
    return [cmd for _, cmd in per_host]


def measure(link, package: Path, out: Path, args: argparse.Namespace) -> float:
    cmds = train_commands(link.hosts(), package, out, args)
    run_on_machines(link, cmds, [out / f"rank{r}.log" for r in range(2)], timeout=args.run_timeout)
    samples = args.microbatches * args.batch_size
    # the slowest rank's rate is the run's (in a pipeline all ranks finish each step together anyway)
    return min(throughput(read_metrics(out / f"rank{r}" / "metrics.csv"), samples, args.warmup_steps)
               for r in range(2))


# -- the experiment ------------------------------------------------------------------------
def run_repeats(link, packages: dict[str, Path], root: Path, args: argparse.Namespace,
                label: str) -> dict[str, list[float]]:
    """samples/s of each configuration, ``--repeats`` times, alternating which goes first."""
    rates: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for rep in range(args.repeats):
        order = CONFIGS if rep % 2 == 0 else CONFIGS[::-1]  # so slow drift in the machine's load hits both alike
        for name in order:
            rate = measure(link, packages[name], root / f"{name.replace(' ', '_')}_{rep}", args)
            rates[name].append(rate)
            print(f"{label}repeat {rep + 1}/{args.repeats}: {name}: {rate:.1f} samples/s", flush=True)
    return rates


def experiment(args: argparse.Namespace, link: NamespaceLink | LoopbackLink) -> dict[str, Any]:
    work = Path(args.work or tempfile.mkdtemp(prefix="pipeshift-emulated-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"work directory: {work}", flush=True)
    model_args = dict(MODEL_ARGS)
    for item in args.model_arg:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PipeshiftError(f"--model-arg {item!r}: expected KEY=VALUE")
        model_args[key] = value
    link_text, rate = link.describe(), link.rate_mbit  # before a control run lifts the limit
    shaped = isinstance(link, NamespaceLink) and rate is not None
    print(f"link: {link_text}", flush=True)
    graph = profile(work, model_args, args.batch_size)
    print(f"profiled {MODEL} {model_args} at batch {args.batch_size}: {graph}", flush=True)
    topo_file = netcheck(link, work)
    topo = json.loads(topo_file.read_text())
    level = topo["levels"][-1]
    print(f"netcheck: {level['bandwidth_bytes_per_s'] / 1e6:.1f} MB/s, {level['latency_s'] * 1e6:.0f} us one way",
          flush=True)
    chosen = plan(graph, work / "plan_measured", ["--topology", str(topo_file)], args.microbatches)
    planned = {"measured link (netcheck)": chosen}
    if link.rate_mbit is not None:
        nominal = plan(graph, work / "plan_nominal", ["-n", "2", "-b", f"{link.rate_mbit * 1e6 / 8:g}"],
                       args.microbatches)
        planned[f"nominal {link.rate_mbit:g} Mbit/s"] = nominal
    pipeline = chosen
    forced = len(chosen["stages"]) < 2
    if forced:  # the planner chose data parallelism: build the pipeline to compare anyway, and say so
        pipeline = plan(graph, work / "plan_pipeline", ["--topology", str(topo_file), "--straight-pipeline"],
                        args.microbatches)
    plans = {"data parallel": data_parallel_plan(pipeline, 2), "pipeline": pipeline}

    from pipeshift.codegen import generate_package

    packages = {name: generate_package(p, work / f"stages_{name.replace(' ', '_')}") for name, p in plans.items()}
    rates = run_repeats(link, packages, work / "runs", args, "")
    control, control_predicted = None, None
    if args.control and isinstance(link, NamespaceLink) and link.rate_mbit is not None:
        link.unshape()
        free_topo = netcheck(link, work, "topology_unshaped")
        free_level = json.loads(free_topo.read_text())["levels"][-1]
        label = f"unshaped link, netcheck {free_level['bandwidth_bytes_per_s'] / 1e6:.0f} MB/s"
        planned[label] = plan(graph, work / "plan_unshaped", ["--topology", str(free_topo)], args.microbatches)
        control = run_repeats(link, packages, work / "runs_unshaped", args, "unshaped link, ")
        fast = on_link(pipeline, free_level["bandwidth_bytes_per_s"], free_level["latency_s"])
        control_predicted = {
            "data parallel": simulated_rate(data_parallel_plan(fast, 2), args.microbatches, args.batch_size, args.steps),
            "pipeline": simulated_rate(fast, args.microbatches, args.batch_size, args.steps),
        }
    predicted = {name: simulated_rate(p, args.microbatches, args.batch_size, args.steps) for name, p in plans.items()}
    return {"link": link_text, "shaped": shaped, "rate_mbit": rate, "netcheck": level, "model": MODEL, "model_args": model_args,
            "planner": {k: {"configuration": configuration_of(p), "stages": len(p["stages"]),
                            "speedup_over_data_parallel": p["predicted"]["speedup_over_data_parallel"]}
                        for k, p in planned.items()},
            "pipeline_forced": forced,
            "configurations": {name: configuration_of(p) for name, p in plans.items()},
            "predicted_samples_per_s": predicted, "measured_samples_per_s": rates,
            "control_unshaped_samples_per_s": control, "control_simulated_samples_per_s": control_predicted,
            "settings": {"steps": args.steps, "warmup_steps": args.warmup_steps, "repeats": args.repeats,
                         "microbatches": args.microbatches, "batch_size": args.batch_size, "schedule": "flush",
                         "threads_per_rank": 1},
            "command": shlex.join([sys.executable, "-m", "repro.emulated_cluster", *sys.argv[1:]])}


def render(result: dict[str, Any]) -> str:
    s = result["settings"]
    nc = result["netcheck"]
    rows = []
    link_label = f"{result['rate_mbit']:g} Mbit/s" if result["shaped"] else "unshaped"
    runs = [(link_label, result["measured_samples_per_s"], result["predicted_samples_per_s"])]
    if result.get("control_unshaped_samples_per_s"):
        runs.append(("unshaped (control)", result["control_unshaped_samples_per_s"],
                     result.get("control_simulated_samples_per_s")))
    for label, measured, simulated in runs:
        for name in CONFIGS:
            med, lo, hi = median_and_range(measured[name])
            predicted = f"{simulated[name]:.0f}" if simulated else "—"
            rows.append([label, name, result["configurations"][name], f"{med:.1f}", f"{lo:.1f}–{hi:.1f}",
                         str(len(measured[name])), predicted])
    dp = statistics.median(result["measured_samples_per_s"]["data parallel"])
    pp = statistics.median(result["measured_samples_per_s"]["pipeline"])
    out = [
        "# Data parallelism against a pipeline on two emulated machines",
        "",
        f"Link: {result['link']}; measured by `pipeshift netcheck`: {nc['bandwidth_bytes_per_s'] / 1e6:.1f} MB/s, "
        f"{nc['latency_s'] * 1e6:.0f} µs one way.",
    ]
    if not result["shaped"]:
        out.append("**No shaping was possible here, so this run does not emulate a narrow link** — "
                   "the comparison below is on an unshaped link.")
    out += [
        f"Model: `{result['model']}` {result['model_args']}; schedule flush, {s['microbatches']} microbatches of "
        f"{s['batch_size']} per step, {s['steps']} steps per run (the first {s['warmup_steps']} not timed), "
        f"1 thread per rank, {s['repeats']} repeats alternating the two configurations.",
        "",
        markdown_table(["link", "configuration", "stages (paper notation)", "samples/s (median)", "range", "runs",
                        "simulated (samples/s, profiled speed)"], rows),
        "",
        f"Measured on the {link_label} link: the pipeline runs at {pp / dp:.2f}× data parallelism's samples/s.",
        "Simulated: `pipeshift simulate`'s replay of each plan (flush, fill and drain included) at the profiled "
        "speed of one idle core per rank; the measured runs share this machine's cores with whatever else runs "
        "on it, so compare ratios rather than absolute figures.",
    ]
    if result.get("control_unshaped_samples_per_s"):
        c = result["control_unshaped_samples_per_s"]
        ratio = statistics.median(c["pipeline"]) / statistics.median(c["data parallel"])
        out.append(f"Control, same namespaces with the rate limit removed: the pipeline runs at {ratio:.2f}× "
                   "data parallelism's samples/s.")
    for where, p in result["planner"].items():
        kind = "a pipeline" if p["stages"] > 1 else "data parallelism"
        out.append(f"Planner (`pipeshift plan`, {where}): picks {p['configuration']} — {kind}; predicted "
                   f"{p['speedup_over_data_parallel']:.2f}× data parallelism.")
    if result["pipeline_forced"]:
        out.append("The planner did not pick a pipeline; the pipeline row was planned with --straight-pipeline.")
    out += ["", f"Command: `{result['command']}`"]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m repro.emulated_cluster", description=__doc__.split("\n")[0])
    p.add_argument("--rate-mbit", type=float, default=200.0, help="link rate each way, Mbit/s (default 200)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each configuration (default 3)")
    p.add_argument("--steps", type=int, default=12, help="training steps per run (default 12)")
    p.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of the timing (default 2)")
    p.add_argument("--microbatches", type=int, default=4, help="microbatches per step (default 4)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per microbatch (default 16)")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override the model's arguments (default {MODEL_ARGS})")
    p.add_argument("--work", default=None, help="directory for profile, plans, stages, runs (default: a new temp dir)")
    p.add_argument("--run-timeout", type=float, default=300.0, help="seconds one training run may take")
    p.add_argument("--control", action="store_true",
                   help="afterwards, remove the rate limit and run both configurations again (a control)")
    p.add_argument("--loopback", action="store_true", help="do not try namespaces; run both ranks on loopback")
    p.add_argument("-o", "--output", type=Path, help="directory to write emulated.md and emulated.json into")
    args = p.parse_args(argv)
    try:
        if args.repeats < 1 or args.steps <= args.warmup_steps or args.warmup_steps < 0:
            raise PipeshiftError("need --repeats >= 1 and --steps > --warmup-steps >= 0")
        if not args.rate_mbit > 0:
            raise PipeshiftError("--rate-mbit must be positive")
        with open_link(args.rate_mbit, use_namespaces=not args.loopback) as link:
            if isinstance(link, LoopbackLink):
                print(f"note: no network shaping was possible — {link.reason}; running on loopback", flush=True)
            result = experiment(args, link)
        text = render(result)
        print()
        print(text, end="")
        if args.output:
            args.output.mkdir(parents=True, exist_ok=True)
            (args.output / "emulated.md").write_text(text, encoding="utf-8")
            (args.output / "emulated.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
            print(f"wrote {args.output / 'emulated.md'} and emulated.json")
    except PipeshiftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except subprocess.TimeoutExpired as e:
        print(f"error: {shlex.join(map(str, e.cmd))} took longer than {e.timeout:g} s", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
