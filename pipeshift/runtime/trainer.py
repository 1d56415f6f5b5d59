"""The training loop around a :class:`~pipeshift.runtime.pipeline.Pipeline`.

The trainer owns what does not depend on the partition: the step count, the data position, the
output files and the checkpoints. It drives the pipeline in *segments* that end at
synchronisation points — every minibatch for ``flush``/``gpipe`` (their flush), and for the
asynchronous ``1f1b``/``2bw`` only where a checkpoint, an evaluation, ``--sync-every`` or the
end of training needs the pipeline drained. A repartitioning (issue 7) happens at such a point
through :meth:`Pipeline.rebuild` — driven by an optional
:class:`~pipeshift.runtime.elastic.Controller`, which also adds its own synchronisation points
(control ticks, forced switches) and may end the run early for a resize (``regroup``).

Data is read only by the first stage. Its replicas share one deterministic microbatch stream
(``bundle.data(batch_size, split, seed)``): microbatch ``g`` of the run goes to replica
``g % replicas``, each replica skipping the others' microbatches, so the data a run sees does
not depend on how the first stage is replicated, and resuming at step ``k`` means skipping
``k * microbatches`` microbatches.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from pipeshift.errors import PipeshiftError
from pipeshift.runtime import checkpoint as ckpt
from pipeshift.runtime.memory import peak_bytes, size
from pipeshift.runtime.metrics import MetricsLog
from pipeshift.runtime.comm import Communicator
from pipeshift.runtime.pipeline import Batch, Pipeline, load_optimizer_state_by_fqn, optimizer_state_by_fqn
from pipeshift.schedule.registry import ASYNCHRONOUS

if TYPE_CHECKING:
    from pipeshift.runtime.elastic import Controller
from pipeshift.runtime.tp import full_tensors
from pipeshift.runtime.ties import skipped_keys


@dataclasses.dataclass
class TrainConfig:
    schedule: str = "flush"
    microbatches: int = 4
    batch_size: int = 32
    steps: int = 10
    seed: int = 0
    eval_steps: int = 0
    eval_every: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    output_dir: str = "pipeshift_run"
    trace_steps: int = 20
    progress: bool = True
    sync_every: int = 0
    stop_on_nonfinite_loss: bool = True

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class MicrobatchFeed:
    """One split's microbatch stream, read in increasing global index with skipping."""

    def __init__(self, make: Callable[[], Iterator[Batch]], start: int = 0):
        self._it = make()
        self.position = 0
        self._skip_to(start)

    def _skip_to(self, index: int) -> None:
        while self.position < index:
            next(self._it)
            self.position += 1

    def get(self, index: int) -> Batch:
        if index < self.position:
            raise RuntimeError(f"microbatch {index} requested after {self.position}")
        self._skip_to(index)
        batch = next(self._it)
        self.position += 1
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise PipeshiftError("the data source must yield (inputs, target) pairs")
        inputs, target = batch
        inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        return inputs, target


def _fetch(feed: MicrobatchFeed, base: int, mb: int) -> Batch:
    return feed.get(base + mb)


def agree(comm: Communicator, rank: int, config: dict[str, Any], error: str | None, info: Any = None) -> list[Any]:
    """Start-up agreement: every rank learns every other rank's start-up error and config.

    Raises the same :class:`PipeshiftError` on every rank when one could not start or when
    their configurations (package files included, by hash) differ. Returns every rank's
    ``info`` (facts that may differ, such as the host name).
    """
    text = json.dumps({"error": error, "config": config, "info": info}, sort_keys=True, default=str)
    everyone = [json.loads(b.decode()) for b in comm.all_gather_bytes(text.encode(), "checking that all ranks agree")]
    failed = [(r, d["error"]) for r, d in enumerate(everyone) if d["error"]]
    if failed:
        r, err = failed[0]
        others = f" (and {len(failed) - 1} more ranks)" if len(failed) > 1 else ""
        raise PipeshiftError(f"rank {r} could not start{others}: {err}")
    digests = [hashlib.sha256(json.dumps(d["config"], sort_keys=True).encode()).hexdigest() for d in everyone]
    if len(set(digests)) > 1:
        mine = everyone[0]["config"]
        for r, d in enumerate(everyone):
            if d["config"] != mine:
                keys = sorted(k for k in set(mine) | set(d["config"]) if mine.get(k) != d["config"].get(k))
                diffs = "; ".join(f"{k}: rank 0 has {mine.get(k)!r}, rank {r} has {d['config'].get(k)!r}"
                                  for k in keys[:4])
                raise PipeshiftError(f"ranks were started with different configurations — {diffs}")
    return [d["info"] for d in everyone]


