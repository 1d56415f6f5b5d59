"""Serve a stage package over HTTP: ``pipeshift serve STAGES --local N [--port P] [--max-batch B …]``.

Launch like training: ``--local N`` starts N ranks on this machine through torchrun; under
torchrun, or per machine with ``--rank R --world-size W --dist-addr HOST:PORT``, each process is
one rank. Every rank runs its stage; the front-end rank (``--frontend-rank``, default 0) also
serves HTTP on 127.0.0.1 (``--host`` to change), batches requests (``--max-batch``,
``--max-delay-ms``), keeps ``--inflight`` batches in the pipeline and answers 503 at once when
its ``--queue`` is full. A dead or silent rank makes every waiting request fail with 503 within
``--timeout`` and the server exit non-zero (torchrun, or ``launch --elastic``, restarts it).
A bearer token is required when ``$PIPESHIFT_SERVE_TOKEN`` or ``--token-file`` gives one.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from pipeshift.errors import PipeshiftError
from pipeshift.plan import Plan

TOKEN_ENV = "PIPESHIFT_SERVE_TOKEN"
STAGE_SWITCH_INTERVAL_S = 0.0002  # on a front end that also runs a stage: see _frontend
_LOCAL_ONLY = {"local", "dry_run"}  # flags of the launcher, not of the ranks


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("package", nargs="?", default=None,
                   help="stage package directory (pipeshift codegen's output); several models: --model")
    g = p.add_argument_group("processes")
    g.add_argument("--local", type=int, metavar="N", help="run N ranks on this machine (torchrun)")
    g.add_argument("--dry-run", action="store_true", help="with --local: print the torchrun command, do not run it")
    g.add_argument("--rank", type=int, default=None, help="explicit launch: this process's rank")
    g.add_argument("--world-size", type=int, default=None, help="explicit launch: number of ranks")
    g.add_argument("--dist-addr", default=None, help="explicit launch: HOST:PORT where rank 0 listens")
    g.add_argument("--frontend-rank", type=int, default=0,
                   help="the rank that serves HTTP (default 0); one past the package's last rank: a front-end "
                        "process of its own, with no stage (start one rank more)")
    g.add_argument("--timeout", type=float, default=30.0,
                   help="seconds without an answer from a rank before it counts as dead (default %(default)s)")
    g.add_argument("--threads", type=int, default=None, help="torch intra-op threads per rank")
    g.add_argument("--device", default="cpu",
                   help="where the stages compute: cpu, cuda or auto (messages between ranks go through "
                        "gloo from host memory either way)")
    g.add_argument("--init-from", default=None, metavar="PATH",
                   help="weights: a safetensors file, a sharded directory with its index, a checkpoint or a .pt "
                        "(each rank reads only its own tensors; default: the seed's initialisation)")
    g = p.add_argument_group("HTTP")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="port (default %(default)s; 0: any free port)")
    g.add_argument("--port-file", default=None, help="write the port actually bound to this file")
    g.add_argument("--http", choices=["auto", "h11", "httptools"], default="auto",
                   help="uvicorn's HTTP parser (default auto: httptools when installed)")
    g.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto",
                   help="uvicorn's event loop (default auto: uvloop when installed)")
    g.add_argument("--token-file", default=None, help=f"file holding the bearer token (default ${TOKEN_ENV})")
    g.add_argument("--name", default=None, help="model name in /v1/models (default: the package directory's)")
    g.add_argument("--max-body-bytes", type=int, default=64 << 20, help="larger bodies get 413 (default 64 MiB)")
    g.add_argument("--request-timeout", type=float, default=30.0,
                   help="seconds before a request is answered 504 (default %(default)s)")
    g.add_argument("--max-new-tokens", type=int, default=256, help="/v1/completions: largest max_tokens")
    g = p.add_argument_group("batching")
    g.add_argument("--max-batch", type=int, default=8, help="samples per batch at most (default %(default)s)")
    g.add_argument("--max-delay-ms", type=float, default=5.0,
                   help="wait at most this long after a batch's first request for more (default %(default)s)")
    g.add_argument("--queue", type=int, default=64, help="requests waiting at most; more get 503 (default %(default)s)")
    g.add_argument("--inflight", type=int, default=None,
                   help="batches in the pipeline at once (default: one per stage rank and one more, which fills "
                        "up before it is sent)")
    g = p.add_argument_group("repartitioning while serving (needs a package written by `pipeshift codegen`)")
    g.add_argument("--allow-repartition", action="store_true",
                   help="keep every layer on every rank so that POST /v1/admin/repartition can switch plans")
    g.add_argument("--repartition-at", action="append", default=[], metavar="BATCHES:PLAN",
                   help="switch to PLAN (a plan.json) once BATCHES batches were dispatched; repeatable")
    g.add_argument("--policy", choices=["off", "auto"], default="off",
                   help="auto: training's repartitioning policy on the ranks' measured forward times")
    g.add_argument("--graph", default=None, metavar="GRAPH_TXT",
                   help="the profiled graph.txt for --policy auto (default: the plan's 'graph')")
    g.add_argument("--report-every", type=int, default=20, metavar="K",
                   help="--policy auto: a window is K batches on every rank (default %(default)s)")
    g.add_argument("--policy-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="policy setting, e.g. threshold=0.2, persist_windows=2")
    g.add_argument("--policy-log", default=None, metavar="FILE", help="write every policy verdict here (JSON lines)")
    g.add_argument("--slowdown", action="append", default=[], metavar="RANK:FACTOR[@BATCH]",
                   help="experiment: from batch BATCH on, rank RANK's forward takes FACTOR times as long")
    from pipeshift.serve import multi

    multi.add_arguments(p)
    p.set_defaults(serve_parser=p)


def _check(args: argparse.Namespace) -> None:
    for name in ("max_batch", "queue", "max_body_bytes", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise PipeshiftError(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("inflight", "threads", "local"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise PipeshiftError(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_delay_ms < 0:
        raise PipeshiftError("--max-delay-ms must be >= 0")
    for name in ("timeout", "request_timeout"):
        if not getattr(args, name) > 0:
            raise PipeshiftError(f"--{name.replace('_', '-')} must be positive")
    if not 0 <= args.port < 65536:
        raise PipeshiftError(f"--port {args.port}: not a port number")


def run(args: argparse.Namespace) -> int:
    from pipeshift.serve import multi

    _check(args)
    _slowdowns(args.slowdown)  # their syntax, before any process starts
    for text in args.repartition_at:
        at, sep, path = text.partition(":")
        if not sep or not at.isdigit() or not path:
            raise PipeshiftError(f"--repartition-at {text!r}: expected BATCHES:PLAN, e.g. 100:plan2/plan.json")
    multi.check(args)
    if args.local is not None:
        return _launch_local(args)
    return _serve_rank(args)


# -- the launcher ---------------------------------------------------------------------------


def rank_argv(args: argparse.Namespace) -> list[str]:
    """This command line without the launcher's flags: what every rank runs."""
    parser: argparse.ArgumentParser = args.serve_parser
    out = [args.package] if args.package is not None else []
    for action in parser._actions:
        dest = action.dest
        if not action.option_strings or dest in _LOCAL_ONLY or dest == "help":
            continue
        value = getattr(args, dest, None)
        if value == action.default:
            continue
        flag = action.option_strings[-1] if action.option_strings[-1].startswith("--") else action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            out.append(flag)
        elif isinstance(action, argparse._AppendAction):
            for v in value:
                out += [flag, str(v)]
        else:
            out += [flag, str(value)]
    return out


