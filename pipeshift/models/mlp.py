"""A small multilayer perceptron: the fastest model whose pipelined run can be checked exactly.

``depth`` linear layers (ReLU between them) in one ``nn.Sequential`` named ``layers``, so
``layers.0``, ``layers.2``, … are the linears and the graph is a plain chain. Inputs are
``(B, in_features)`` float32 (64 = the digits' 8x8 pixels); ``data="digits"`` trains it on
scikit-learn's handwritten digits.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeshift.errors import PipeshiftError
from pipeshift.models import data as datasets
from pipeshift.models.common import DataSource, check_int, make_bundle
from pipeshift.spec import ModelBundle


class MLP(nn.Module):
    def __init__(self, in_features: int = 64, width: int = 128, depth: int = 3, num_classes: int = 10):
        super().__init__()
        sizes = [in_features] + [width] * (depth - 1) + [num_classes]
        modules: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            if i:
                modules.append(nn.ReLU())
            modules.append(nn.Linear(n_in, n_out))
        self.layers = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def mlp(*, in_features: int = 64, width: int = 128, depth: int = 3, num_classes: int = 10,
        data: str = "synthetic") -> ModelBundle:
    """MLP classifier; ``data`` is ``"synthetic"`` (normal inputs, uniform labels) or ``"digits"``."""
    check_int("in_features", in_features)
    check_int("width", width)
    check_int("depth", depth)
    check_int("num_classes", num_classes)
    model = MLP(in_features=in_features, width=width, depth=depth, num_classes=num_classes)

    def random_vectors(batch_size: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        return (torch.randn((batch_size, in_features), generator=g),)

    def digits() -> DataSource:
        datasets.check_digits_classes(num_classes)
        if in_features != 64:
            raise PipeshiftError(f"data='digits' gives 64 features (8x8 pixels); in_features={in_features}")
        return datasets.digits_vectors()

    return make_bundle(
        model,
        data=data,
        synthetic=datasets.synthetic_classification(random_vectors, num_classes),
        real={"digits": digits},
        criterion=nn.CrossEntropyLoss,
    )
