"""Several models behind one server: ``pipeshift serve --model NAME=STAGES[:WEIGHTS] … --local N``.

Every model is a stage package whose ``conf.json`` places its stages on ranks of the same job
(they may use all ranks or some). On each rank, for each model with a stage there, the stage is
built as a single-model server builds it (only this rank's tensors real: the seed's
initialisation or WEIGHTS, anything ``--init-from`` takes) and handed to a
:class:`~pipeshift.serve.residency.Shard`, which keeps it offloaded until the front end swaps it
in. One loop per rank (:class:`ModelsWorker`) takes the control stream in order — a batch of
model M, load M, evict M, ping, stop — so swaps and batches of every model interleave exactly as
the front end (:class:`~pipeshift.serve.scheduler.MultiFrontend`) decided, while swap-ins run on
the rank's loader thread.

HTTP: ``POST /v1/models/NAME/predict``, or ``POST /v1/predict`` / ``/v1/completions`` with
``"model": NAME`` in the JSON body (OpenAI-style; safetensors bodies use the path or
``?model=NAME``); ``GET /v1/models`` lists every model with its state (resident, loading,
offloaded), bytes per rank, last use and each rank's last swap-in (seconds, and the tensors and
files it read), plus the recent scheduling decisions.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pipeshift.errors import PipeshiftError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pipeshift.serve.residency import SWAP_FROM
    from pipeshift.serve.scheduler import SWAP_IN_MODES

    g = p.add_argument_group("several models (instead of the PACKAGE argument)")
    g.add_argument("--model", action="append", default=[], metavar="NAME=STAGES[:WEIGHTS]",
                   help="serve the stage package STAGES as NAME, weights from WEIGHTS (anything --init-from takes); "
                        "repeatable")
    g.add_argument("--max-loaded", type=int, default=None, metavar="K",
                   help="models resident at once at most (default: all)")
    g.add_argument("--device-memory", type=int, default=None, metavar="BYTES",
                   help="per rank: bytes of resident model tensors at most (default: the device's memory; on CPU "
                        "the machine's memory shared by its ranks)")
    g.add_argument("--swap-from", choices=SWAP_FROM, default="host",
                   help="where an offloaded shard comes back from: a host-memory copy made at start-up (pinned on "
                        "CUDA), or the WEIGHTS safetensors files, read again (default %(default)s)")
    g.add_argument("--swap-in", choices=SWAP_IN_MODES, default="pipelined",
                   help="pipelined: a model's batches start while it loads, each stage as soon as its own shard is "
                        "in; whole: wait until every rank has loaded (default %(default)s)")
    g.add_argument("--max-swaps-in-a-row", type=int, default=2, metavar="N",
                   help="after N swaps with no batch of an already resident model, a batch of a resident model "
                        "with waiting requests goes before the next swap (default %(default)s)")


def parse_models(values: list[str]) -> list[tuple[str, str, str | None]]:
    """``NAME=STAGES[:WEIGHTS]`` items, checked: names unique and URL-safe, directories present."""
    out: list[tuple[str, str, str | None]] = []
    for text in values:
        name, sep, rest = text.partition("=")
        if not sep or not rest:
            raise PipeshiftError(f"--model {text!r}: expected NAME=STAGES[:WEIGHTS]")
        if not _NAME.match(name):
            raise PipeshiftError(f"--model {text!r}: a name is letters, digits, '.', '_' or '-' (at most 64)")
        stages, _, weights = rest.partition(":")
        if any(n == name for n, _, _ in out):
            raise PipeshiftError(f"--model {text!r}: the name {name} is given twice")
        if not Path(stages).is_dir():
            raise PipeshiftError(f"--model {text!r}: {stages} is not a stage package directory")
        if weights and not Path(weights).exists():
            raise PipeshiftError(f"--model {text!r}: weights {weights}: no such file or directory")
        out.append((name, stages, weights or None))
    return out


def check(args: argparse.Namespace) -> None:
    if args.package is not None and args.model:
        raise PipeshiftError("give either a PACKAGE or --model NAME=STAGES …, not both")
    if args.package is None and not args.model:
        raise PipeshiftError("nothing to serve: give a stage PACKAGE or --model NAME=STAGES[:WEIGHTS]")
    several = bool(args.model)
    for flag in ("max_loaded", "device_memory"):
        v = getattr(args, flag)
        if v is not None and (not several or v < 1):
            raise PipeshiftError(f"--{flag.replace('_', '-')} {'must be >= 1' if several else 'needs --model'}")
    if several:
        if args.allow_repartition or args.repartition_at or getattr(args, "policy", "off") != "off":
            raise PipeshiftError("repartitioning while serving works with one model: drop --allow-repartition / "
                                 "--repartition-at / --policy, or serve one PACKAGE")
        if args.init_from or args.name:
            raise PipeshiftError("with --model, weights and names go in NAME=STAGES:WEIGHTS (drop --init-from/--name)")
        if args.max_swaps_in_a_row < 1:
            raise PipeshiftError("--max-swaps-in-a-row must be >= 1")
        parse_models(args.model)


# -- one rank ---------------------------------------------------------------------------------


class ModelsWorker:
    """One rank's serving loop over several models (see the module docstring)."""

    def __init__(self, rank: int, frontend: int, link, report_link, workers: dict[str, Any],
                 shards: dict[str, Any], timeout_s: float, routing):
        from pipeshift.serve.residency import Loader

        self.rank = rank
        self.frontend = frontend
        self.link = link
        self.workers = workers  # model -> StageWorker (models with a stage on this rank)
        self.shards = shards
        self.timeout_s = timeout_s
        self.routing = routing  # the first model's (what a Frontend reads at start-up)
        self.repartitioner = None
        self._report_link = report_link
        self.loader = Loader(self._report)

    def _report(self, record) -> None:
        import dataclasses

        from pipeshift.serve import wire

        self._report_link.send(wire.Message(wire.LOADED, text=json.dumps(dataclasses.asdict(record))),
                               self.frontend, wire.SWAPS)

    def _model(self, name: str):
        from pipeshift.runtime.comm import PeerError

        if name not in self.workers:
            raise PeerError(f"rank {self.rank}: the front end named model {name!r}, which has no stage here")
        return self.workers[name], self.shards[name]

    def counters(self) -> dict[str, Any]:
        import os

        ws = list(self.workers.values())
        return {"rank": self.rank, "stage": ",".join(f"{n}:{w.stage_id}" for n, w in self.workers.items()),
                "pid": os.getpid(), "compute_s": sum(w.compute_s for w in ws), "wait_s": self.link.wait_s,
                "batches": sum(w.batches for w in ws),
                "resident": sorted(n for n, s in self.shards.items() if s.state == "resident")}

    def run(self) -> None:
        from pipeshift.runtime.comm import PeerError
        from pipeshift.serve import wire

        while True:
            msg = self.link.recv(self.frontend, wire.CTRL)
            if msg.kind == wire.BATCH:
                worker, shard = self._model(msg.text)
                shard.wait(4 * self.timeout_s)  # pipelined swap-in: this stage goes on once its shard is in
                worker.run_batch(msg.batch)
            elif msg.kind == wire.PING:
                self.link.send(wire.Message(wire.PONG, msg.batch, text=json.dumps(self.counters())),
                               self.frontend, wire.PONGS)
            elif msg.kind == wire.LOAD:
                self.loader.submit(self._model(msg.text)[1])
            elif msg.kind == wire.EVICT:
                self._model(msg.text)[1].evict()
            elif msg.kind == wire.STOP:
                self.loader.stop()
                self._report_link.flush()
                self.link.flush()
                return
            else:
                raise PeerError(f"rank {self.rank}: unexpected control message kind {msg.kind} from the front end")


