"""One stage on one rank: its modules, its parameters by original FQN, and its weight versions.

The stage package's modules keep the original model's fully-qualified names, so a stage's
parameters form a dict ``fqn -> Parameter`` that is a slice of the original model. Everything
that must survive a repartition (checkpoints, optimizer state, migrations) is keyed by those
names, never by position.

Weight versions (``1f1b`` stashing, ``2bw`` double buffering) are *separate tensors*: a stash is
a copy of the live parameters, and a microbatch that must run on it goes through
:func:`torch.func.functional_call`, so autograd sees ordinary leaves and the optimizer can
update the live parameters in place while older microbatches are still in flight. (Swapping
``.data`` in place, as PipeDream did, trips autograd's version counters on PyTorch >= 1.5.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from pipeshift.errors import PipeshiftError
from pipeshift.runtime.checkpoint import check_finite
from pipeshift.runtime.tp import TensorParallel, full_tensors

StageEntry = tuple[nn.Module, Sequence[str], Sequence[str]]


class WeightVersions:
    """Stashed copies of a stage's parameters, by version number.

    Buffers of released stashes are kept for reuse (at most two), so steady-state stashing
    allocates nothing.
    """

    def __init__(self, live: Mapping[str, nn.Parameter]):
        self.live = dict(live)
        self.stashes: dict[int, dict[str, torch.Tensor]] = {}
        self._spare: list[dict[str, torch.Tensor]] = []

    def snapshot(self, version: int) -> None:
        """Copy the live parameters as ``version`` (a no-op when that stash exists)."""
        if version in self.stashes:
            return
        buf = self._spare.pop() if self._spare else {n: torch.empty_like(p) for n, p in self.live.items()}
        with torch.no_grad():
            for name, p in self.live.items():
                t = buf[name]
                t.copy_(p)
                t.grad = None
                t.requires_grad_(p.requires_grad)
        self.stashes[version] = buf

    def get(self, version: int) -> dict[str, torch.Tensor]:
        try:
            return self.stashes[version]
        except KeyError:
            raise RuntimeError(f"weight version {version} was not stashed (held: {sorted(self.stashes)})") from None

    def harvest_grads(self, version: int) -> None:
        """Move the gradients a backward left on a stash onto the live parameters."""
        for name, t in self.stashes[version].items():
            if t.grad is None:
                continue
            p = self.live[name]
            if p.grad is None:
                p.grad = t.grad
            else:
                p.grad.add_(t.grad)
            t.grad = None

    def release(self, version: int) -> None:
        buf = self.stashes.pop(version, None)
        if buf is not None and len(self._spare) < 2:
            self._spare.append(buf)

    def clear(self) -> None:
        self.stashes.clear()
        self._spare.clear()


class Stage:
    """The modules a rank runs for one stage, callable on a name -> tensor environment."""

    def __init__(self, stage_id: int, entries: Sequence[StageEntry], device: torch.device | str = "cpu",
                 tp: TensorParallel | None = None):
        self.stage_id = stage_id
        self.device = torch.device(device)
        self.tp = tp  # the stage's TP group when its modules are sharded (parameters are DTensors)
        self.entries: list[tuple[nn.Module, tuple[str, ...], tuple[str, ...]]] = []
        self.params: dict[str, nn.Parameter] = {}
        self._names: list[list[str]] = []  # per module: its parameter names (= FQNs)
        for module, ins, outs in entries:
            module.to(self.device)
            self.entries.append((module, tuple(ins), tuple(outs)))
            names = []
            for name, p in module.named_parameters():
                other = self.params.get(name)
                if other is not None and other is not p:
                    raise PipeshiftError(f"stage {stage_id}: two modules both have a parameter named {name!r}")
                self.params[name] = p
                names.append(name)
            self._names.append(names)
        self.versions = WeightVersions(self.params)

    @property
    def modules(self) -> list[nn.Module]:
        return [m for m, _, _ in self.entries]

    def train(self, mode: bool = True) -> None:
        for m in self.modules:
            m.train(mode)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters and buffers by original FQN (detached, on this stage's device; shards stay DTensors)."""
        out: dict[str, torch.Tensor] = {}
        for m in self.modules:
            out.update(m.state_dict())
        return out

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """:meth:`state_dict` with shards gathered into the original full tensors (every rank of the TP group calls it)."""
        full: dict[str, torch.Tensor] = full_tensors(self.state_dict())
        return full

    def load_state_dict(self, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load this stage's FQNs from ``state`` (full tensors; it may hold other stages' too)."""
        mine = self.state_dict()
        missing = sorted(set(mine) - set(state))
        if missing:
            raise PipeshiftError(f"{source} lacks {len(missing)} tensors of stage {self.stage_id}, e.g. {missing[:3]}")
        for key, t in mine.items():
            if tuple(state[key].shape) != tuple(t.shape):
                raise PipeshiftError(f"{source}: tensor {key!r} has shape {list(state[key].shape)} but stage "
                                     f"{self.stage_id}'s model has {list(t.shape)}")
        check_finite({k: state[k] for k in mine}, source)
        if self.tp is not None:
            state = self.tp.shard_state(state, mine)
        for m in self.modules:
            keys = m.state_dict().keys()
            m.load_state_dict({k: state[k] for k in keys})

    def forward(self, env: dict[str, torch.Tensor], weights: Mapping[str, torch.Tensor] | None = None) -> None:
        """Run every module in order, adding its outputs to ``env``.

        ``weights`` (a stashed version) replaces the live parameters for this call only.
        """
        for k, ((module, ins, outs), names) in enumerate(zip(self.entries, self._names)):
            args = tuple(env[n] for n in ins)
            if weights is None or not names:
                result = module(*args)
            else:
                result = functional_call(module, {n: weights[n] for n in names}, args)
            if isinstance(result, list):
                result = tuple(result)
            if not isinstance(result, tuple):
                result = (result,)
            if len(result) != len(outs):
                raise PipeshiftError(
                    f"stage {self.stage_id}, module {k} ({type(module).__name__}) returned {len(result)} "
                    f"values but the package names {len(outs)} outputs {list(outs)}"
                )
            env.update(zip(outs, result))
