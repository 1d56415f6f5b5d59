"""Building a model without its weights, and giving chosen parts of it weights that do not depend on who builds them.

A pipeline rank runs a few stages of a model that may not fit in its memory, so it must never
hold the whole model. The model is therefore constructed under :func:`deferred_parameters`:
every parameter registered by a module that can re-create it (a zero-argument
``reset_parameters()``, as every built-in layer has) is moved to the meta device as soon as it
is registered — construction allocates at most one layer's weight at a time and keeps none.
Buffers (running statistics, masks, position tables) and the parameters of modules that could
not re-create them stay as the constructor made them: they are usually small, and nothing else
knows their values.

:func:`materialize` then gives real storage to the tensors a rank needs and initialises them
*per module*: module ``M`` at fully-qualified name ``F`` runs its ``reset_parameters()`` and
then the root model's ``_init_weights(M)`` (the Hugging Face convention, also used by the zoo)
under a random generator seeded from the recorded seed and ``F`` alone. A module's weights
therefore depend on nothing but the seed and its name: a 1-rank and a 4-rank job, and a
single-process reference built with :meth:`ModelSpec.build <pipeshift.spec.ModelSpec.build>`
(which materialises everything the same way), start from identical weights.

Initialisation is exact even for a module only part of whose tensors a rank keeps (a tied
weight, a parameter adopted on its own): the module's whole set of direct tensors is
materialised for the call, so the random stream it draws is the same as in a full build, and the
extra ones are dropped again afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
from collections.abc import Callable, Collection, Iterator
from typing import Any

import torch
from torch import nn

from pipeshift.errors import PipeshiftError

META = torch.device("meta")


def can_reset(module: nn.Module) -> bool:
    """Whether ``module.reset_parameters()`` exists and needs no argument."""
    fn = getattr(type(module), "reset_parameters", None)
    if not callable(fn):
        return False
    try:
        params = list(inspect.signature(fn).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    return all(p.default is not inspect.Parameter.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               for p in params)


@contextlib.contextmanager
def deferred_parameters() -> Iterator[None]:
    """Construct models inside this block with their re-creatable parameters on the meta device.

    ``nn.Module.register_parameter`` is wrapped for the duration (construction is single-threaded
    in practice; the original is restored on exit, even on an error).
    """
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        if (param is not None and type(param) is nn.Parameter and param.device.type != "meta"
                and can_reset(self)):
            self._parameters[name] = nn.Parameter(torch.empty_like(param, device=META),
                                                  requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def module_seed(seed: int, fqn: str) -> int:
    """The seed of module ``fqn``'s initialisation: a hash of the model's seed and the name alone."""
    digest = hashlib.sha256(f"{int(seed)}/{fqn}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclasses.dataclass
class _Slot:
    """One tensor object of the model and every (module, attribute name, FQN) that holds it."""

    tensor: torch.Tensor
    holders: list[tuple[nn.Module, str, str]]
    is_param: bool
    persistent: bool

    @property
    def fqns(self) -> list[str]:
        return [f for _, _, f in self.holders]

    def install(self, new: torch.Tensor) -> None:
        for module, name, _ in self.holders:
            # setattr, not the table itself: some modules mirror their tensors (nn.LSTM's _flat_weights)
            if self.is_param:
                setattr(module, name, new)
            else:
                module._buffers[name] = new
        self.tensor = new


def slots(model: nn.Module) -> dict[int, _Slot]:
    """Every parameter and buffer object of ``model``, by identity, with all the names it goes by."""
    out: dict[int, _Slot] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for is_param, table in ((True, module._parameters), (False, module._buffers)):
            for name, t in table.items():
                if t is None:
                    continue
                fqn = f"{prefix}.{name}" if prefix else name
                slot = out.get(id(t))
                if slot is None:
                    persistent = is_param or name not in module._non_persistent_buffers_set
                    slot = out[id(t)] = _Slot(t, [], is_param, persistent)
                slot.holders.append((module, name, fqn))
    return out


def _real(like: torch.Tensor, device: torch.device, fill: bool) -> torch.Tensor:
    t = torch.empty_like(like, device=device)
    if fill and t.is_floating_point():
        t.fill_(float("nan"))  # what no initialisation wrote stays NaN, and is caught below
    if isinstance(like, nn.Parameter):
        return nn.Parameter(t, requires_grad=like.requires_grad)
    return t


def _builtin(module: nn.Module) -> bool:
    """A layer of torch itself: its reset_parameters() is known to set every tensor it holds."""
    return type(module).__module__.startswith("torch.nn.")


def _to_meta(like: torch.Tensor) -> torch.Tensor:
    t = torch.empty_like(like, device=META)
    if isinstance(like, nn.Parameter):
        return nn.Parameter(t, requires_grad=like.requires_grad)
    return t


def owned(fqns: Collection[str] | None, names: list[str]) -> bool:
    """Whether any of a tensor's ``names`` is in ``fqns`` or below one of them (``None``: everything)."""
    if fqns is None:
        return True
    for name in names:
        parts = name.split(".")
        if any(".".join(parts[:i]) in fqns for i in range(1, len(parts) + 1)):
            return True
    return False