def _launch_local(args: argparse.Namespace) -> int:
    from pipeshift.launch.cli import _local_env

    if args.rank is not None or args.world_size is not None or args.dist_addr is not None:
        raise PipeshiftError("--local starts every rank itself: drop --rank/--world-size/--dist-addr")
    # pipeshift's torchrun wrapper: one summary line instead of torchrun's traceback when a rank fails
    cmd = [sys.executable, "-m", "pipeshift.launch.torchrun", "--standalone", "--nproc-per-node", str(args.local),
           "-m", "pipeshift", "--", "serve", *rank_argv(args)]
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    proc = subprocess.Popen(cmd, env=_local_env(args.local))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.wait()
        return 130


# -- one rank -------------------------------------------------------------------------------


def _exit(message: str | None, code: int) -> None:
    """Leave now: a process group with a dead peer can hang a normal exit."""
    sys.stdout.flush()
    if message:
        print(message, file=sys.stderr, flush=True)
    sys.stderr.flush()
    os._exit(code)


def _serve_rank(args: argparse.Namespace) -> int:
    import torch

    from pipeshift.runtime.distributed import init_distributed
    from pipeshift.jsonfile import read_json_object
    from pipeshift.runtime.package import parse_conf

    if args.threads:
        torch.set_num_threads(args.threads)
    expected = None
    try:
        if args.package is not None:  # several models: the job's size is --local's or torchrun's
            conf = Path(args.package) / "conf.json"
            expected = sum(len(r) for r in parse_conf(read_json_object(conf, "conf.json of the stage package"), conf)[1].values())
            expected += args.frontend_rank == expected  # a front end of its own: one rank more
    except PipeshiftError:
        pass  # reported by the start-up agreement, on every rank
    launched = args.rank is not None or "RANK" in os.environ
    if expected not in (None, 1) and not launched:
        raise PipeshiftError(f"this package needs {expected} ranks: run it with `pipeshift serve {args.package} "
                             f"--local {expected}`, under torchrun, or with --rank/--world-size/--dist-addr on each rank")
    info = init_distributed(rank=args.rank, world_size=args.world_size, dist_addr=args.dist_addr,
                            backend="gloo", device=args.device, timeout_s=args.timeout, expected_world=expected)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        _exit_with_launcher(info.rank)
    try:
        if args.package is None:
            from pipeshift.serve import multi

            code = multi.serve(args, info)
        else:
            code = _serve(args, info)
    except PipeshiftError as e:
        _exit(f"pipeshift serve: error: {e}", 1)
    except KeyboardInterrupt:
        _exit("pipeshift serve: interrupted", 130)
    except BaseException:
        traceback.print_exc()
        _exit(f"pipeshift serve: internal error on rank {info.rank} (a pipeshift bug; traceback above)", 1)
    _exit(None, code)
    return code


