"""Train a stage package on this rank: ``pipeshift train PKG --schedule flush --microbatches 8 --steps N``.

Run one process per rank: under torchrun (``pipeshift launch --local N PKG …`` does that for
this machine), or on each machine with ``--rank R --world-size W --dist-addr HOST:PORT``. A
single-rank package also runs alone. Every rank writes ``OUTPUT_DIR/rankR/metrics.csv`` and
``trace.json``; ``--checkpoint-dir`` gets per-stage checkpoints (``pipeshift export`` turns them
into one state_dict). A dead or silent peer ends every rank within ``--timeout`` seconds with one
line naming the rank, stage, schedule action and tensor it was waiting for.

Repartitioning while training (see README.md, "Repartitioning"): ``--repartition-at STEP:PLAN``
switches at a fixed step, ``--master HOST:PORT`` takes operators' ``pipeshift ctl`` commands and
the master's policy, ``--policy auto`` runs the policy in-process on rank 0. ``--slowdown`` is an
experiment flag: it emulates a slower worker through the runtime's hook points
(:mod:`pipeshift.testing.slowdown`). After a resize every rank exits with 75 and is restarted (``pipeshift
launch --local N --elastic``, or torchrun) with ``--resume``, which re-plans for the new number
of ranks.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import socket
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipeshift.errors import PipeshiftError
from pipeshift.runtime.control import Connect
from pipeshift.runtime.hooks import Hooks
from pipeshift.schedule.registry import SCHEDULES
from pipeshift.runspec import add_data_arguments, add_loss_arguments, with_data_and_loss
from pipeshift.spec import parse_model_args

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import ModuleType

    from pipeshift.runtime.distributed import DistInfo
    from pipeshift.runtime.job import JobOptions
    from pipeshift.runtime.local import LocalBuild, MemoryCheck
    from pipeshift.runtime.memory import StageMemory
    from pipeshift.runtime.package import StagePackage
    from pipeshift.runtime.pipeline import Pipeline

# per-process settings that may legitimately differ between ranks
_LOCAL_ARGS = ("command", "rank", "world_size", "dist_addr", "package", "no_progress", "threads", "device",
               "backend", "output_dir", "timeout", "no_malloc_tuning", "master_token_file", "graph", "iface",
               "repartition_at")
READY_ENV = "PIPESHIFT_READY_DIR"
_SCHEDULER_ALIASES = {"step": "StepLR", "cosine": "CosineAnnealingLR", "exponential": "ExponentialLR",
                      "linear": "LinearLR", "multistep": "MultiStepLR", "constant": "ConstantLR"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("package", help="stage package directory (pipeshift codegen's output)")
    g = p.add_argument_group("pipeline")
    g.add_argument("--schedule", choices=SCHEDULES, default="flush",
                   help="flush (PipeDream-Flush), gpipe, 1f1b (PipeDream, weight stashing), 2bw (PipeDream-2BW)")
    g.add_argument("--microbatches", "-m", type=int, default=None,
                   help="microbatches per minibatch (default: 2 x stages)")
    g.add_argument("--batch-size", "-b", type=int, default=None,
                   help="samples per microbatch (default: the plan's profiled batch size)")
    g.add_argument("--steps", type=int, default=10, help="minibatches to train (total, counting resumed ones)")
    g.add_argument("--sync-every", type=int, default=0,
                   help="1f1b/2bw: drain the pipeline every K minibatches (0: only where needed)")
    g = p.add_argument_group("optimization")
    g.add_argument("--optimizer", default="sgd",
                   help="sgd, adam, adamw, or any torch.optim class name (adam and adamw use torch's fused step "
                        "where it applies: no per-parameter temporaries; --optim-arg fused=False for the default)")
    g.add_argument("--lr", type=float, default=0.01)
    g.add_argument("--momentum", type=float, default=None)
    g.add_argument("--weight-decay", type=float, default=None)
    g.add_argument("--optim-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="further optimizer keyword, e.g. betas=(0.9,0.95)")
    g.add_argument("--lr-scheduler", default="none",
                   help="none, step, cosine, exponential, linear, or a torch.optim.lr_scheduler class name "
                        "(stepped once per minibatch)")
    g.add_argument("--lr-scheduler-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="scheduler keyword, e.g. step_size=10")
    g.add_argument("--seed", type=int, default=0, help="seed of the data stream and of dropout")
    g.add_argument("--init-from", default=None, metavar="PATH",
                   help="initial weights: a .safetensors file, a sharded safetensors directory (its "
                        "model.safetensors.index.json), a pipeshift checkpoint or a .pt state_dict; each rank "
                        "reads only its own stages' tensors (default: per-module initialisation from the "
                        "model spec's seed)")
    g.add_argument("--allow-nonfinite-loss", action="store_true",
                   help="train on when the loss is NaN or infinite (default: stop, naming the step and stage)")
    add_data_arguments(p)
    add_loss_arguments(p)
    g = p.add_argument_group("evaluation, checkpoints and outputs")
    g.add_argument("--eval-steps", type=int, default=0, help="forward-only minibatches of the val split")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every K steps (default: at the end)")
    g.add_argument("--checkpoint-dir", default=None)
    g.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every K steps (always at the end)")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --checkpoint-dir")
    g.add_argument("--output-dir", default="pipeshift_run", help="where rankR/metrics.csv and trace.json go")
    g.add_argument("--trace-steps", type=int, default=20, help="trace the first K steps (0: none)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("processes")
    g.add_argument("--rank", type=int, default=None, help="explicit launch: this process's rank")
    g.add_argument("--world-size", type=int, default=None, help="explicit launch: number of ranks")
    g.add_argument("--dist-addr", default=None, help="explicit launch: HOST:PORT where rank 0 listens")
    g.add_argument("--backend", default="auto", help="auto (nccl on GPUs, gloo on CPUs), gloo or nccl")
    g.add_argument("--iface", default=None, metavar="NAME",
                   help="network interface for gloo/NCCL (default: the one that routes to --dist-addr or "
                        "MASTER_ADDR, unless GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME are set)")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--memory-size", type=float, default=None, metavar="BYTES",
                   help="memory per worker: a plan with a stage predicted above it is refused before any rank "
                        "allocates (default: the limit the plan was made with, if any)")
    g.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for a peer before giving up (default 60)")
    g.add_argument("--threads", type=int, default=None, help="torch intra-op threads per rank")
    g.add_argument("--no-malloc-tuning", action="store_true",
                   help="leave glibc malloc as it is (default: keep freed memory for reuse, see runtime/allocator.py)")
    g = p.add_argument_group("repartitioning while training (needs a package written by `pipeshift codegen`)")
    g.add_argument("--repartition-at", action="append", default=[], metavar="STEP:PLAN",
                   help="switch to PLAN (a plan.json) at the synchronisation point after step STEP; repeatable")
    g.add_argument("--master", default=os.environ.get("PIPESHIFT_MASTER") or None, metavar="HOST:PORT",
                   help="report to this `pipeshift master` and take its repartition/resize commands "
                        "(default $PIPESHIFT_MASTER: under bare torchrun, which would take --master for its own "
                        "--master-addr, set that instead)")
    g.add_argument("--master-token-file", default=None, metavar="FILE",
                   help="file holding the master's token (default $PIPESHIFT_TOKEN)")
    g.add_argument("--report-every", type=int, default=10, metavar="K",
                   help="control tick: measure, report and decide every K minibatches (a drained sync point "
                        "for 1f1b/2bw; default %(default)s)")
    g.add_argument("--policy", choices=["off", "auto"], default="off",
                   help="auto: run the repartitioning policy in-process on rank 0 (needs the profiled graph)")
    g.add_argument("--policy-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="policy setting, e.g. threshold=0.2, persist_windows=2, fixed_pause_s=0.1")
    g.add_argument("--graph", default=None, metavar="GRAPH_TXT",
                   help="the profiled graph.txt, for --policy auto and re-planning after a resize "
                        "(default: the plan's 'graph')")
    g.add_argument("--slowdown", action="append", default=[], metavar="RANK:FACTOR[@STEP]",
                   help="experiment: from step STEP on, rank RANK's forward/backward take FACTOR times as long "
                        "(it sleeps (FACTOR-1) x the measured time); repeatable, FACTOR 1 ends it")


def run(args: argparse.Namespace, connect: Connect | None = None,
        make_hooks: Callable[[int], Hooks] | None = None) -> int:
    """Train this rank. The command (:mod:`pipeshift.launch.train`) wires in ``connect``, which reaches
    the master for ``--master``, and ``make_hooks``, the rank's experiment and test hooks."""
    _check_numbers(args)
    if not args.no_malloc_tuning:
        from pipeshift.runtime.allocator import keep_freed_memory

        keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    from pipeshift.jsonfile import read_json_object
    from pipeshift.runtime.distributed import init_distributed
    from pipeshift.runtime.package import parse_conf

    # the rank's experiment and test hooks, first: some act before the process group exists
    hooks = make_hooks(args.rank if args.rank is not None else int(os.environ.get("RANK", "0") or 0)) \
        if make_hooks is not None else Hooks()
    hooks.starting()

    # Before the group exists a mistake is an ordinary error; afterwards every rank must exit
    # even if peers are stuck, so errors end the process directly (see _exit).
    expected = None
    try:
        conf = Path(args.package) / "conf.json"
        expected = sum(len(r) for r in parse_conf(read_json_object(conf, "conf.json of the stage package"), conf)[1].values())
    except PipeshiftError:
        pass  # reported by the start-up agreement, on every rank
    info = init_distributed(rank=args.rank, world_size=args.world_size, dist_addr=args.dist_addr,
                            backend=args.backend, device=args.device, timeout_s=args.timeout,
                            expected_world=expected, iface=args.iface)
    try:
        return _train(args, info, connect, hooks)
    except PipeshiftError as e:
        from pipeshift.runtime.failure import explain

        from pipeshift.runtime.comm import PeerError

        said = (explain(info.rank, str(e), witness=True, peer=e.peer, silent=e.silent, timeout_s=args.timeout)
                if isinstance(e, PeerError) else explain(info.rank, str(e), witness=False))
        _exit(f"pipeshift train: error: {said}", 1)
    except KeyboardInterrupt:
        _exit("pipeshift train: interrupted", 130)
    except BaseException:
        traceback.print_exc()
        _exit(f"pipeshift train: internal error on rank {info.rank} (a pipeshift bug; traceback above)", 1)
    return 1


