"""Data and loss named on the command line: ``--data pkg.mod:fn`` and ``--loss pkg.mod:callable``.

Every command that runs a model (``profile``, ``train``, ``launch``, ``serve``) takes the same
flags through :func:`add_data_arguments` / :func:`add_loss_arguments`, and turns them into a data
source and a loss factory with :func:`resolve_data` / :func:`resolve_loss`:

* ``--data pkg.mod:fn [--data-arg KEY=VALUE …]``: ``fn(batch_size, split, seed, **data_args)``
  returns an iterator of ``(inputs_tuple, target)`` (``split`` is ``"train"`` or ``"val"``);
  ``--data synthetic`` asks for random batches shaped like the model's example inputs, and the
  run says so. Built-ins: :func:`pipeshift.data.text_file`, :func:`pipeshift.data.tensor_file`.
* ``--loss pkg.mod:callable [--loss-arg KEY=VALUE …]``: a loss class or a factory returning a
  loss module (``torch.nn:CrossEntropyLoss``, :func:`pipeshift.losses.causal_lm`); a plain
  function ``loss(output, target)`` is wrapped into a module.

Without the flags a zoo or Hugging Face bundle's own data and loss are used. A bare
``nn.Module`` has neither, and training it is refused with the flag to add — pipeshift never
makes up an objective or feeds random inputs unasked.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from pipeshift.errors import PipeshiftError
from pipeshift.spec import Batch, ModelBundle, import_callable, parse_model_args

SYNTHETIC = "synthetic"
DataSource = Callable[[int, str, int], Iterator[Batch]]


@dataclasses.dataclass(frozen=True)
class FunctionSpec:
    """A user function named on the command line, with its keyword arguments."""

    callable: str
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"callable": self.callable, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_json(cls, data: Any, what: str) -> FunctionSpec:
        if not isinstance(data, dict) or not isinstance(data.get("callable"), str) \
                or not isinstance(data.get("kwargs", {}), dict) or set(data) - {"callable", "kwargs"}:
            raise PipeshiftError(f"{what} must be an object {{'callable': 'pkg.mod:fn', 'kwargs': {{…}}}}, got {data!r:.100}")
        return cls(data["callable"], dict(data.get("kwargs", {})))


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data (default: the model bundle's own)")
    g.add_argument("--data", default=None, metavar="PKG.MOD:FN",
                   help="fn(batch_size, split, seed, **data_args) -> iterator of (inputs_tuple, target); "
                        "built-ins pipeshift.data:text_file, pipeshift.data:tensor_file; 'synthetic' for random batches")
    g.add_argument("--data-arg", action="append", default=[], metavar="KEY=VALUE", help="keyword for the data function")


def add_loss_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("loss (default: the model bundle's own)")
    g.add_argument("--loss", default=None, metavar="PKG.MOD:CALLABLE",
                   help="loss class or factory, e.g. torch.nn:CrossEntropyLoss or pipeshift.losses:causal_lm")
    g.add_argument("--loss-arg", action="append", default=[], metavar="KEY=VALUE", help="keyword for the loss")


def _named(args: argparse.Namespace, flag: str, extra: tuple[str, ...] = ()) -> FunctionSpec | None:
    """``--FLAG pkg.mod:fn`` with its ``--FLAG-arg``s; a typo in the name is reported now."""
    name = getattr(args, flag, None)
    kwargs = parse_model_args(getattr(args, f"{flag}_arg", None), f"--{flag}-arg")
    if name is None:
        if kwargs:
            raise PipeshiftError(f"--{flag}-arg given without --{flag}")
        return None
    if name in extra:
        if kwargs:
            raise PipeshiftError(f"--{flag} {name} takes no --{flag}-arg")
    else:
        import_callable(name)
    return FunctionSpec(name, kwargs)


def data_spec_from_args(args: argparse.Namespace) -> FunctionSpec | None:
    return _named(args, "data", (SYNTHETIC,))


def loss_spec_from_args(args: argparse.Namespace) -> FunctionSpec | None:
    return _named(args, "loss")


# -- data --------------------------------------------------------------------------------------


def user_data(spec: FunctionSpec) -> DataSource:
    """``spec`` as a data source whose every batch is checked (a bad one is a one-line error)."""
    fn = import_callable(spec.callable)

    def source(batch_size: int, split: str, seed: int) -> Iterator[Batch]:
        try:
            made = fn(batch_size, split, seed, **spec.kwargs)
        except TypeError as e:
            raise PipeshiftError(f"--data {spec.callable}: {e}") from None
        try:
            it = iter(made)
        except TypeError:
            raise PipeshiftError(f"--data {spec.callable} returned {type(made).__name__}, not an iterator") from None
        return _checked(it, spec.callable, split)

    return source


def _checked(it: Iterator[Any], name: str, split: str) -> Iterator[Batch]:
    count = 0
    for item in it:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise PipeshiftError(f"--data {name}: batch {count} of the {split} split is not an (inputs, target) pair")
        inputs, target = item
        inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        if not inputs or not all(torch.is_tensor(t) for t in inputs) or not torch.is_tensor(target):
            raise PipeshiftError(f"--data {name}: batch {count} of the {split} split must hold tensors "
                                 "(a tensor or tuple of tensors, and a target tensor)")
        count += 1
        yield inputs, target
    raise PipeshiftError(f"--data {name}: the {split} split ended after {count} batches; the runtime reads an "
                         "endless stream (repeat the data over epochs inside the function)")


def resolve_data(spec: FunctionSpec | None, bundle: ModelBundle, what: str, *, announce: bool = True) -> DataSource:
    """The data source a run uses: ``--data``, else the bundle's own; refused when there is none."""
    if spec is None:
        if bundle.data is not None:
            return bundle.data
        raise PipeshiftError(
            f"{what} brings no data: add --data pkg.module:fn (for example --data pipeshift.data:text_file "
            "--data-arg path=corpus.txt), or --data synthetic to train on random inputs")
    if spec.callable == SYNTHETIC:
        if announce:
            import sys

            print("pipeshift: training on synthetic random data (--data synthetic)", file=sys.stderr, flush=True)
        return lambda b, split, seed: bundle.synthetic_data(b, seed + (split != "train"))
    return user_data(spec)