def check_partition(stage_ranks: Mapping[int, Sequence[int]] | Sequence[Sequence[int]], config: TrainConfig,
                    tp_degrees: Mapping[int, int] | None = None) -> None:
    """The configuration errors every rank finds identically (configs agree by now).

    Call it before building a :class:`Pipeline`: that creates process groups collectively, and a
    rank leaving with this error while a peer is still inside ``new_group`` would turn a clear
    message into a connection reset on the peer.
    """
    rank_lists = [stage_ranks[k] for k in sorted(stage_ranks)] if isinstance(stage_ranks, Mapping) else list(stage_ranks)
    m, s = config.microbatches, len(rank_lists)
    if m < s:
        raise PipeshiftError(f"--microbatches {m} is fewer than the {s} pipeline stages: use at least {s}")
    for stage, ranks in enumerate(rank_lists):
        replicas = len(ranks) // (tp_degrees or {}).get(stage, 1)
        if m % replicas:
            raise PipeshiftError(
                f"stage {stage} has {replicas} replicas but a minibatch has {m} microbatches: its replicas would "
                f"get uneven shares; use a multiple of {replicas} for --microbatches"
            )


class Trainer:
    def __init__(self, pipeline: Pipeline, config: TrainConfig, *, data: Callable[[int, str, int], Iterator[Batch]],
                 meta: dict[str, Any] | None = None, controller: Controller | None = None):
        self.pipeline = pipeline
        self.config = config
        self.data = data
        self.meta = dict(meta or {})
        self.controller = controller
        self.rank = pipeline.rank
        self.step = 0
        self.out_dir = Path(config.output_dir) / f"rank{self.rank}"
        self.tracer = pipeline.tracer
        self.last_saved: int | None = None  # step of the newest checkpoint this run wrote or resumed from
        self.model_keys: set[str] | None = None  # every stage's state_dict keys: what a checkpoint may hold
        self.resumed_switches: list[int] = []  # forced switches the resumed checkpoint had already applied
        self.regroup = False  # stopped early for a resize: restart with another number of ranks
        self._bar = None
        self._last_time = time.perf_counter()
        self._start_time = self._last_time
        self.rates: list[float] = []
        self.last_loss: float | None = None
        self.eval_loss: float | None = None
        self.predicted_memory: dict[int, float] = {}  # stage -> predicted bytes per worker (runtime.memory)

    @property
    def reporter(self) -> bool:
        """The rank that prints: the last stage's first replica (it sees the loss), its TP leader."""
        return self.pipeline.is_last and self.pipeline.replica == 0 and self.pipeline.tp_index == 0

    # -- the loop -----------------------------------------------------------------------------

    def fit(self) -> None:
        cfg = self.config
        if cfg.resume:
            self.resume()
        self.pipeline.hooks.step(self.step)
        if self.controller is not None:
            self.controller.at_start(self)
        self.log = MetricsLog(self.out_dir / "metrics.csv", append=cfg.resume and self.step > 0, upto_step=self.step)
        self._bar = tqdm(total=cfg.steps, initial=self.step, desc=f"train ({cfg.schedule})", unit="step",
                         disable=not (cfg.progress and self.reporter), file=sys.stderr, dynamic_ncols=True)
        feed = MicrobatchFeed(lambda: self.data(cfg.batch_size, "train", cfg.seed), self.step * cfg.microbatches)
        self._last_time = time.perf_counter()
        try:
            while self.step < cfg.steps:
                seg = self._segment_length()
                base = self.step * cfg.microbatches
                actions = self.pipeline.actions(seg)
                self.tracer.enabled = self.step < cfg.trace_steps
                self.pipeline.run(actions, functools.partial(_fetch, feed, base), train=True,
                                  on_minibatch_end=self._minibatch_done, label=f"step {self.step + 1}, ")
                if self._due(cfg.eval_every) and cfg.eval_steps:
                    self.evaluate()
                if cfg.checkpoint_dir and (self._due(cfg.checkpoint_every) or self.step == cfg.steps):
                    self.save()
                self.pipeline.hooks.sync_point(self.step)
                if self.controller is not None and self.controller.at_boundary(self) == "regroup":
                    self.regroup = True
                    break
            if cfg.eval_steps and not self._due(cfg.eval_every) and not self.regroup:
                self.evaluate()
        finally:
            if self._bar is not None:
                self._bar.close()
            self.log.close()
            self.tracer.write(self.out_dir / "trace.json",
                              f"rank {self.rank} (stage {self.pipeline.stage_id})")

    def _due(self, every: int) -> bool:
        return every > 0 and self.step > 0 and self.step % every == 0

    def _segment_length(self) -> int:
        """Minibatches until the next synchronisation point (always 1 for synchronous schedules)."""
        cfg = self.config
        if cfg.schedule not in ASYNCHRONOUS:
            return 1
        end = cfg.steps
        for every in (cfg.checkpoint_every if cfg.checkpoint_dir else 0,
                      cfg.eval_every if cfg.eval_steps else 0, cfg.sync_every):
            if every > 0:
                end = min(end, (self.step // every + 1) * every)
        if self.controller is not None:
            extra = self.controller.next_sync(self.step)
            if extra is not None:
                end = min(end, extra)
        return end - self.step

    def _minibatch_done(self) -> None:
        cfg = self.config
        self.step += 1
        now = time.perf_counter()
        counters = self.pipeline.take_counters()
        self.pipeline.hooks.step(self.step)
        if self.controller is not None:
            self.controller.on_minibatch(self, counters)
        rate = cfg.microbatches * cfg.batch_size / max(now - self._last_time, 1e-9)
        self._last_time = now
        self.rates.append(rate)
        loss = None
        if counters.losses:
            loss = float(torch.stack([x.float() for x in counters.losses]).mean())
            self.last_loss = loss
            if cfg.stop_on_nonfinite_loss and not math.isfinite(loss):
                # training on would only spread NaN into every weight (and the next checkpoint)
                raise PipeshiftError(
                    f"step {self.step}: the loss is {loss} on stage {self.pipeline.stage_id} (rank {self.rank}); "
                    "stopping (lower --lr, or pass --allow-nonfinite-loss to train on)")
        self.log.row(step=self.step, split="train", stage=self.pipeline.stage_id, rank=self.rank, loss=loss,
                     samples_per_s=rate, compute_s=counters.compute_s, wait_s=counters.wait_s,
                     comm_s=counters.comm_s, lr=self.pipeline.optimizer.param_groups[0]["lr"],
                     time_s=now - self._start_time, peak_memory_bytes=peak_bytes(self.pipeline.device),
                     predicted_memory_bytes=self.predicted_memory.get(self.pipeline.stage_id))
        self.tracer.enabled = self.step < cfg.trace_steps
        if self._bar is not None and not self._bar.disable:
            self._bar.set_postfix(loss=f"{loss:.4g}" if loss is not None else "-", samples_s=f"{rate:.0f}")
            self._bar.update(1)
        self.pipeline.where_prefix = f"step {self.step + 1}, "

    def evaluate(self) -> float | None:
        """Forward-only over ``eval_steps`` minibatches of the ``val`` split (the same ones each time)."""
        cfg = self.config
        self.pipeline.take_counters()
        feed = MicrobatchFeed(lambda: self.data(cfg.batch_size, "val", cfg.seed))
        actions = self.pipeline.eval_actions()
        was = self.tracer.enabled
        self.tracer.enabled = False
        for i in range(cfg.eval_steps):
            base = i * cfg.microbatches
            self.pipeline.run(actions, functools.partial(_fetch, feed, base), train=False,
                              label=f"evaluation {i + 1} after step {self.step}, ")
        self.tracer.enabled = was
        counters = self.pipeline.take_counters()
        loss = float(torch.stack([x.float() for x in counters.losses]).mean()) if counters.losses else None
        self.eval_loss = loss
        self.log.row(step=self.step, split="val", stage=self.pipeline.stage_id, rank=self.rank, loss=loss,
                     compute_s=counters.compute_s, wait_s=counters.wait_s, comm_s=counters.comm_s)
        if loss is not None and self.reporter:
            msg = f"eval after step {self.step}: loss {loss:.4f} over {cfg.eval_steps} minibatches"
            (self._bar.write(msg) if self._bar is not None and not self._bar.disable else print(msg, flush=True))
        self._last_time = time.perf_counter()
        return loss

    def after_switch(self) -> None:
        """The pipeline now runs another partition (called by the controller after a switch)."""
        check_partition(self.pipeline.topology.stage_ranks, self.config)
        self.predicted_memory = {}  # priced for the partition it started with
        self.pipeline.where_prefix = f"step {self.step + 1}, "

    # -- checkpoints --------------------------------------------------------------------------

    def save(self) -> Path:
        cfg, p = self.config, self.pipeline
        if not cfg.checkpoint_dir:
            raise PipeshiftError("saving a checkpoint needs --checkpoint-dir")
        root = Path(cfg.checkpoint_dir)
        where = ckpt.step_dir(root, self.step)
        p.comm.where = f"checkpoint after step {self.step}"
        digests: dict[str, str] = {}
        held: dict[str, list[str]] = {}  # stage file -> the FQNs in it (a resuming rank reads only its own)
        if p.replica == 0:
            # full tensors whatever the TP degree (a collective in a TP group), so any layout loads them
            skip = skipped_keys(p.ties.ties, p.stage_id)  # another stage writes these tied parameters
            model = {k: v for k, v in p.stage.full_state_dict().items() if k not in skip}
            kept = {k: v for k, v in p.stage.params.items() if k not in skip}
            optimizer = full_tensors(optimizer_state_by_fqn(p.optimizer, kept))
            if p.tp_index == 0:
                held[f"stage{p.stage_id}.pt"] = sorted(model)
                digests[f"stage{p.stage_id}.pt"] = ckpt.save_file({
                    "stage": p.stage_id,
                    "step": self.step,
                    "model": ckpt.to_cpu(model),
                    "optimizer": ckpt.to_cpu(optimizer),
                    "lr_scheduler": p.lr_scheduler.state_dict() if p.lr_scheduler is not None else None,
                }, where / f"stage{p.stage_id}.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and p.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(p.device)
        digests[f"rank{self.rank}.pt"] = ckpt.save_file({"rng": rng, "step": self.step}, where / f"rank{self.rank}.pt")
        # every rank has written once this returns; meta.json records what each wrote
        everyone = p.comm.all_gather_bytes(json.dumps({"files": digests, "keys": held}).encode(),
                                           f"waiting for every rank to write checkpoint {where.name}")
        if self.rank == 0:
            for text in everyone:
                told = json.loads(text)
                digests.update(told["files"])
                held.update(told["keys"])
            plan = self.controller.plan if self.controller is not None else None
            if plan is not None:  # the partition in force: a restart resumes on it
                ckpt.write_json(plan.to_json(), where / "plan.json")
            ckpt.write_meta({
                "format": ckpt.FORMAT, "version": 1, "step": self.step,
                "num_stages": p.topology.num_stages,
                "stage_to_rank_map": {str(s): list(r) for s, r in enumerate(p.topology.stage_ranks)},
                "module_to_stage_map": list(p.topology.module_to_stage),
                "schedule": cfg.schedule, "microbatches": cfg.microbatches, "batch_size": cfg.batch_size,
                "seed": cfg.seed, "data_position": self.step * cfg.microbatches,
                "switches_applied": list(getattr(self.controller, "applied", [])),
                "tied_parameters": p.ties.ties, "stage_keys": held,
                **self.meta,
            }, where, digests)
            ckpt.mark_latest(root, self.step)
        self.last_saved = self.step
        return where

    def resume(self) -> None:
        cfg, p = self.config, self.pipeline
        root = Path(cfg.checkpoint_dir or "")
        if not cfg.checkpoint_dir:
            raise PipeshiftError("--resume needs --checkpoint-dir")
        if not (root / ckpt.LATEST).exists() and not (root / "meta.json").exists():
            if self.reporter:
                print(f"--resume: no checkpoint in {root} yet; starting from step 0", file=sys.stderr)
            return
        own_keys = set(p.stage.state_dict())

        def needed(meta: Mapping[str, Any]) -> set[str] | None:
            stage_files = ckpt.files_for(meta, own_keys, p.stage_id)
            return None if stage_files is None else stage_files | {f"rank{self.rank}.pt"}

        where, meta, note = self._agree_on_checkpoint(root, needed, *ckpt.choose(root, needed))
        if note and self.rank == 0:
            print(f"pipeshift train: {note}", file=sys.stderr, flush=True)
        for key in ("schedule", "microbatches", "batch_size", "seed"):
            mine = getattr(cfg, key)
            if meta.get(key) != mine:
                raise PipeshiftError(
                    f"{where}/meta.json: written with {key}={meta.get(key)!r} but this run has {mine!r}; "
                    "resuming would not continue the same training"
                )
        names = ckpt.files_for(meta, own_keys, p.stage_id)  # the files holding this rank's tensors (None: all)
        stages = ckpt.stage_files(where, meta, mmap=True, names=names)  # only their pages are read
        ties = meta["tied_parameters"]
        state = ckpt.assemble_state_dict(stages, where, ties, partial=names is not None)
        if self.model_keys is not None:
            extra = sorted(set(state) - self.model_keys)
            if extra:
                raise PipeshiftError(f"{where} holds {len(extra)} tensors the model does not have, e.g. {extra[:3]}: "
                                     "a checkpoint of another model?")
        p.stage.load_state_dict(state, source=str(where))
        saved = ckpt.merged_optimizer_state(stages, ties)
        if p.tp is not None:
            saved = p.tp.shard_optimizer_state(saved, p.stage.params)
        load_optimizer_state_by_fqn(p.optimizer, p.stage.params, saved)
        if p.lr_scheduler is not None:
            mine = stages[min(p.stage_id, len(stages) - 1)].get("lr_scheduler")
            if mine is not None:
                p.lr_scheduler.load_state_dict(mine)
        rank_file = where / f"rank{self.rank}.pt"
        if rank_file.is_file():
            rng = ckpt.load_file(rank_file).get("rng", {})
            if "cpu" in rng:
                torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and p.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], p.device)
        self.step = meta["step"]
        self.last_saved = self.step
        applied = meta.get("switches_applied", [])
        self.resumed_switches = [i for i in applied if isinstance(i, int)] if isinstance(applied, list) else []
        if self.step > cfg.steps:
            raise PipeshiftError(f"{where} is at step {self.step}, beyond --steps {cfg.steps}")
        # every rank must have read the same checkpoint (a shared filesystem, or identical copies)
        agree(p.comm, self.rank, {"resumed_step": self.step}, None)

    def _agree_on_checkpoint(self, root: Path, needed: Callable[[Mapping[str, Any]], set[str] | None],
                             where: Path, meta: dict[str, Any], note: str) -> tuple[Path, dict[str, Any], str]:
        """The checkpoint every rank resumes from: the newest one whose files each rank found intact.

        Each rank checked only its own files, so a damaged file sends its reader alone to an older
        checkpoint; then everyone takes the oldest choice, and checks its own files there.
        """
        p = self.pipeline
        reason = note
        while True:
            told = [json.loads(b) for b in p.comm.all_gather_bytes(
                json.dumps({"step": meta["step"], "note": note}).encode(),
                "agreeing on the checkpoint to resume from")]
            oldest = min(t["step"] for t in told)
            reason = next((t["note"] for t in told if t["step"] == oldest and t["note"]), reason)
            if all(t["step"] == oldest for t in told):
                return where, meta, reason
            if meta["step"] != oldest:
                where, meta, note = ckpt.choose(root, needed, at_most=oldest)

    def summary(self) -> str:
        rate = statistics.median(self.rates[1:] or self.rates) if self.rates else math.nan
        loss = f"{self.last_loss:.4f}" if self.last_loss is not None else "-"
        text = f"trained {self.step} steps ({self.config.schedule}): last loss {loss}, median {rate:.1f} samples/s"
        if self.eval_loss is not None:
            text += f", eval loss {self.eval_loss:.4f}"
        predicted = self.predicted_memory.get(self.pipeline.stage_id)
        if predicted:
            text += f"; peak memory {size(peak_bytes(self.pipeline.device))} on this rank, predicted {size(predicted)}"
        return text + f"; metrics in {self.out_dir.parent}/rank*/"