def _build(name: str, stages: str, weights: str | None, rank: int):
    """One model on this rank: its package, its entries (this rank's stages real), its routing."""
    from torch import nn

    from pipeshift.runtime.job import package_entries
    from pipeshift.runtime.local import tensor_aliases
    from pipeshift.runtime.package import load_stage_package
    from pipeshift.serve.routing import build_routing

    class NoLoss(nn.Module):
        """The criterion slot of the package's module list: serving never computes a loss."""

    pkg = load_stage_package(stages)
    bundle = pkg.bundle(weights=False)
    local = package_entries(pkg, bundle.model, NoLoss(), rank, weights)
    routing = build_routing([(ins, outs) for _, ins, outs in local.entries], pkg.module_to_stage, pkg.stage_to_rank,
                            source=f"model {name}: {pkg.path / 'conf.json'}")
    if pkg.tp_degrees and rank == 0:
        # residency swaps whole per-rank copies in and out; shards of a TP group would have to move together
        print(f"pipeshift serve: note: model {name}: with several models, tensor-parallel stages are served "
              "unsharded (each rank of a TP group as a replica of the stage; outputs are the same)",
              file=sys.stderr, flush=True)
    built = SimpleNamespace(name=name, pkg=pkg, bundle=bundle, entries=local.entries, routing=routing,
                            aliases=tensor_aliases(bundle.model), weights=weights)
    built.bytes_per_rank = bytes_per_rank(built)  # now: a shard built over these tensors empties them
    return built


