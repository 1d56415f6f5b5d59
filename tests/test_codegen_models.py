"""Small models for the code generator's tests (importable as ``test_codegen_models:<name>``).

Each one stresses something a stage cut must survive: skip connections and an in-place ReLU
(``residual_cnn``), tuple-valued LSTM outputs and a state handed to a second LSTM
(``lstm_tuples``), parallel branches joined by ``cat``, a bare parameter and buffer read through
``get_attr``, a module called twice, and a layer that forward never uses (``branchy_cat``).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from pipeshift.spec import ModelBundle


class _Block(nn.Module):
    def __init__(self, channels: int, inplace: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return F.relu(self.conv2(out) + x)


class ResidualCNN(nn.Module):
    def __init__(self, channels: int = 4, classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.Sequential(_Block(channels, inplace=True), _Block(channels, inplace=False))
        self.head = nn.Linear(channels * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.blocks(self.stem(x))
        y = F.adaptive_avg_pool2d(y, 4)
        return self.head(y.view(y.size(0), -1))


def residual_cnn() -> ModelBundle:
    return ModelBundle(
        model=ResidualCNN(),
        example_inputs=lambda bs: (torch.randn(bs, 3, 8, 8, generator=torch.Generator().manual_seed(1)),),
        criterion=nn.CrossEntropyLoss,
        example_target=lambda bs: torch.arange(bs) % 5,
    )


class LSTMTuples(nn.Module):
    def __init__(self, vocab: int = 11, hidden: int = 6):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.encoder = nn.LSTM(hidden, hidden, batch_first=True)
        self.decoder = nn.LSTM(hidden, hidden, batch_first=True)
        self.proj = nn.Linear(2 * hidden, vocab)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        enc = self.encoder(x)
        out, state = enc
        dec, _ = self.decoder(out.flip(1), state)
        scale = lengths.float().unsqueeze(1).unsqueeze(2) / tokens.size(1)
        return self.proj(torch.cat([dec, out * scale], dim=2))


def lstm_tuples() -> ModelBundle:
    def inputs(bs: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(2)
        return torch.randint(0, 11, (bs, 5), generator=g), torch.randint(1, 6, (bs,), generator=g)

    return ModelBundle(model=LSTMTuples(), example_inputs=inputs)


class BranchyCat(nn.Module):
    def __init__(self, channels: int = 3):
        super().__init__()
        c = channels
        self.a = nn.Conv2d(c, 2, 1)
        self.b1 = nn.Conv2d(c, 2, 1)
        self.b2 = nn.Conv2d(2, 2, 3, padding=1)
        self.c = nn.Conv2d(c, 2, 3, padding=1)
        self.act = nn.Tanh()
        self.mix1 = nn.Conv2d(6, 4, 1)
        self.mix2 = nn.Conv2d(6, 4, 1)
        self.unused = nn.Linear(3, 3)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 8))
        self.register_buffer("offset", torch.full((8,), 0.25))
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.a(x))
        b = self.act(self.b2(self.b1(x)))
        c = F.max_pool2d(self.c(x), 3, stride=1, padding=1)
        y = torch.cat([a, b, c], 1)
        y = torch.cat([self.mix1(y), self.mix2(y)], dim=1)
        y = y.mean(dim=(2, 3)) * self.scale + self.offset
        return self.fc(y)


def branchy_cat() -> ModelBundle:
    return ModelBundle(
        model=BranchyCat(),
        example_inputs=lambda bs: (torch.randn(bs, 3, 6, 6, generator=torch.Generator().manual_seed(3)),),
    )


HOSTILE_TEXT = "x\"\"\"\n'''\nimport os; os.system('touch PWNED')  # \\\n"
HOSTILE_NAME = "evil; exec(chr(49)) #"


class Tagged(nn.Module):
    """A leaf that takes a string keyword and describes itself with hostile text."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def extra_repr(self) -> str:
        return HOSTILE_TEXT

    def forward(self, x: torch.Tensor, tag: str = "") -> torch.Tensor:
        return self.lin(x) * (1.0 + len(tag) * 0.0)


class HostileStrings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tagged = Tagged()
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.tagged(x, tag=HOSTILE_TEXT)))


def hostile_strings(note: str = "") -> ModelBundle:
    """``note`` is ignored: it only carries text into the recorded spec."""
    del note
    return ModelBundle(model=HostileStrings(), example_inputs=lambda bs: (torch.ones(bs, 4),))


class HostileName(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self._modules[HOSTILE_NAME] = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self._modules[HOSTILE_NAME](x))


def hostile_name() -> ModelBundle:
    return ModelBundle(model=HostileName(), example_inputs=lambda bs: (torch.ones(bs, 4),))


class TracedConstant(nn.Module):
    """``torch.tensor(...)`` inside forward: torch.fx stores it as ``_tensor_constant0`` on the root."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.out = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x) * torch.tensor([0.5, -1.25, 3.0]) + torch.tensor(0.1, dtype=torch.float64).float()
        return self.out(torch.tanh(y))


def traced_constant() -> ModelBundle:
    return ModelBundle(model=TracedConstant(), example_inputs=lambda bs: (torch.randn(bs, 3, generator=torch.Generator().manual_seed(4)),))


class StepLoop(nn.Module):
    """A Python loop over ``range(x.size(1))``: torch.fx cannot trace it, the torch.export fallback can."""

    def __init__(self, hidden: int = 5):
        super().__init__()
        self.hidden = hidden
        self.cell = nn.GRUCell(3, hidden)
        self.out = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.size(0), self.hidden)
        steps = []
        for t in range(x.size(1)):
            h = self.cell(x[:, t], h)
            steps.append(h)
        return self.out(torch.stack(steps, 1))


def step_loop() -> ModelBundle:
    return ModelBundle(model=StepLoop(), example_inputs=lambda bs: (torch.randn(bs, 4, 3, generator=torch.Generator().manual_seed(5)),))


def scaled_softsign(x: torch.Tensor, scale: float) -> torch.Tensor:
    return x / (1 + x.abs()) * scale


torch.fx.wrap("scaled_softsign")  # one opaque call in the graph; generated code imports it from here


class WrappedFunction(nn.Module):
    """A user function kept whole by ``torch.fx.wrap``, and ``math.sqrt`` on a shape."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = scaled_softsign(self.lin(x), 0.5) / math.sqrt(x.size(-1))
        return self.out(y)


def wrapped_function() -> ModelBundle:
    return ModelBundle(model=WrappedFunction(), example_inputs=lambda bs: (torch.randn(bs, 4, generator=torch.Generator().manual_seed(6)),))


def sequential_root() -> ModelBundle:
    """The model itself is an ``nn.Sequential``: its FQNs are ``0``, ``1``, …"""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    return ModelBundle(model=model, example_inputs=lambda bs: (torch.randn(bs, 4, generator=torch.Generator().manual_seed(7)),))