def _serve(args: argparse.Namespace, info) -> int:
    from pipeshift.runtime.comm import Communicator
    from pipeshift.runtime.package import load_stage_package
    from pipeshift.runtime.trainer import agree
    from pipeshift.serve import wire
    from pipeshift.serve.routing import build_routing
    from pipeshift.serve.worker import FrontendOnly, StageWorker

    error, pkg, built, config, policy = None, None, None, {}, None
    try:
        pkg = load_stage_package(args.package)
        if not 0 <= args.frontend_rank <= pkg.world_size:
            raise PipeshiftError(f"--frontend-rank {args.frontend_rank}: the stages run on ranks "
                                 f"0..{pkg.world_size - 1}, and {pkg.world_size} gives the front end a rank of its own")
        own = args.frontend_rank == pkg.world_size
        if pkg.world_size + own != info.world_size:
            alone = f" and the front end rank {pkg.world_size}" if own else ""
            raise PipeshiftError(f"{pkg.path / 'conf.json'}: the stages use {pkg.world_size} ranks{alone} but "
                                 f"{info.world_size} were started (pipeshift serve --local {pkg.world_size + own}"
                                 f"{f' --frontend-rank {pkg.world_size}' if own else ''})")
        switches = bool(args.repartition_at or args.allow_repartition or args.policy == "auto")
        if pkg.tp_degrees and switches:
            raise PipeshiftError(f"{pkg.path / 'conf.json'}: tensor-parallel stages cannot repartition while "
                                 "serving (drop --repartition-at/--allow-repartition/--policy auto)")
        if own and pkg.tp_degrees:
            raise PipeshiftError(f"--frontend-rank {args.frontend_rank} (a front end without a stage) does not serve "
                                 "tensor-parallel stages yet: put the front end on a stage rank")
        if own and switches:
            raise PipeshiftError(f"--frontend-rank {args.frontend_rank} (a front end without a stage) cannot "
                                 "repartition yet: leave out --allow-repartition, --repartition-at and --policy auto, "
                                 "or put the front end on a stage rank")
        built = _build(pkg, info.rank, args.init_from, switches)
        if args.policy == "auto" and info.rank == args.frontend_rank:
            policy = _policy(args, pkg)
        config = {"package": pkg.digest(), "world_size": info.world_size, "frontend_rank": args.frontend_rank,
                  "slowdown": args.slowdown}
    except PipeshiftError as e:
        error = str(e)
    comm = Communicator(info.rank, stage_of=lambda r: -1, tags={}, timeout_s=args.timeout)
    agree(comm, info.rank, config, error)
    entries, module_to_stage, repartitioner, bundle = built
    mailbox = wire.Mailbox()
    stage_of = {r: s for s, ranks in pkg.stage_to_rank.items() for r in ranks}

    def who(rank: int) -> str:
        return f"rank {rank} (stage {stage_of[rank]})" if rank in stage_of else f"rank {rank} (the front end)"

    link = wire.Link(info.rank, mailbox, args.timeout, who)
    worker: StageWorker | FrontendOnly
    if info.rank in stage_of:
        worker = StageWorker(info.rank, entries, module_to_stage, pkg.stage_to_rank, frontend=args.frontend_rank,
                             link=link, device=info.device, timeout_s=args.timeout, repartitioner=repartitioner,
                             slowdowns=_slowdowns(args.slowdown), source=str(pkg.path / "conf.json"),
                             tp_degrees=pkg.tp_degrees, tp_plan=pkg.tp_plan)
        if worker.tp is not None and worker.tp.is_leader:
            from pipeshift.runtime.tp import describe_sharding

            print(f"pipeshift serve: {describe_sharding(worker)}", file=sys.stderr, flush=True)
    else:
        routing = build_routing([(ins, outs) for _, ins, outs in entries], module_to_stage, pkg.stage_to_rank,
                                source=str(pkg.path / "conf.json"))
        worker = FrontendOnly(info.rank, routing, frontend=args.frontend_rank, link=link)
    if info.rank != args.frontend_rank:
        freeze_startup_objects()
        worker.run()
        return 0
    return _frontend(args, info, pkg, bundle, worker, mailbox, who, policy)