def bytes_per_rank(built) -> dict[int, int]:
    """The model's resident bytes on every rank holding a stage of it (from shapes: any rank can tell)."""
    from pipeshift.serve.residency import stage_bytes

    out: dict[int, int] = {}
    m2s = built.pkg.module_to_stage
    for s, ranks in built.pkg.stage_to_rank.items():
        n = stage_bytes(m for i, (m, _, _) in enumerate(built.entries[:-1]) if m2s[i] == s)
        for r in ranks:
            out[r] = out.get(r, 0) + n
    return out


def serve(args: argparse.Namespace, info) -> int:
    """A rank of a server of several models (called by :func:`pipeshift.serve.cli._serve_rank`)."""
    from pipeshift.runtime.comm import Communicator
    from pipeshift.runtime.trainer import agree
    from pipeshift.serve import wire
    from pipeshift.serve.residency import Shard, default_budget
    from pipeshift.serve.worker import StageWorker

    error, built, config = None, [], {}
    models = parse_models(args.model)
    try:
        if not 0 <= args.frontend_rank < info.world_size:
            raise PipeshiftError(f"--frontend-rank {args.frontend_rank}: the job has ranks 0..{info.world_size - 1}")
        for name, stages, weights in models:
            b = _build(name, stages, weights, info.rank)
            bad = sorted(r for ranks in b.pkg.stage_to_rank.values() for r in ranks if r >= info.world_size)
            if bad:
                raise PipeshiftError(f"model {name}: {b.pkg.path / 'conf.json'} places stages on rank {bad[0]}, "
                                     f"the job has ranks 0..{info.world_size - 1}")
            built.append(b)
        config = {"models": [(n, b.pkg.digest(), w) for (n, _, w), b in zip(models, built)],
                  "world_size": info.world_size, "frontend_rank": args.frontend_rank}
    except PipeshiftError as e:
        error = str(e)
    comm = Communicator(info.rank, stage_of=lambda r: -1, tags={}, timeout_s=args.timeout)
    import os

    local = os.environ.get("LOCAL_WORLD_SIZE", "")  # torchrun: the ranks on this machine
    here = int(local) if local.isdigit() and int(local) > 0 else info.world_size
    budget = args.device_memory or default_budget(info.device, here)
    budgets = {r: int(d["budget"]) for r, d in enumerate(agree(comm, info.rank, config, error,
                                                                info={"budget": budget}))}
    mailbox = wire.Mailbox()

    def who(rank: int) -> str:
        here = [f"{b.name} stage {b.routing.stage_of(rank)}" for b in built
                if any(rank in rs for rs in b.pkg.stage_to_rank.values())]
        return f"rank {rank} ({', '.join(here)})" if here else f"rank {rank}"

    link = wire.Link(info.rank, mailbox, args.timeout, who)
    workers, shards = {}, {}
    error = None
    try:
        for b in built:  # every rank checks every model: the same verdict everywhere, before serving
            for r, n in sorted(b.bytes_per_rank.items()):
                if n > budgets[r]:
                    raise PipeshiftError(f"model {b.name} needs {n} bytes resident on rank {r}, more than its "
                                         f"budget of {budgets[r]} bytes (--device-memory)")
        for b in built:
            if not any(info.rank in rs for rs in b.pkg.stage_to_rank.values()):
                continue
            w = StageWorker(info.rank, b.entries, b.pkg.module_to_stage, b.pkg.stage_to_rank,
                            frontend=args.frontend_rank, link=link, device=info.device, timeout_s=args.timeout,
                            source=f"model {b.name}: {b.pkg.path / 'conf.json'}")
            workers[b.name] = w
            shards[b.name] = Shard(b.name, info.rank, w.stage.modules, info.device, swap_from=args.swap_from,
                                   weights=b.weights, aliases=b.aliases)
    except PipeshiftError as e:
        error = str(e)
    agree(comm, info.rank, config, error)
    worker = ModelsWorker(info.rank, args.frontend_rank, link, wire.Link(info.rank, mailbox, args.timeout, who),
                          workers, shards, args.timeout, built[0].routing)
    if info.rank != args.frontend_rank:
        from pipeshift.serve.cli import freeze_startup_objects

        freeze_startup_objects()
        worker.run()
        return 0
    return _frontend(args, info, built, worker, mailbox, who, budgets)


