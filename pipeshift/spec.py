"""Model specs: how every step names and rebuilds the same model.

A spec is ``pkg.module:callable`` plus keyword arguments (``--model-arg key=value``). It is
recorded in profile.json, plan.json and the stage package, so any process on any machine can
rebuild the identical model (same architecture, and — with the recorded seed — the same initial
weights) without pickling modules.

The callable may return a :class:`ModelBundle` (the zoo does: example inputs, loss and data come
with it) or a bare ``nn.Module``; then example inputs come from ``--inputs pkg.module:fn``
(``batch_size -> tuple of tensors``) or ``--input-shape 3,224,224 [--input-dtype float32]``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from pipeshift.errors import PipeshiftError

_SPEC_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "float64": torch.float64, "double": torch.float64,
    "float16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "long": torch.int64, "int32": torch.int32, "int": torch.int32,
    "uint8": torch.uint8, "bool": torch.bool,
}

Batch = tuple[tuple[torch.Tensor, ...], torch.Tensor]
MAX_DIM = 1 << 24  # per input dimension: far beyond any real input, far below what overflows an allocator


@dataclasses.dataclass
class ModelBundle:
    """A model with everything needed to run it without further flags.

    ``example_inputs(batch_size)`` returns the tuple of forward arguments (named ``input0``,
    ``input1``, … everywhere); ``example_target(batch_size)`` a matching target for
    ``criterion``; ``data(batch_size, split, seed)`` an endless iterator of ``(inputs, target)``.
    A bare ``nn.Module`` gets neither a loss nor data: training it needs ``--loss`` and
    ``--data`` (:mod:`pipeshift.runspec`), never a made-up objective.
    """

    model: nn.Module
    example_inputs: Callable[[int], tuple[torch.Tensor, ...]]
    criterion: Callable[[], nn.Module] | None = None
    example_target: Callable[[int], torch.Tensor] | None = None
    data: Callable[..., Iterator[Batch]] | None = None
    # Module classes best kept whole in the graph (Hugging Face's ``_no_split_modules``, its
    # transformer blocks): the profiler's default leaves when no --leaf/--leaf-type/--depth is given.
    leaf_types: tuple[str, ...] = ()
    # Weights that come with the model (a Hugging Face directory's safetensors): loaded over the
    # seeded initialisation by ``ModelSpec.build``, and the runtime's default ``--init-from``.
    init_from: str | None = None

    def synthetic_data(self, batch_size: int, seed: int = 0) -> Iterator[Batch]:
        """Deterministic random batches shaped like the example inputs."""
        g = torch.Generator().manual_seed(seed)
        while True:
            ins = tuple(_random_like(t, g) for t in self.example_inputs(batch_size))
            tgt = self.example_target(batch_size) if self.example_target else torch.zeros(batch_size)
            yield ins, _random_like(tgt, g)


def _random_like(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    if t.is_floating_point():
        return torch.randn(t.shape, generator=g, dtype=t.dtype)
    hi = int(t.max().item()) + 1 if t.numel() else 1
    return torch.randint(0, max(hi, 2), t.shape, generator=g, dtype=t.dtype)


@dataclasses.dataclass
class ModelSpec:
    """The recorded recipe for a model; JSON-serialisable via :meth:`to_json`."""

    callable: str
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    inputs: str | None = None
    input_shape: list[int] | None = None
    input_dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        if not _SPEC_RE.match(self.callable):
            raise PipeshiftError(f"model spec {self.callable!r}: expected 'pkg.module:callable'")
        if self.inputs is not None and not _SPEC_RE.match(self.inputs):
            raise PipeshiftError(f"--inputs {self.inputs!r}: expected 'pkg.module:callable'")
        if self.input_dtype not in _DTYPES:
            raise PipeshiftError(f"--input-dtype {self.input_dtype!r}: one of {', '.join(sorted(_DTYPES))}")
        if self.input_shape is not None and not (
                isinstance(self.input_shape, list)
                and all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= MAX_DIM for d in self.input_shape)):
            raise PipeshiftError(f"--input-shape {self.input_shape!r}: expected positive integers up to {MAX_DIM}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 63:
            raise PipeshiftError(f"seed {self.seed!r}: expected an integer from 0 to 2**63 - 1")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> ModelSpec:
        if not isinstance(data, dict) or not isinstance(data.get("callable"), str):
            raise PipeshiftError(f"model spec must be an object with a 'callable' string, got {data!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise PipeshiftError(f"model spec has unknown keys {sorted(unknown)}")
        if not isinstance(data.get("kwargs", {}), dict):
            raise PipeshiftError("model spec 'kwargs' must be an object")
        return cls(**data)

    def build(self, *, weights: bool = True) -> ModelBundle:
        """Import and call the spec under the recorded seed; wrap a bare module into a bundle.

        The model's initial weights are :mod:`pipeshift.materialize`'s: per module, from the seed
        and the module's name, so a rank that materialises only its stages gets the same values.
        ``weights=False`` leaves the re-creatable parameters on the meta device (nothing
        allocated) for :func:`~pipeshift.materialize.materialize` or a weights loader.
        """
        from pipeshift.materialize import build_deferred, materialize

        fn = import_callable(self.callable)
        try:
            made = build_deferred(fn, self.kwargs, self.seed)
        except TypeError as e:
            raise PipeshiftError(f"{self.callable}({_kwargs_text(self.kwargs)}): {e}") from None
        except (MemoryError, RuntimeError, ValueError, OverflowError) as e:
            # e.g. a size argument of 10**7: the allocator refuses; say which call and why
            text = " ".join(str(e).split())[:200]
            raise PipeshiftError(f"{self.callable}({_kwargs_text(self.kwargs)}) failed: "
                                 f"{type(e).__name__}: {text}") from None
        if isinstance(made, ModelBundle):
            bundle = made
            if self.inputs or self.input_shape:
                bundle = dataclasses.replace(bundle, example_inputs=self._input_fn())
        elif isinstance(made, nn.Module):
            bundle = ModelBundle(model=made, example_inputs=self._input_fn())
        else:
            raise PipeshiftError(f"{self.callable} returned {type(made).__name__}, expected an nn.Module")
        if weights:
            materialize(bundle.model, seed=self.seed)
            if bundle.init_from is not None:
                from pipeshift.weights import load_model_weights

                load_model_weights(bundle.model, bundle.init_from, who=self.callable)
        return bundle

    def _input_fn(self) -> Callable[[int], tuple[torch.Tensor, ...]]:
        if self.inputs:
            user = import_callable(self.inputs)

            def from_user(bs: int) -> tuple[torch.Tensor, ...]:
                out = user(bs)
                out = tuple(out) if isinstance(out, (tuple, list)) else (out,)
                if not all(torch.is_tensor(t) for t in out):
                    raise PipeshiftError(f"--inputs {self.inputs} must return a tensor or a tuple of tensors")
                return out

            return from_user
        if self.input_shape:
            shape, dtype = list(self.input_shape), _DTYPES[self.input_dtype]

            def from_shape(bs: int) -> tuple[torch.Tensor, ...]:
                g = torch.Generator().manual_seed(self.seed)
                if dtype.is_floating_point:
                    return (torch.randn([bs, *shape], generator=g).to(dtype),)
                return (torch.zeros([bs, *shape], dtype=dtype),)

            return from_shape
        raise PipeshiftError(
            f"{self.callable} returns a bare nn.Module: give its inputs with --input-shape C,H,W "
            "or --inputs pkg.module:fn"
        )


def _kwargs_text(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def import_callable(spec: str) -> Callable[..., Any]:
    if not _SPEC_RE.match(spec):
        raise PipeshiftError(f"{spec!r}: expected 'pkg.module:callable'")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise PipeshiftError(f"{spec}: cannot import {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise PipeshiftError(f"{spec}: module {module_name!r} has no callable {attr!r}")
    return fn


def parse_model_args(items: Iterable[str] | None, flag: str = "--model-arg") -> dict[str, Any]:
    """``key=value`` pairs; values are Python literals where they parse as one, else strings.

    A key may be dotted (``config.n_layer=2``): builders such as :func:`pipeshift.hf.auto` take
    such keys through ``**kwargs`` to override one field of a nested configuration.
    """
    out: dict[str, Any] = {}
    for item in items or []:
        key, eq, val = item.partition("=")
        if not eq or not all(part.isidentifier() for part in key.split(".")):
            raise PipeshiftError(f"{flag} {item!r}: expected key=value")
        try:
            out[key] = ast.literal_eval(val)
        except (ValueError, SyntaxError):
            out[key] = val
    return out


def add_spec_arguments(p: argparse.ArgumentParser) -> None:
    """The model-naming flags shared by every command that builds a model."""
    p.add_argument("spec", help="model as pkg.module:callable (zoo: pipeshift.models:resnet50)")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE", help="keyword for the callable")
    p.add_argument("--inputs", default=None, help="pkg.module:fn giving example inputs for a batch size")
    p.add_argument("--input-shape", default=None, help="one input's shape without the batch dimension, e.g. 3,224,224")
    p.add_argument("--input-dtype", default="float32", help="dtype of --input-shape's input")
    p.add_argument("--seed", type=int, default=0, help="seed for the model's initial weights")


def spec_from_args(args: argparse.Namespace) -> ModelSpec:
    shape = None
    if args.input_shape:
        try:
            shape = [int(s) for s in str(args.input_shape).split(",") if s.strip()]
        except ValueError:
            raise PipeshiftError(f"--input-shape {args.input_shape!r}: expected integers like 3,224,224") from None
    return ModelSpec(
        callable=args.spec,
        kwargs=parse_model_args(args.model_arg),
        inputs=args.inputs,
        input_shape=shape,
        input_dtype=args.input_dtype,
        seed=args.seed,
    )