# -- loss --------------------------------------------------------------------------------------


class FunctionLoss(nn.Module):
    """A plain ``loss(output, target)`` function as a module (stages hold modules)."""

    def __init__(self, fn: Callable[..., torch.Tensor], name: str):
        super().__init__()
        self.fn = fn
        self.name = name

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.fn(*args)

    def extra_repr(self) -> str:
        return self.name


def user_loss(spec: FunctionSpec) -> Callable[[], nn.Module]:
    obj = import_callable(spec.callable)

    def make() -> nn.Module:
        if not spec.kwargs and not isinstance(obj, type) and _takes_two_tensors(obj):
            return FunctionLoss(obj, spec.callable)
        try:
            made = obj(**spec.kwargs)
        except TypeError as e:
            raise PipeshiftError(f"--loss {spec.callable}: {e}") from None
        if isinstance(made, nn.Module):
            return made
        if callable(made):
            return FunctionLoss(made, spec.callable)
        raise PipeshiftError(f"--loss {spec.callable} gave {type(made).__name__}, not a loss module")

    make()  # construction errors now, on every rank, not at the first microbatch
    return make


def _takes_two_tensors(fn: Callable[..., Any]) -> bool:
    """A function ``loss(output, target)`` rather than a factory: two required positional parameters."""
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return False
    return len(params) >= 2


def resolve_loss(spec: FunctionSpec | None, bundle: ModelBundle, what: str) -> Callable[[], nn.Module]:
    """The loss factory a run uses: ``--loss``, else the bundle's own; refused when there is none."""
    if spec is not None:
        return user_loss(spec)
    if bundle.criterion is not None:
        return bundle.criterion
    raise PipeshiftError(
        f"{what} brings no loss: add --loss pkg.module:callable (for example --loss torch.nn:CrossEntropyLoss, "
        "or --loss pipeshift.losses:causal_lm for a language model's logits)")


def with_data_and_loss(bundle: ModelBundle, args: argparse.Namespace, what: str, *,
                       need_data: bool = True, need_loss: bool = True, announce: bool = True) -> ModelBundle:
    """``bundle`` with the run's data and loss in place (``--data``/``--loss`` first, then its own)."""
    data = resolve_data(data_spec_from_args(args), bundle, what, announce=announce) if need_data else bundle.data
    loss = resolve_loss(loss_spec_from_args(args), bundle, what) if need_loss else bundle.criterion
    return dataclasses.replace(bundle, data=data, criterion=loss)
