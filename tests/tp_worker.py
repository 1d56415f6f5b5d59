"""One rank of the in-process tensor-parallel checks (run by tests/test_tp.py, four ranks, gloo).

Ranks 0-3 run one stage of the tiny Llama as 2 replicas × TP degree 2. Each rank checks

1. forward and gradients of its sharded stage against the unsharded model on the same batch
   (gradients of sharded parameters gathered by FQN), and
2. one flush step through :class:`~pipeshift.runtime.pipeline.Pipeline` (microbatches dealt
   to the replicas, shard-wise all-reduce over the replicas) against single-process gradient
   accumulation,

and writes the largest relative errors to ``OUT/rankR.json``. Given a second package (two stages ×
TP 2 over the same ranks), it then trains it with gpipe and with 1f1b (:data:`SCHEDULES`, two
microbatches of 2 per minibatch), and each TP group's leader saves its stage's full weights to
``OUT/SCHEDULE_stageS.pt`` for the test to compare with single-process references.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


SCHEDULES = (("gpipe", 2), ("1f1b", 3))  # schedule, minibatches


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def main() -> None:
    from pipeshift.runtime.package import load_stage_package
    from pipeshift.runtime.pipeline import Pipeline
    from pipeshift.runtime.tp import full_tensors

    pkg_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    pkg = load_stage_package(pkg_dir)
    bundle = pkg.bundle()
    reference = copy.deepcopy(bundle.model)
    criterion = bundle.criterion()
    entries = pkg.module.model(criterion, bundle.model)
    pipe = Pipeline(rank, entries, pkg.module_to_stage, pkg.stage_to_rank, schedule="flush", microbatches=4,
                    optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), tp_degrees=pkg.tp_degrees,
                    tp_plan=pkg.tp_plan, timeout_s=60)
    report: dict[str, float | int | list] = {"sharded": len(pipe.tp_applied), "replica": pipe.replica,
                                             "tp_index": pipe.tp_index}

    # 1. forward and gradients, one batch
    data = bundle.data(2, "train", 0)
    (ids,), target = next(data)
    env = {"input0": ids, "target": target}
    pipe.stage.forward(env)
    want = reference(ids)
    report["forward"] = rel(env["logits"], want)
    env["loss"].backward()
    criterion(want, target).backward()
    grads = full_tensors({n: p.grad for n, p in pipe.stage.params.items()})
    ref_grads = dict(reference.named_parameters())
    report["grads"] = max(rel(g, ref_grads[n].grad) for n, g in grads.items())
    report["grads_sharded"] = sum(1 for p in pipe.stage.params.values() if type(p.grad).__name__ == "DTensor")
    pipe.optimizer.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)

    # 2. two flush steps of 4 microbatches over 2 replicas
    stream = bundle.data(2, "train", 1)
    batches = [next(stream) for _ in range(8)]
    for step in range(2):
        pipe.run(pipe.actions(1), lambda mb, step=step: batches[step * 4 + mb], train=True)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for step in range(2):
        for (x,), y in batches[step * 4:(step + 1) * 4]:
            (criterion(reference(x), y) / 4).backward()
        opt.step()
        opt.zero_grad()
    mine = pipe.stage.full_state_dict()
    ref_state = reference.state_dict()
    report["weights"] = max(rel(t, ref_state[n]) for n, t in mine.items())
    if os.environ.get("TP_WORKER_DEBUG"):
        report["per_weight"] = {n: rel(t, ref_state[n]) for n, t in mine.items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(report))

    # 3. the other schedules on two stages × TP 2, each from fresh weights: the leaders save their stage
    if len(sys.argv) > 3:
        staged = load_stage_package(Path(sys.argv[3]))
        for schedule, steps in SCHEDULES:
            fresh = staged.bundle()
            two = Pipeline(rank, staged.module.model(fresh.criterion(), fresh.model), staged.module_to_stage,
                           staged.stage_to_rank, schedule=schedule, microbatches=2,
                           optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                           tp_degrees=staged.tp_degrees, tp_plan=staged.tp_plan, timeout_s=60)
            feed = fresh.data(2, "train", 0)
            minibatches = [next(feed) for _ in range(2 * steps)]
            two.run(two.actions(steps), lambda mb, mbs=minibatches: mbs[mb], train=True)
            state = two.stage.full_state_dict()
            if two.tp is not None and two.tp.is_leader:
                torch.save(state, out / f"{schedule}_stage{two.stage_id}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
