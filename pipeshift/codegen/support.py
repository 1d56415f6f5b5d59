"""What generated stage files import at run time: adopting the original model's pieces by name.

A stage owns a slice of the original model. Rather than re-declaring layers, ``StageK.__init__``
calls :func:`adopt` with the fully-qualified names of the modules, parameters and buffers it
runs; each object is registered on the stage under the same dotted path, through empty
:class:`Container` modules for the intermediate levels (what ``torch.fx.GraphModule`` does when it
copies attributes). So ``StageK(model).state_dict()`` keys are the original FQNs, and the stage
shares storage with ``model``: loading the original's weights loads the stage's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from pipeshift.errors import PipeshiftError

FQN_RE = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")


class Container(nn.Module):
    """An empty level of the original hierarchy; ``c[0]`` reads child ``"0"`` (like ``nn.Sequential``)."""

    def __getitem__(self, key: int | str) -> Any:
        name = str(key)
        for table in (self._modules, self._parameters, self._buffers):
            if name in table:
                return table[name]
        raise KeyError(f"{name!r} is not held by this stage")


def _owner(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        raise PipeshiftError(
            f"the model has no submodule {path!r}: it is not the model this stage was generated for"
        ) from None


def _level(stage: nn.Module, path: str) -> nn.Module:
    """The (possibly new) container at ``path`` inside ``stage``."""
    here = stage
    for part in path.split(".") if path else []:
        child = here._modules.get(part)
        if child is None:
            child = Container()
            here.add_module(part, child)
        elif not isinstance(child, Container):
            raise PipeshiftError(f"cannot adopt below {path!r}: the stage already holds that whole module")
        here = child
    return here


def adopt(stage: nn.Module, model: nn.Module, fqns: Iterable[str]) -> None:
    """Register ``model``'s submodules / parameters / buffers named by ``fqns`` on ``stage``.

    Objects are shared, not copied. A plain tensor attribute (not a parameter or buffer) becomes
    a non-persistent buffer so it follows ``stage.to(device)`` without entering the state_dict.
    """
    for fqn in fqns:
        if not FQN_RE.match(fqn):
            raise PipeshiftError(f"{fqn!r} is not a dotted module/parameter name")
        parent_path, _, name = fqn.rpartition(".")
        owner = _owner(model, parent_path)
        parent = _level(stage, parent_path)
        if name in owner._modules and owner._modules[name] is not None:
            parent.add_module(name, owner._modules[name])
        elif name in owner._parameters and owner._parameters[name] is not None:
            parent.register_parameter(name, owner._parameters[name])
        elif name in owner._buffers and owner._buffers[name] is not None:
            persistent = name not in owner._non_persistent_buffers_set
            parent.register_buffer(name, owner._buffers[name], persistent=persistent)
        elif isinstance(getattr(owner, name, None), torch.Tensor):
            parent.register_buffer(name, getattr(owner, name), persistent=False)
        else:
            raise PipeshiftError(
                f"the model has no module, parameter or buffer {fqn!r}: it is not the model this stage was generated for"
            )