def freeze_startup_objects() -> None:
    """Exempt what start-up made from the garbage collector's full passes.

    The model, torch and the libraries leave hundreds of thousands of objects that live as long
    as the process. A full pass walks all of them while holding the interpreter lock, so every
    thread of this rank, stage and HTTP alike, stalls meanwhile. Frozen, a pass walks only what
    serving itself allocated since.
    """
    import gc

    gc.collect()
    gc.freeze()


def _exit_with_launcher(rank: int) -> None:
    """Leave when torchrun goes: it starts every rank in a session of its own, so a torchrun killed
    outright (SIGKILL, a lost terminal) would leave the ranks serving — and pinging each other — forever."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        _exit(f"pipeshift serve: rank {rank}: the launcher (pid {parent}) exited; stopping", 1)

    threading.Thread(target=watch, name="pipeshift-serve-launcher-watch", daemon=True).start()


def _build(pkg, rank: int, init_from: str | None, repartitionable: bool):
    """This rank's entries, a repartitioner when switches may come, the model bundle.

    Without switches a rank materialises only its own stages' tensors (the rest of the model
    stays on the meta device), as training does; a server that may repartition keeps every
    layer on every rank, so a switch has them at hand (the training mechanism's requirement).
    """
    from torch import nn

    from pipeshift.runtime.job import package_entries
    from pipeshift.runtime.local import local_entries
    from pipeshift.runtime.repartition import Partition, Repartitioner

    class NoLoss(nn.Module):
        """The criterion slot of the package's module list: serving never computes a loss."""

    bundle = pkg.bundle(weights=False)
    criterion = NoLoss()
    if not repartitionable:
        local = package_entries(pkg, bundle.model, criterion, rank, init_from)
        return local.entries, pkg.module_to_stage, None, bundle
    plan = pkg.plan
    if plan is None or not pkg.adopts:
        raise PipeshiftError(f"{pkg.path}: repartitioning needs a stage package written by `pipeshift codegen` "
                             "(its plan.json lists the stages)")

    def make(model: nn.Module) -> list[tuple[nn.Module, list[str], list[str]]]:
        return pkg.adopting(model).entries(criterion)

    local = local_entries(make, bundle.model, pkg.module_to_stage, range(pkg.num_stages),
                          seed=pkg.spec.seed if pkg.spec else 0, init_from=init_from, who=f"rank {rank}")
    partition = Partition.of(plan, [m for m, _, _ in local.entries[:-1]])
    return local.entries, pkg.module_to_stage, Repartitioner(rank, bundle.model, local.entries[-1], partition), bundle


def _slowdowns(values: list[str]) -> list[tuple[int, float, int]]:
    out = []
    for text in values:
        head, _, at = text.partition("@")
        rank, _, factor = head.partition(":")
        try:
            item = (int(rank), float(factor), int(at) if at else 0)
        except ValueError:
            raise PipeshiftError(f"--slowdown {text!r}: expected RANK:FACTOR[@BATCH]") from None
        if item[1] < 1.0 or item[2] < 0 or item[0] < 0:
            raise PipeshiftError(f"--slowdown {text!r}: FACTOR must be >= 1, RANK and BATCH >= 0")
        out.append(item)
    return out


def _forced(values: list[str]) -> list[tuple[int, Plan, str]]:
    from pipeshift.plan import read_plan

    out = []
    for text in values:
        at, sep, path = text.partition(":")
        if not sep or not at.isdigit() or not path:
            raise PipeshiftError(f"--repartition-at {text!r}: expected BATCHES:PLAN, e.g. 100:plan2/plan.json")
        out.append((int(at), read_plan(path), f"--repartition-at {text}"))
    return sorted(out, key=lambda x: x[0])


def _policy(args: argparse.Namespace, pkg):
    from pipeshift.runtime.job import policy_config
    from pipeshift.runtime.restart import find_graph
    from pipeshift.serve.policy import ServePolicy, serving_chain

    if args.report_every < 1:
        raise PipeshiftError("--report-every must be >= 1")
    plan = pkg.plan
    if plan is None:
        raise PipeshiftError(f"{pkg.path}: --policy auto needs a stage package written by `pipeshift codegen` "
                             "(its plan.json lists the stages)")
    graph = find_graph(plan, pkg.path, args.graph)
    if graph is None:
        raise PipeshiftError(f"--policy auto needs the profiled graph.txt: pass --graph (the plan's 'graph' "
                             f"{plan.graph!r} was not found)")
    return ServePolicy(plan, serving_chain(graph), policy_config(args.policy_arg), args.report_every,
                       Path(args.policy_log) if args.policy_log else None)


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as e:
            raise PipeshiftError(f"--token-file {args.token_file}: {e.strerror or e}") from None
        if not token:
            raise PipeshiftError(f"--token-file {args.token_file}: the file is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


def _model_info(args, pkg, bundle, worker, frontend):

    from pipeshift.serve.completions import Generator, causal_lm, load_tokenizer
    from pipeshift.serve.http import InputSpec, ModelInfo

    example = [t for t in bundle.example_inputs(1)]
    raw = worker.routing.raw_inputs
    if len(raw) != len(example):
        raise PipeshiftError(f"{pkg.path}: the model takes {len(example)} inputs but its stages read {list(raw)}")
    inputs = [InputSpec(f"input{k}", t.dtype, tuple(t.shape)) for k, t in enumerate(example)]
    outputs = [f"output{k}" for k in range(len(worker.routing.outputs))]
    info = ModelInfo(name=args.name or pkg.path.name, inputs=inputs, outputs=outputs, max_batch=args.max_batch,
                     max_body_bytes=args.max_body_bytes, request_timeout_s=args.request_timeout,
                     token=_token(args))
    out = _output_shapes(pkg, example)
    if out is not None and causal_lm(example, out):
        model = bundle.model
        context = next((int(v) for v in (getattr(getattr(model, "config", None), "max_position_embeddings", None),
                                         getattr(getattr(model, "wpe", None), "num_embeddings", None)) if v), 1 << 16)
        tokenizer = load_tokenizer(pkg.spec.kwargs if pkg.spec else {})
        info.completions = Generator(info.name, int(out[0].shape[-1]), context, args.max_new_tokens, tokenizer)
    return info


def _output_shapes(pkg, example) -> list | None:
    """The model's outputs for ``example`` on the meta device (shapes only, nothing computed); None if unknown."""
    import torch

    try:
        model = pkg.spec.build(weights=False).model.to("meta")
        with torch.inference_mode():
            out = model(*[t.to("meta") for t in example])
    except Exception:  # an op without a meta kernel: the model is served, just not as a language model
        return None
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _frontend(args, info, pkg, bundle, worker, mailbox, who, policy) -> int:
    from pipeshift.serve.frontend import Config, Frontend, default_inflight
    from pipeshift.serve.http import build_app
    from pipeshift.serve.metrics import ServeMetrics

    stage_ranks = {r for ranks in pkg.stage_to_rank.values() for r in ranks}
    if info.rank in stage_ranks:
        # This process's stage thread gives up the interpreter lock in every operator and must win it
        # back from the HTTP and batching threads; at Python's default 5 ms switch interval a busy
        # HTTP thread can hold each of those hand-offs for that long. A shorter interval costs the
        # Python threads a little; under load it gave the two-stage pipeline 132-176 req/s against
        # 93-113 (one process: no change). A front end of its own (--frontend-rank) avoids the issue.
        sys.setswitchinterval(STAGE_SWITCH_INTERVAL_S)
    inflight, partial_below = (args.inflight, 0) if args.inflight else default_inflight(len(stage_ranks))
    cfg = Config(max_batch=args.max_batch, max_delay_s=args.max_delay_ms / 1000.0, queue_size=args.queue,
                 inflight=inflight, partial_below=partial_below, timeout_s=args.timeout)
    frontend = Frontend(info.rank, info.world_size, worker, mailbox, cfg, who=who)
    frontend.forced = _forced(args.repartition_at)
    frontend.policy = policy
    metrics = ServeMetrics(lambda: {"queue_depth": frontend.queue_depth(),
                                    "inflight_batches": frontend.inflight_batches(),
                                    "ready": float(frontend.ready)})
    frontend.metrics = metrics
    model_info = _model_info(args, pkg, bundle, worker, frontend)
    app = build_app(frontend, model_info, metrics)
    what = f"{model_info.name} ({info.world_size} ranks, stages {[list(r) for r in worker.routing.stage_ranks]})"
    return run_frontend(args, info, frontend, app, what)


def run_frontend(args, info, frontend, app, what: str) -> int:
    """Serve ``app`` over HTTP while ``frontend`` runs; the exit code once it stopped or failed."""
    import importlib.util

    import uvicorn

    for flag, module in (("--http", args.http), ("--loop", args.loop)):
        if module not in ("auto", "h11", "asyncio") and importlib.util.find_spec(module) is None:
            raise PipeshiftError(f"{flag} {module}: {module} is not installed (pip install {module}, or {flag} auto)")
    sock = _listen(args.host, args.port)
    freeze_startup_objects()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                           timeout_keep_alive=30, http=args.http, loop=args.loop))
    http = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="pipeshift-serve-http", daemon=True)
    frontend.start()
    http.start()
    deadline = time.monotonic() + args.timeout
    while not server.started:
        if not http.is_alive() or time.monotonic() > deadline:
            raise PipeshiftError(f"the HTTP server on {args.host}:{sock.getsockname()[1]} did not start")
        time.sleep(0.01)
    port = sock.getsockname()[1]
    if args.port_file:
        tmp = Path(args.port_file + ".tmp")
        tmp.write_text(str(port))
        tmp.replace(args.port_file)
    print(f"pipeshift serve: {what} on http://{args.host}:{port}", file=sys.stderr, flush=True)

    def stop(signum, frame) -> None:
        threading.Thread(target=frontend.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    frontend.run()
    if frontend.dead is None:
        try:
            frontend.shutdown_ranks()
        except PipeshiftError as e:
            frontend.fail(str(e))
    if frontend.dead is not None:  # answered everyone with 503; give the HTTP thread time to send them
        time.sleep(frontend.config.exit_grace_s + 1.0)
        return 1
    server.should_exit = True
    http.join(timeout=5)
    return 0


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise PipeshiftError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock

