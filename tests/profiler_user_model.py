"""User models for the profiler tests, named on the command line as ``tests.profiler_user_model:<fn>``.

Each callable returns a bare ``nn.Module`` (as user code would), so its inputs come from
``--input-shape`` or the test.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyNet(nn.Module):
    """Conv net with function ops (F.relu, flatten, cat) and a bfloat16 round trip."""

    def __init__(self, channels: int = 4, classes: int = 5):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(2 * channels * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.conv(x)))
        half = y.to(torch.bfloat16)  # an activation that is not float32
        y = torch.cat([y, half.float()], dim=1)
        return self.fc(torch.flatten(self.pool(y), 1))


def tiny_net(channels: int = 4, classes: int = 5) -> nn.Module:
    return TinyNet(channels, classes)


class Gate(nn.Module):
    """Data-dependent Python control flow: neither torch.fx nor torch.export can trace it."""

    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.proj(x)
        return -x


class Gated(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.gate = Gate(width)
        self.out = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.gate(self.inp(x)))


def gated(width: int = 8) -> nn.Module:
    return Gated(width)


class Decoder(nn.Module):
    """A GNMT-style step loop: ``range(x.size(1))`` needs a concrete length, so torch.fx stops."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width
        self.cell = nn.LSTMCell(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.size(0), self.width, dtype=x.dtype, device=x.device)
        c = torch.zeros_like(h)
        steps = []
        for t in range(x.size(1)):
            h, c = self.cell(x[:, t], (h, c))
            steps.append(self.norm(h))
        return torch.stack(steps, dim=1)


class Looped(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.embed = nn.Linear(width, width)
        self.decoder = Decoder(width)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder(self.embed(x)))


def looped(width: int = 8) -> nn.Module:
    return Looped(width)


class Saving(nn.Module):
    """Ops whose saved-for-backward tensors are known from autograd's formulas."""

    def __init__(self, n_in: int = 16, n_out: int = 32):
        super().__init__()
        self.fc = nn.Linear(n_in, n_out)  # saves its input (the weight is a parameter)
        self.act = nn.Sigmoid()  # saves its output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.fc(x))
        return y * y  # saves y once (one storage, used twice)


def saving() -> nn.Module:
    return Saving()
