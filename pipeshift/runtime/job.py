"""Setting a rank's job up from the command line: the partition it starts on and what may move it.

:func:`prepare_job` runs before the start-up agreement (so an error here reaches every rank): it
reads the forced switches' plans (:class:`JobOptions` holds what the command line asked for),
picks the plan in force (the package's, or after a restart the
checkpoint's, see :mod:`pipeshift.runtime.restart`), builds this rank's stages, the
repartitioner and the policy, and connects to the master through the control plane the command
wired in. :meth:`Job.controller` then gives the trainer its :class:`~pipeshift.runtime.elastic.Controller`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from pipeshift.errors import PipeshiftError
from pipeshift.plan import Plan, read_plan
from pipeshift.runtime.control import Connect, ControlPlane
from pipeshift.runtime.elastic import ControlConfig, Controller, ForcedSwitch
from pipeshift.runtime.hooks import Hooks
from pipeshift.runtime.local import LocalBuild, MemoryCheck, local_entries
from pipeshift.runtime.package import StagePackage
from pipeshift.runtime.repartition import Repartitioner
from pipeshift.runtime.restart import find_graph, load_chain, resume_plan
from pipeshift.runtime.stage import StageEntry

if TYPE_CHECKING:
    from pipeshift.runtime.policy import PolicyConfig
    from pipeshift.spec import ModelBundle


# -- options ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class JobOptions:
    """What the command asks of a job besides training itself: what may repartition it, and how
    it restarts. ``pipeshift train`` fills it from its flags; a test or another front end directly."""

    repartition_at: Sequence[str] = ()  # "STEP:PLAN" items (--repartition-at)
    master: str | None = None  # HOST:PORT of the control-plane master (--master)
    policy: str = "off"  # "off" or "auto" (--policy)
    policy_args: Sequence[str] = ()  # KEY=VALUE settings of the policy (--policy-arg)
    report_every: int = 10  # the control tick, in minibatches (--report-every)
    checkpoint_dir: str | None = None
    resume: bool = False
    graph: str | None = None  # the profiled graph.txt, when the plan's 'graph' does not resolve
    init_from: str | None = None  # weights to start from
    optimizer_state: str = "adam"  # what the optimizer keeps per parameter: sgd, momentum, adam, adamw

    @property
    def may_repartition(self) -> bool:
        return bool(self.repartition_at or self.master or self.policy == "auto")


def optimizer_state_kind(optimizer: str, momentum: float | None) -> str:
    """The optimizer's per-parameter state as the planner's memory model names it."""
    name = optimizer.lower()
    if name in ("adam", "adamw"):
        return name
    if name == "sgd":
        return "momentum" if momentum else "sgd"
    return "adam"  # unknown optimizers: assume two state tensors per parameter


def parse_repartition_at(values: Sequence[str]) -> list[ForcedSwitch]:
    out = []
    for index, text in enumerate(values or []):
        step, sep, path = text.partition(":")
        if not sep or not step.strip().isdigit() or not path:
            raise PipeshiftError(f"--repartition-at {text!r}: expected STEP:PLAN_JSON, e.g. 20:plan3/plan.json")
        out.append(ForcedSwitch(index, int(step), path, read_plan(path)))
    return sorted(out, key=lambda f: (f.step, f.index))


def plans_digest(plans: Sequence[Plan]) -> str:
    h = hashlib.sha256()
    for plan in plans:
        h.update(json.dumps(plan.to_json(), sort_keys=True).encode())
    return h.hexdigest()


# -- setting a job up -----------------------------------------------------------------------------


def policy_config(items: Sequence[str]) -> PolicyConfig:
    from pipeshift.runtime.policy import PolicyConfig
    from pipeshift.spec import parse_model_args

    known = {f.name for f in dataclasses.fields(PolicyConfig)}
    values = parse_model_args(items)
    unknown = sorted(set(values) - known)
    if unknown:
        raise PipeshiftError(f"--policy-arg: unknown setting(s) {unknown}; known: {', '.join(sorted(known))}")
    try:
        return PolicyConfig(**values)
    except TypeError as e:
        raise PipeshiftError(f"--policy-arg: {e}") from None


@dataclasses.dataclass
class Job:
    """How this rank starts: its module list, the partition, and what drives repartitioning."""

    entries: list[StageEntry] | None
    rank: int
    world_size: int
    options: JobOptions
    repartitioner: Repartitioner | None = None
    module_to_stage: list[int] | None = None
    stage_ranks: list[list[int]] | None = None
    source: str | None = None
    ties: list[dict[str, list[int]]] | None = None  # None: the package's conf.json
    note: str = ""
    agreed: dict[str, Any] = dataclasses.field(default_factory=dict)
    forced: list[ForcedSwitch] = dataclasses.field(default_factory=list)
    master: ControlPlane | None = None
    connect: Connect | None = None  # how to reach the master (``--master``)
    policy: Any = None
    chain: Any = None
    local: LocalBuild | None = None  # which tensors this rank materialised, and read from --init-from

    def controller(self, steps: int, output_dir: str | Path) -> Controller | None:
        opts = self.options
        if not (self.repartitioner or opts.may_repartition):
            return None  # nothing to decide, and the package's own partition: checkpoints need no plan
        config = ControlConfig(report_every=opts.report_every, policy=opts.policy, master=bool(opts.master),
                               total_steps=steps, output_dir=Path(output_dir))
        return Controller(self.rank, self.world_size, self.repartitioner, config, forced=self.forced,
                          master=self.master, policy=self.policy, chain=self.chain)


def prepare_job(opts: JobOptions, pkg: StagePackage, bundle: ModelBundle, rank: int, world_size: int,
                connect: Connect | None = None, hooks: Hooks | None = None, memory: MemoryCheck | None = None) -> Job:
    """Everything this rank needs before the start-up agreement (errors then reach every rank).

    The plan in force is the package's, or after a restart the checkpoint's (re-planned when the
    number of ranks changed). Stages are built over this rank's full model whenever anything may
    repartition, so a switch moves references, not copies, for the layers a rank keeps.
    """
    from pipeshift.runtime.repartition import Partition

    job = Job(entries=None, rank=rank, world_size=world_size, options=opts, connect=connect)
    job.forced = parse_repartition_at(opts.repartition_at)
    wants = opts.may_repartition
    if job.forced:
        job.agreed["repartition_plans"] = plans_digest([f.plan for f in job.forced])
    base = pkg.plan
    chain = None
    if base is not None and (opts.policy == "auto" or opts.resume):
        chain = load_chain(find_graph(base, pkg.path, opts.graph), opts.optimizer_state)
    plan, job.note = resume_plan(opts.checkpoint_dir if opts.resume else None, world_size, base, chain)
    if plan is not None:
        _same_model(plan, pkg, "the checkpoint's plan.json")
    if bundle.criterion is None:
        raise PipeshiftError(f"{pkg.path}: the model has no loss to train with (pass --loss)")
    criterion = bundle.criterion()
    if plan is None and not wants:
        if memory is not None:
            memory = dataclasses.replace(memory, stage_ranks=[pkg.stage_to_rank[k] for k in sorted(pkg.stage_to_rank)],
                                         plan_stages=_plan_stages(pkg.plan_doc))
        job.local = package_entries(pkg, bundle.model, criterion, rank, opts.init_from, memory)
        job.entries = job.local.entries
        return _connect(job, None)
    if base is None:
        raise PipeshiftError(f"{pkg.path}: repartitioning needs a stage package written by `pipeshift codegen` "
                             "(its plan.json lists the stages)")
    from pipeshift.codegen import build_stages, capture_model, render_package

    full = bundle.model
    # Capture the model's graph now rather than at the first switch: it builds a fresh copy of
    # the model (on meta) and traces it, which would otherwise lengthen the first pause.
    model_capture = capture_model(plan or base, weights=False)
    if plan is None:
        plan = base
        adopts = pkg.adopts

        def make(model: nn.Module) -> list[StageEntry]:
            # a package that cannot adopt builds its own model; a switch copies its values in
            return (pkg.adopting(model) if adopts else pkg).entries(criterion)
    else:
        inputs = render_package(plan, model_capture).layout.criterion_inputs

        def make(model: nn.Module) -> list[StageEntry]:
            return [*build_stages(plan, model, model_capture=model_capture), (criterion, inputs, ["loss"])]
        job.source = "the checkpoint's plan.json"
    stage_ranks = plan.stage_ranks
    # Only this rank's stages are real; a switch installs the layers it receives and frees those it gives.
    mine = [k for k, ranks in enumerate(stage_ranks) if rank in ranks]
    if memory is not None:
        memory = dataclasses.replace(memory, stage_ranks=stage_ranks, plan_stages=plan.to_json()["stages"])
    job.local = local_entries(make, full, list(range(len(stage_ranks))) + [len(stage_ranks) - 1], mine,
                              seed=pkg.spec.seed if pkg.spec else 0, init_from=opts.init_from,
                              who=f"rank {rank} (stage {', '.join(map(str, mine))})", memory=memory)
    job.entries = job.local.entries
    if job.source is not None:  # not the package's partition: its ties are not conf.json's
        from pipeshift.codegen.partition import find_ties

        job.ties = find_ties([m for m, _, _ in job.entries[:-1]])
    job.stage_ranks = stage_ranks
    job.module_to_stage = list(range(len(stage_ranks))) + [len(stage_ranks) - 1]
    partition = Partition.of(plan, [m for m, _, _ in job.entries[:-1]])
    job.repartitioner = Repartitioner(rank, full, job.entries[-1], partition, model_capture, hooks=hooks)
    job.agreed["start_plan"] = hashlib.sha256(json.dumps(plan.to_json()["stages"], sort_keys=True).encode()).hexdigest()
    if opts.policy == "auto":
        if chain is None:
            raise PipeshiftError("--policy auto needs the profiled graph.txt: pass --graph (the plan's "
                                 f"'graph' {base.graph!r} was not found)")
        from pipeshift.runtime.policy_driver import PolicyDriver

        job.chain = chain
        job.policy = PolicyDriver(plan, chain, policy_config(opts.policy_args))
    elif chain is not None:
        job.chain = chain
    return _connect(job, plan)


def _same_model(plan: Plan, pkg: StagePackage, source: str) -> None:
    """A plan read from a checkpoint is data: it may only re-split the package's own model.

    Its spec is what the stages would be built from, so a spec other than the package's would
    import and run code the user never named (and train another model besides).
    """
    from pipeshift.spec import ModelSpec

    try:
        spec = ModelSpec.from_json(plan.model)
    except PipeshiftError as e:
        raise PipeshiftError(f"{source}: {e}") from None
    if pkg.spec is None or spec != pkg.spec:
        raise PipeshiftError(f"{source} names the model {spec.callable} (seed {spec.seed}), not the package's "
                             f"{pkg.spec.callable if pkg.spec else 'unknown'} model; refusing to run it")


def _plan_stages(plan: Mapping[str, Any] | None) -> list[Mapping[str, Any]] | None:
    stages = plan.get("stages") if isinstance(plan, Mapping) else None
    return [st for st in stages if isinstance(st, Mapping)] if isinstance(stages, list) else None


def package_entries(pkg: StagePackage, model: nn.Module, criterion: nn.Module, rank: int, init_from: str | None,
                    memory: MemoryCheck | None = None) -> LocalBuild:
    """The package's entries with only this rank's stages' tensors real (see :mod:`pipeshift.runtime.local`).

    A hand-written package whose ``model(criterion)`` cannot adopt from a given model builds its
    own whole model; weights from ``init_from`` are then loaded into this rank's stages only.
    """
    from pipeshift.runtime.local import price_stages, stage_tensor_names

    stages = [s for s, ranks in pkg.stage_to_rank.items() if rank in ranks]
    who = f"rank {rank} (stage {', '.join(map(str, stages))})"
    if pkg.adopts:
        def make(m: nn.Module) -> list[StageEntry]:
            return pkg.adopting(m).entries(criterion)

        return local_entries(make, model, pkg.module_to_stage, stages, seed=pkg.spec.seed if pkg.spec else 0,
                             init_from=init_from, who=who, memory=memory)
    entries = pkg.entries(criterion)
    held: list[str] = []
    loaded: list[str] = []
    for i, (module, _, _) in enumerate(entries[:-1]):
        if pkg.module_to_stage[i] in stages:
            state = module.state_dict(keep_vars=True)
            mine = sorted(set(state) & stage_tensor_names(module))
            held += mine
            if init_from is not None:
                from pipeshift.weights import load_into, open_weights

                loaded += load_into(state, open_weights(init_from), mine, who=who)
    priced = price_stages(entries, pkg.module_to_stage, memory) if memory is not None else None
    return LocalBuild(entries, held, loaded, priced)


def _connect(job: Job, plan: Plan | None) -> Job:
    """Register with the master (every rank), through the control plane the command wired in."""
    if not job.options.master:
        return job
    if job.connect is None:
        raise PipeshiftError("--master: this command has no control-plane client (run `pipeshift train`)")
    stage = plan.stage_of_rank(job.rank) if plan is not None else 0
    job.master = job.connect(job.rank, stage)
    return job