def _exit(message: str, code: int) -> None:
    """Print one line and leave now: a process group with a dead peer can hang a normal exit."""
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)
    os._exit(code)


def _check_numbers(args: argparse.Namespace) -> None:
    for name in ("steps", "eval_steps", "eval_every", "checkpoint_every", "trace_steps", "sync_every"):
        if getattr(args, name) < 0:
            raise PipeshiftError(f"--{name.replace('_', '-')} must be >= 0")
    for name in ("microbatches", "batch_size", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise PipeshiftError(f"--{name.replace('_', '-')} must be >= 1")
    if not args.timeout > 0 or not math.isfinite(args.timeout):
        raise PipeshiftError("--timeout must be a positive number of seconds")
    for name in ("lr", "momentum", "weight_decay"):
        v = getattr(args, name)
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise PipeshiftError(f"--{name.replace('_', '-')} {v}: expected a finite number >= 0")
    if args.resume and not args.checkpoint_dir:
        raise PipeshiftError("--resume needs --checkpoint-dir")
    if args.report_every < 0:
        raise PipeshiftError("--report-every must be >= 0")


def job_options(args: argparse.Namespace) -> JobOptions:
    """The flags that say what may repartition the job and how it restarts."""
    from pipeshift.runtime.job import JobOptions, optimizer_state_kind

    return JobOptions(repartition_at=tuple(args.repartition_at), master=args.master, policy=args.policy,
                      policy_args=tuple(args.policy_arg), report_every=args.report_every,
                      checkpoint_dir=args.checkpoint_dir, resume=args.resume, graph=args.graph,
                      init_from=args.init_from, optimizer_state=optimizer_state_kind(str(args.optimizer), args.momentum))


def _train(args: argparse.Namespace, info: DistInfo, connect: Connect | None,
           hooks: Hooks) -> int:
    from pipeshift.runtime.comm import Communicator
    from pipeshift.runtime.metrics import Tracer
    from pipeshift.runtime.package import load_stage_package
    from pipeshift.runtime.pipeline import Pipeline
    from pipeshift.runtime.tp import describe_sharding
    from pipeshift.runtime.trainer import TrainConfig, Trainer, agree, check_partition

    from pipeshift.runtime.job import prepare_job
    from pipeshift.runtime.restart import EXIT_REGROUP

    from pipeshift.runtime.allocator import resident_bytes

    baseline = resident_bytes()  # torch imported, nothing built: what the runtime costs before the model
    # Load everything, but report a local failure through the agreement so every rank says it.
    error, pkg, bundle, entries, config, job = None, None, None, None, {}, None
    try:
        pkg = load_stage_package(args.package)
        optimizer = optimizer_factory(args)
        scheduler = scheduler_factory(args)
        what = pkg.spec.callable if pkg.spec is not None else str(pkg.path)
        # nothing allocated: this rank materialises only its stages
        bundle = with_data_and_loss(pkg.bundle(weights=False), args, what, announce=info.rank == 0)
        if args.init_from is None and bundle.init_from is not None:
            args.init_from = bundle.init_from  # weights that come with the model (a Hugging Face directory's)
        microbatches = args.microbatches or 2 * pkg.num_stages
        batch_size = args.batch_size or pkg.batch_size or 32
        job = prepare_job(job_options(args), pkg, bundle, info.rank, info.world_size, connect, hooks,
                          memory=_memory_check(args, pkg, microbatches, batch_size))
        entries = job.entries
        torch.manual_seed(args.seed)  # dropout's stream, whichever way the stages were built
        config = {"package": pkg.digest(), "conf": {"module_to_stage_map": pkg.module_to_stage,
                                                    "stage_to_rank_map": {str(k): v for k, v in pkg.stage_to_rank.items()}},
                  "world_size": info.world_size, "backend": info.backend,
                  **{k: v for k, v in vars(args).items() if k not in _LOCAL_ARGS},
                  "microbatches": microbatches, "batch_size": batch_size, **job.agreed}
    except PipeshiftError as e:
        error = str(e)
    comm = Communicator(info.rank, stage_of=lambda r: _stage_of(pkg, r), tags={}, device=info.device,
                        timeout_s=args.timeout)
    hosts = agree(comm, info.rank, config, error, info=socket.gethostname())
    ready = os.environ.get(READY_ENV)
    if ready:  # tell a supervisor that this rank is past start-up (a death from here on is not one)
        Path(ready, f"rank{info.rank}").touch()
    _set_threads(args, info, hosts)
    # agree() raised on every rank if any rank failed above
    assert pkg is not None and bundle is not None and job is not None and entries is not None
    assert bundle.data is not None  # with_data_and_loss gave it one, or failed above

    cfg = TrainConfig(schedule=args.schedule, microbatches=microbatches, batch_size=batch_size, steps=args.steps,
                      seed=args.seed, eval_steps=args.eval_steps, eval_every=args.eval_every,
                      checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                      resume=args.resume, output_dir=args.output_dir, trace_steps=args.trace_steps,
                      progress=not args.no_progress, sync_every=args.sync_every,
                      stop_on_nonfinite_loss=not args.allow_nonfinite_loss)
    tracer = Tracer(info.rank, enabled=cfg.trace_steps > 0)
    if job.note and info.rank == 0:
        print(f"pipeshift train: {job.note}", file=sys.stderr, flush=True)
    # the package's TP layout holds for the package's own partition (a re-plan has none)
    tp_degrees = pkg.tp_degrees if job.stage_ranks is None else {}
    check_partition(job.stage_ranks or pkg.stage_to_rank, cfg, tp_degrees)
    model_keys = {k for module, _, _ in entries[:-1] for k in module.state_dict()}
    pipeline = Pipeline(info.rank, entries, job.module_to_stage or pkg.module_to_stage,
                        job.stage_ranks or pkg.stage_to_rank, schedule=cfg.schedule,
                        microbatches=cfg.microbatches, optimizer=optimizer, lr_scheduler=scheduler,
                        device=info.device, timeout_s=args.timeout, tracer=tracer,
                        source=job.source or str(pkg.path / "conf.json"), hooks=hooks, tp_degrees=tp_degrees,
                        tp_plan=pkg.tp_plan, ties=pkg.ties if job.ties is None else job.ties)
    if pipeline.tp is not None and pipeline.tp.is_leader and pipeline.replica == 0:
        print(f"pipeshift train: {describe_sharding(pipeline)}", file=sys.stderr, flush=True)
    del entries  # other stages' modules are not needed on this rank (a repartitioner keeps the full model)
    job.entries = None
    if job.local is not None:
        job.local.entries = []  # the pipeline holds its stage; a layer given away later must be freeable
    controller = job.controller(cfg.steps, cfg.output_dir)
    trainer = Trainer(pipeline, cfg, data=bundle.data, controller=controller, meta={
        "package": str(pkg.path), "model": pkg.spec.to_json() if pkg.spec else None,
        "world_size": info.world_size,
    })
    trainer.model_keys = model_keys
    if job.local is not None:
        _record_weights(trainer.out_dir / "weights.json", job.local, args.init_from, pkg)
        trainer.predicted_memory = {m.stage: m.predicted_bytes for m in job.local.memory or []}
    try:
        trainer.fit()
    finally:
        if controller is not None:
            controller.close()
    pipeline.comm.barrier("finishing")
    if job.local is not None and job.local.memory:
        _record_memory(trainer.out_dir / "memory.json", job.local.memory, pipeline, baseline)
    if trainer.reporter and not trainer.regroup:
        print(f"rank {info.rank}: {trainer.summary()}", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    _destroy()
    return EXIT_REGROUP if trainer.regroup else 0


def _memory_check(args: argparse.Namespace, pkg: StagePackage, microbatches: int, batch_size: int) -> MemoryCheck:
    """What every rank needs to price every stage before allocating; the limit from --memory-size or the plan."""
    from pipeshift.runtime.job import optimizer_state_kind
    from pipeshift.runtime.local import MemoryCheck
    from pipeshift.runtime.memory import OPTIMIZER_STATES

    limit, source = args.memory_size, "--memory-size"
    memory = pkg.plan_doc.get("memory")
    planned: dict[str, Any] = memory if isinstance(memory, dict) else {}
    if limit is None and isinstance(planned.get("limit_bytes"), (int, float)) and planned["limit_bytes"] > 0:
        limit, source = float(planned["limit_bytes"]), f"the plan's memory limit ({pkg.path / 'plan.json'})"
    return MemoryCheck(schedule=args.schedule, microbatches=microbatches,
                       optimizer_states=OPTIMIZER_STATES.get(optimizer_state_kind(str(args.optimizer), args.momentum), 2.0),
                       batch_scale=batch_size / (pkg.batch_size or batch_size), limit=limit, limit_source=source)


def _record_memory(path: Path, priced: Sequence[StageMemory], pipeline: Pipeline, baseline: int) -> None:
    """``rankR/memory.json``: this rank's predicted memory against its measured peak."""
    import json

    from pipeshift.runtime.memory import peak_bytes

    mine = next((m for m in priced if m.stage == pipeline.stage_id), None)
    record = {"stage": pipeline.stage_id, "peak_bytes": peak_bytes(pipeline.device), "baseline_rss_bytes": baseline,
              "predicted": mine.to_json() if mine else None, "stages": [m.to_json() for m in priced]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")


def _record_weights(path: Path, local: LocalBuild, init_from: str | None, pkg: StagePackage) -> None:
    """``rankR/weights.json``: where this rank's initial weights came from and which tensors it holds and read."""
    import json

    record = {"init": "file" if init_from else "seed", "init_from": init_from,
              "seed": pkg.spec.seed if pkg.spec else None, "held": local.held, "read": local.loaded}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")


def _set_threads(args: argparse.Namespace, info: DistInfo, hosts: list[str]) -> None:
    """Share this machine's cores among the ranks on it, unless told otherwise.

    Several ranks each using every core (torch's default) slow each other down many times over.
    """
    if args.threads or "OMP_NUM_THREADS" in os.environ or info.device.type != "cpu":
        return
    here = max(1, hosts.count(hosts[info.rank]))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // here))


def _stage_of(pkg: StagePackage | None, rank: int) -> int:
    if pkg is None:
        raise PipeshiftError("unknown")
    for s, ranks in pkg.stage_to_rank.items():
        if rank in ranks:
            return int(s)
    raise PipeshiftError("unknown")


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _find_class(module: ModuleType, name: str, base: type) -> type:
    wanted = name.replace("_", "").lower()
    for attr in dir(module):
        obj = getattr(module, attr)
        if isinstance(obj, type) and issubclass(obj, base) and obj is not base and attr.lower() == wanted:
            return obj
    choices = sorted(a for a in dir(module) if isinstance(getattr(module, a), type)
                     and issubclass(getattr(module, a), base) and getattr(module, a) is not base
                     and not a.startswith("_"))
    raise PipeshiftError(f"{name!r} is not in {module.__name__}: one of {', '.join(choices)}")


def optimizer_factory(args: argparse.Namespace) -> Callable[[Any], torch.optim.Optimizer]:
    """``params -> optimizer`` from the command line; checked once here on a dummy parameter."""
    cls = _find_class(torch.optim, args.optimizer, torch.optim.Optimizer)
    kwargs: dict[str, Any] = {"lr": args.lr, **parse_model_args(args.optim_arg)}
    accepted = inspect.signature(cls).parameters
    for flag in ("momentum", "weight_decay"):
        value = getattr(args, flag)
        if value is not None:
            if flag not in accepted:
                raise PipeshiftError(f"--{flag.replace('_', '-')}: {cls.__name__} has no {flag}")
            kwargs[flag] = value
    try:
        cls([torch.nn.Parameter(torch.zeros(1))], **kwargs)
    except (TypeError, ValueError) as e:
        raise PipeshiftError(f"{cls.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}): {e}") from None
    if cls not in _FUSED_BY_DEFAULT or {"fused", "foreach", "differentiable"} & set(kwargs):
        return lambda params: cls(params, **kwargs)
    return lambda params: cls(params, **{**kwargs, **({"fused": True} if _fusable(params) else {})})


# The per-parameter ("single tensor") step of Adam and AdamW, torch's default on CPU, allocates two
# temporaries the size of each parameter (the square root of the second moment, then its quotient);
# for a 206 MB vocabulary matrix that is 412 MB above the training state, at every step. Their
# fused kernels update in place. Weights agree with the default step to rounding.
_FUSED_BY_DEFAULT = (torch.optim.Adam, torch.optim.AdamW)


def _fusable(params: list[torch.nn.Parameter]) -> bool:
    """Whether torch's fused Adam kernel takes these parameters: plain floating-point tensors on CPU or CUDA."""
    return bool(params) and all(type(p) in (torch.Tensor, torch.nn.Parameter) and p.is_floating_point()
                                and p.device.type in ("cpu", "cuda") for p in params)


def scheduler_factory(args: argparse.Namespace) -> Callable[[torch.optim.Optimizer], Any] | None:
    name = args.lr_scheduler
    if name in ("none", "", None):
        if args.lr_scheduler_arg:
            raise PipeshiftError("--lr-scheduler-arg given without --lr-scheduler")
        return None
    cls = _find_class(torch.optim.lr_scheduler, _SCHEDULER_ALIASES.get(name, name), torch.optim.lr_scheduler.LRScheduler)
    kwargs = parse_model_args(args.lr_scheduler_arg)
    try:
        cls(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), **kwargs)
    except (TypeError, ValueError, KeyError) as e:
        raise PipeshiftError(f"{cls.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}): {e}") from None
    return lambda opt: cls(opt, **kwargs)
