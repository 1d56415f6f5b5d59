"""The repartitioning seam: ``Pipeline.rebuild`` switches partitions mid-run without changing the result.

Two ranks train the zoo MLP with ``flush`` cut after its first linear layer, then — at a flush
boundary, in the same processes — move the layers to a cut after the second linear layer:
parameters by FQN, momentum buffers through the FQN-keyed optimizer state. (Here every rank
simply gathers everything; issue 7's migration moves only what changes owner.) The weights after
the run must equal single-process training with gradient accumulation.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from helpers import accumulate, free_port
from pipeshift.runtime.pipeline import Pipeline, optimizer_state_by_fqn
from pipeshift.runtime.trainer import MicrobatchFeed
from pipeshift.spec import ModelSpec

SPEC = {"callable": "pipeshift.models:mlp", "kwargs": {"in_features": 8, "width": 12, "depth": 4, "num_classes": 4},
        "seed": 7}
M, B, LR, MOMENTUM = 2, 4, 0.1, 0.9


class Chunk(nn.Module):
    """Layers ``lo..hi-1`` of the MLP, adopted under their original names (``layers.i``)."""

    def __init__(self, model: nn.Module, lo: int, hi: int):
        super().__init__()
        self.layers = nn.Module()
        for i in range(lo, hi):
            self.layers.add_module(str(i), model.layers[i])
        self.order = [str(i) for i in range(lo, hi)]

    def forward(self, x):
        for name in self.order:
            x = self.layers._modules[name](x)
        return (x,)


def entries(model: nn.Module, cut: int, criterion: nn.Module):
    return [(Chunk(model, 0, cut), ["input0"], [f"node{cut}"]), (Chunk(model, cut, 7), [f"node{cut}"], ["node7"]),
            (criterion, ["node7", "target"], ["loss"])]


def _worker(rank: int, port: int, out: str, steps_before: int, steps_after: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    bundle = ModelSpec.from_json(SPEC).build()
    model, criterion = bundle.model, bundle.criterion()
    pipe = Pipeline(rank, entries(model, 2, criterion), [0, 1, 1], [[0], [1]], schedule="flush", microbatches=M,
                    optimizer=lambda ps: torch.optim.SGD(ps, lr=LR, momentum=MOMENTUM), timeout_s=30)
    feed = MicrobatchFeed(lambda: bundle.data(B, "train", 0))
    step = 0

    def train(n: int) -> None:
        nonlocal step
        for _ in range(n):
            base = step * M
            pipe.run(pipe.actions(1), lambda mb, base=base: feed.get(base + mb))
            step += 1

    def gather():
        mine = {"model": pipe.stage.state_dict(), "optimizer": optimizer_state_by_fqn(pipe.optimizer, pipe.stage.params)}
        everyone: list = [None, None]
        dist.all_gather_object(everyone, mine)
        return everyone

    train(steps_before)
    # repartition at the flush boundary: every rank learns every layer's state, then rebuilds
    everyone = gather()
    model.load_state_dict({k: v for part in everyone for k, v in part["model"].items()})
    moved = {"state": {k: v for part in everyone for k, v in part["optimizer"]["state"].items()},
             "param_groups": [g for part in everyone for g in part["optimizer"]["param_groups"]]}
    pipe.rebuild(entries(model, 4, criterion), [0, 1, 1], [[0], [1]], optimizer_state=moved)
    assert set(pipe.stage.params) == ({"layers.0.weight", "layers.0.bias", "layers.2.weight", "layers.2.bias"}
                                      if rank == 0 else {"layers.4.weight", "layers.4.bias", "layers.6.weight",
                                                         "layers.6.bias"})
    train(steps_after)
    everyone = gather()
    if rank == 0:
        final = {k: v.tolist() for part in everyone for k, v in part["model"].items()}
        Path(out).write_text(json.dumps(final))
    dist.barrier()
    dist.destroy_process_group()


def _run(tmp_path: Path, steps_before: int, steps_after: int, limit: float = 120) -> dict[str, torch.Tensor]:
    out = tmp_path / "final.json"
    ctx = mp.start_processes(_worker, args=(free_port(), str(out), steps_before, steps_after), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + limit
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise AssertionError("ranks did not finish in time")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return {k: torch.tensor(v) for k, v in json.loads(out.read_text()).items()}


def test_rebuild_onto_a_new_partition_keeps_training_exact(tmp_path):
    got = _run(tmp_path, steps_before=2, steps_after=2)
    model = accumulate(ModelSpec.from_json(SPEC).build(), 4, M, B,
                       lambda params: torch.optim.SGD(params, lr=LR, momentum=MOMENTUM))
    for name, want in model.state_dict().items():
        assert torch.allclose(got[name], want, rtol=1e-5, atol=1e-7), name


def test_rebuild_refuses_microbatches_in_flight():
    """A single-stage pipeline (no process group needed) stopped between a forward and its backward."""
    bundle = ModelSpec.from_json(SPEC).build()

    def whole():
        return [(Chunk(bundle.model, 0, 7), ["input0"], ["node7"]), (bundle.criterion(), ["node7", "target"], ["loss"])]

    pipe = Pipeline(0, whole(), [0, 0], [[0]], schedule="flush", microbatches=1,
                    optimizer=lambda ps: torch.optim.SGD(ps, lr=LR))
    batch = next(bundle.data(B, "train", 0))
    actions = pipe.actions(1)
    assert [a.kind for a in actions[:2]] == ["load", "fwd"]
    pipe.run(actions[:2], lambda mb: batch)
    with pytest.raises(RuntimeError, match="in flight"):
        pipe.rebuild(whole(), [0, 0], [[0]])