def materialize(model: nn.Module, fqns: Collection[str] | None = None, *, seed: int = 0,
                device: torch.device | str = "cpu", initialize: bool = True, keep_others: bool = False) -> list[str]:
    """Give real storage on ``device`` to the tensors named by ``fqns`` (all when ``None``).

    ``fqns`` may name modules (everything below them), parameters or buffers. With
    ``initialize`` the deferred tensors are initialised per module as the module docstring says;
    without it they are left uninitialised, for a caller that loads every one of them. Tensors
    outside ``fqns`` that are real (kept from construction) are moved to meta, so the model holds
    only what the rank needs — unless ``keep_others`` (a caller materialising piece by piece).
    Returns the state_dict keys now held (sorted).
    """
    device = torch.device(device)
    table = slots(model)
    wanted = {k for k, s in table.items() if owned(fqns, s.fqns)}
    fresh: set[int] = set()  # new storage held by modules of unknown code: the initialisation must write it
    made: set[int] = set()  # every slot given new storage here

    def make_real(key: int) -> None:
        slot = table[key]
        if slot.tensor.device.type == "meta":
            checked = initialize and not all(_builtin(m) for m, _, _ in slot.holders)
            slot.install(_real(slot.tensor, device, checked))
            made.add(key)
            if checked:
                fresh.add(key)
        elif slot.tensor.device != device:
            slot.install(_moved(slot.tensor, device))

    for key in wanted:
        make_real(key)
    if initialize:
        _initialize(model, table, wanted, fresh, seed, make_real)
    for key, slot in table.items():
        if keep_others and key not in made:
            continue
        if key not in wanted and slot.tensor.device.type != "meta" and slot.persistent:
            slot.install(_to_meta(slot.tensor))
    return sorted(f for k in wanted for f in table[k].fqns if table[k].persistent)


def _moved(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    moved = t.detach().to(device)
    return nn.Parameter(moved, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else moved


def _initialize(model: nn.Module, table: dict[int, _Slot], wanted: set[int], fresh: set[int], seed: int,
                make_real: Callable[[int], None]) -> None:
    root_init = getattr(model, "_init_weights", None)
    root_init = root_init if callable(root_init) else None
    targets: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    key_of = {id(s.tensor): k for k, s in table.items()}  # slots are keyed by the tensors they started with
    for prefix, module in model.named_modules():
        direct = [key_of[id(t)] for t in [*module._parameters.values(), *module._buffers.values()] if t is not None]
        if id(module) not in seen and any(k in wanted for k in direct):
            seen.add(id(module))
            targets.append((prefix, module))
            for k in direct:  # the module's whole random stream, as in a full build
                make_real(k)
    for prefix, module in targets:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(module_seed(seed, prefix))
            try:
                if can_reset(module):
                    module.reset_parameters()  # type: ignore[operator]
                if root_init is not None:
                    root_init(module)
            except Exception as e:
                raise PipeshiftError(f"initialising module {prefix or '(root)'!r} ({type(module).__name__}): "
                                     f"{type(e).__name__}: {e}") from None
    for key in fresh & wanted:
        slot = table[key]
        t = slot.tensor
        if t.is_floating_point() and bool(torch.isnan(t).any()):
            raise PipeshiftError(
                f"{slot.fqns[0]!r}: its module's reset_parameters() (or the model's _init_weights) does not set "
                "it, so it has no defined initial value; initialise it there, or load weights with --init-from"
            )


def build_deferred(fn: Callable[..., Any], kwargs: dict[str, Any], seed: int) -> Any:
    """Call a model constructor under the recorded seed with its parameters deferred (see the module docstring)."""
    torch.manual_seed(seed)
    with deferred_parameters():
        return fn(**kwargs)


def is_materialized(model: nn.Module) -> bool:
    return all(t.device.type != "meta" for t in [*model.parameters(), *model.buffers()])


def install(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Make ``model`` hold ``tensors`` (FQN -> tensor) under those names and every name tied to them.

    How a rank takes in layers it receives while repartitioning: the model's meta placeholders
    are replaced, a parameter stays a parameter.
    """
    if not tensors:
        return
    by_name = {f: s for s in slots(model).values() for f in s.fqns}
    for fqn, t in tensors.items():
        slot = by_name.get(fqn)
        if slot is None:
            raise PipeshiftError(f"the model has no parameter or buffer {fqn!r}")
        if tuple(slot.tensor.shape) != tuple(t.shape):
            raise PipeshiftError(f"{fqn!r} arrived as {list(t.shape)}, the model has {list(slot.tensor.shape)}")
        slot.install(nn.Parameter(t, requires_grad=slot.tensor.requires_grad) if slot.is_param else t)


def release(model: nn.Module, fqns: Collection[str]) -> int:
    """Put the tensors named ``fqns`` back on the meta device (their memory is freed once nothing else holds it).

    Returns the bytes released. A tensor also known by a name not in ``fqns`` is kept.
    """
    freed = 0
    for slot in slots(model).values():
        if slot.tensor.device.type != "meta" and all(f in fqns for f in slot.fqns):
            freed += slot.tensor.numel() * slot.tensor.element_size()
            slot.install(_to_meta(slot.tensor))
    return freed
