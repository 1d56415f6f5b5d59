"""VGG-16 (configuration "D"), laid out exactly as torchvision's ``vgg16`` / ``vgg16_bn``.

Module names match torchvision (``features.0``, ``features.2``, …, ``classifier.6``), so its
weights load. Knobs: ``width`` rescales every conv's channels by ``width / 64`` (64 =
torchvision), ``hidden`` is the classifier's width (4096), ``batch_norm`` gives ``vgg16_bn``,
plus ``num_classes``, ``image_size`` and ``dropout``. Dropout defaults to 0 (torchvision: 0.5)
so forward is deterministic; ReLUs are out of place (see :mod:`pipeshift.models.alexnet`).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeshift.models.common import check_bool, check_int, check_prob, scaled
from pipeshift.models.images import check_image_size, image_bundle
from pipeshift.spec import ModelBundle

POOL = "M"
VGG16_LAYERS: list[int | str] = [64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL, 512, 512, 512, POOL]
MIN_IMAGE_SIZE = 32  # five 2x2 max-pools


def vgg_features(layers: list[int | str], width: int, batch_norm: bool, in_channels: int = 3) -> nn.Sequential:
    """3x3 convs (each followed by [BatchNorm and] ReLU) and 2x2 max-pools, as listed."""
    modules: list[nn.Module] = []
    channels = in_channels
    for item in layers:
        if item == POOL:
            modules.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        out = scaled(int(item), width)
        modules.append(nn.Conv2d(channels, out, kernel_size=3, padding=1))
        if batch_norm:
            modules.append(nn.BatchNorm2d(out))
        modules.append(nn.ReLU())
        channels = out
    return nn.Sequential(*modules)


class VGG(nn.Module):
    def __init__(self, features: nn.Sequential, out_channels: int, num_classes: int = 1000, hidden: int = 4096,
                 dropout: float = 0.0):
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(out_channels * 7 * 7, hidden),
            nn.ReLU(),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        """torchvision's VGG initialisation of one module: He-normal convs, N(0, 0.01) linears, zero biases."""
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def vgg16(*, num_classes: int = 1000, width: int = 64, hidden: int = 4096, image_size: int = 224,
          batch_norm: bool = False, dropout: float = 0.0, data: str = "synthetic") -> ModelBundle:
    """VGG-16 (torchvision layout); ``data`` is ``"synthetic"`` or ``"digits"``."""
    check_int("num_classes", num_classes)
    check_int("width", width)
    check_int("hidden", hidden)
    check_image_size("vgg16", image_size, MIN_IMAGE_SIZE)
    features = vgg_features(VGG16_LAYERS, width, check_bool("batch_norm", batch_norm))
    model = VGG(features, scaled(512, width), num_classes=num_classes, hidden=hidden,
                dropout=check_prob("dropout", dropout))
    return image_bundle(model, in_channels=3, image_size=image_size, num_classes=num_classes, data=data)