def _frontend(args, info, built, worker, mailbox, who, budget: dict[int, int]) -> int:
    from pipeshift.serve.cli import _model_info, run_frontend
    from pipeshift.serve.frontend import Config
    from pipeshift.serve.metrics import ServeMetrics
    from pipeshift.serve.scheduler import MultiFrontend, Served

    served = [Served(b.name, b.routing, b.bytes_per_rank) for b in built]
    cfg = Config(max_batch=args.max_batch, max_delay_s=args.max_delay_ms / 1000.0, queue_size=args.queue,
                 inflight=args.inflight or 2 * info.world_size, timeout_s=args.timeout)
    frontend = MultiFrontend(info.rank, info.world_size, worker, mailbox, cfg, served, budget=budget,
                             max_loaded=args.max_loaded or len(served), swap_in=args.swap_in,
                             max_swaps_in_a_row=args.max_swaps_in_a_row, swap_timeout_s=max(60.0, 4 * args.timeout),
                             who=who)
    metrics = ServeMetrics(lambda: {"queue_depth": frontend.queue_depth(),
                                    "inflight_batches": frontend.inflight_batches(),
                                    "ready": float(frontend.ready)})
    add_swap_metrics(metrics, frontend)
    frontend.metrics = metrics
    infos = {b.name: _model_info(argparse.Namespace(**{**vars(args), "name": b.name}), b.pkg, b.bundle,
                                 SimpleNamespace(routing=b.routing), frontend) for b in built}
    app = build_app(frontend, infos, metrics)
    what = ", ".join(f"{b.name} (stages {[list(r) for r in b.routing.stage_ranks]})" for b in built)
    return run_frontend(args, info, frontend, app, f"{len(built)} models: {what}")


