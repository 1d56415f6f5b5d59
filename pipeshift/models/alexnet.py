"""AlexNet, laid out exactly as torchvision's ``alexnet`` (same module names, so its weights load).

Knobs: ``width`` rescales every conv's channels by ``width / 64`` (64 = torchvision), ``hidden``
is the classifier's width (4096), plus ``num_classes``, ``image_size`` and ``dropout``.
Dropout defaults to 0 (torchvision: 0.5) so a forward pass is deterministic and a pipelined run
can be compared number for number with a single-process one; it has no parameters, so the
state_dict is unchanged. ReLUs are out of place: a pipeline stage may start at a ReLU whose input
is a received tensor that autograd treats as a leaf.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeshift.models.common import check_int, check_prob, scaled
from pipeshift.models.images import check_image_size, image_bundle
from pipeshift.spec import ModelBundle

MIN_IMAGE_SIZE = 63  # conv 11/4 then three 3/2 max-pools


class AlexNet(nn.Module):
    def __init__(self, num_classes: int = 1000, width: int = 64, hidden: int = 4096, dropout: float = 0.0,
                 in_channels: int = 3):
        super().__init__()
        c1, c2, c3, c4 = (scaled(c, width) for c in (64, 192, 384, 256))
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=11, stride=4, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(c1, c2, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(c2, c3, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c3, c4, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c4, c4, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(c4 * 6 * 6, hidden),
            nn.ReLU(),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def alexnet(*, num_classes: int = 1000, width: int = 64, hidden: int = 4096, image_size: int = 224,
            dropout: float = 0.0, data: str = "synthetic") -> ModelBundle:
    """AlexNet (torchvision layout); ``data`` is ``"synthetic"`` or ``"digits"``."""
    check_int("num_classes", num_classes)
    check_int("width", width)
    check_int("hidden", hidden)
    check_image_size("alexnet", image_size, MIN_IMAGE_SIZE)
    model = AlexNet(num_classes=num_classes, width=width, hidden=hidden, dropout=check_prob("dropout", dropout))
    return image_bundle(model, in_channels=3, image_size=image_size, num_classes=num_classes, data=data)