def add_swap_metrics(metrics, frontend) -> None:
    """Swap counters and per-model residency in the server's Prometheus registry."""
    from prometheus_client import Counter
    from prometheus_client.core import GaugeMetricFamily

    swaps = Counter("pipeshift_serve_swaps", "models swapped in, and evicted, by model",
                    ["model", "kind"], registry=metrics.registry)

    def swapped(model: str, evicted: list[str]) -> None:
        swaps.labels(model, "in").inc()
        for v in evicted:
            swaps.labels(v, "evicted").inc()

    class Residency:
        def collect(self):
            g = GaugeMetricFamily("pipeshift_serve_model_resident", "1 resident, 0.5 loading, 0 offloaded",
                                  labels=["model"])
            for m in frontend.models.values():
                g.add_metric([m.name], {"resident": 1.0, "loading": 0.5}.get(m.state, 0.0))
            yield g

    frontend.on_swap = swapped
    metrics.registry.register(Residency())


# -- HTTP ---------------------------------------------------------------------------------------


def build_app(frontend, infos: dict[str, Any], metrics):
    """The multi-model routes, plus the single-model app's health, readiness and metrics."""
    from starlette.applications import Starlette
    from starlette.requests import Request as HTTPRequest
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from pipeshift.serve import http

    first = next(iter(infos.values()))
    base = http.build_app(frontend, first, metrics)
    endpoint = http.guarded(first.token, metrics)

    def pick(name: str | None) -> Any:
        if name is None:
            if len(infos) == 1:
                return first
            raise http.HTTPError(400, f'name the model: "model" in the body or /v1/models/NAME/predict '
                                      f'(models: {", ".join(infos)})')
        if not isinstance(name, str) or name not in infos:
            raise http.HTTPError(404, f"no model named {name!r} (models: {', '.join(infos)})")
        return infos[name]

    def named_in_body(body: bytes, content_type: str) -> str | None:
        if content_type.split(";")[0].strip().lower() in http._SAFETENSORS_TYPES:
            return None
        try:
            doc = http.loads(body)
        except (ValueError, UnicodeDecodeError):
            return None  # parse_inputs gives the reason
        return doc.get("model") if isinstance(doc, dict) else None

    @endpoint("models")
    async def models(request: HTTPRequest) -> Response:
        data = []
        for name, info in infos.items():
            d = info.describe(frontend)
            d["stages"] = [list(r) for r in frontend.models[name].routing.stage_ranks]
            d.update(frontend.describe(frontend.models[name]))
            data.append(d)
        return JSONResponse({"object": "list", "data": data, "max_loaded": frontend.max_loaded,
                             "device_memory": {str(r): n for r, n in sorted(frontend.budget.items())},
                             "swaps": frontend.swaps, "decisions": list(frontend.decisions)})

    @endpoint("predict")
    async def predict(request: HTTPRequest) -> Response:
        content_type = request.headers.get("content-type", "application/json")
        probe = infos[next(iter(infos))]
        body = await http.read_body(request, probe.max_body_bytes)
        name = request.path_params.get("name") or request.query_params.get("model") \
            or named_in_body(body, content_type)
        info = pick(name)
        tensors, binary = http.parse_inputs(body, content_type, info)
        outcome = await http.run_request(frontend.door(info.name), tensors, info.request_timeout_s)
        return http.answer(outcome, binary)

    @endpoint("completions")
    async def completions(request: HTTPRequest) -> Response:
        body = await http.read_body(request, first.max_body_bytes)
        info = pick(named_in_body(body, "application/json"))
        if info.completions is None:
            raise http.HTTPError(400, f"model {info.name} is not a causal language model: use /v1/predict")
        door = frontend.door(info.name)
        return await info.completions.handle(body, lambda ids: http.run_request(door, [ids], info.request_timeout_s))

    @endpoint("repartition")
    async def repartition(request: HTTPRequest) -> Response:
        raise http.HTTPError(400, "repartitioning while serving works with one model; this server has several")

    keep = [r for r in base.routes if getattr(r, "path", None) in ("/health", "/ready", "/metrics")]
    return Starlette(routes=[
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/predict", predict, methods=["POST"]),
        Route("/v1/models/{name}/predict", predict, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/admin/repartition", repartition, methods=["POST"]),
        *keep,
    ])
