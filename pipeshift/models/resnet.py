"""ResNet-18/50/152, laid out exactly as torchvision's (v1.5: the stride sits in the 3x3 conv).

Module names match torchvision (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0``,
``fc``), so its weights load. Knobs: ``width`` is the first stage's channel count (64 =
torchvision; stages use width, 2x, 4x, 8x), ``num_classes``, ``image_size``. ReLUs are out of
place (see :mod:`pipeshift.models.alexnet`); a block still calls its one ``relu`` module two or
three times, as torchvision's does, so the captured graph has one node per call.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeshift.models.common import check_int
from pipeshift.models.images import check_image_size, image_bundle
from pipeshift.spec import ModelBundle


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs and a shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(in_channels, channels, stride)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.conv2 = conv3x3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, and a shortcut (ResNet-50/101/152)."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(in_channels, channels)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = conv3x3(channels, channels, stride)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = conv1x1(channels, channels * self.expansion)
        self.bn3 = nn.BatchNorm2d(channels * self.expansion)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class ResNet(nn.Module):
    def __init__(self, block: type[BasicBlock] | type[Bottleneck], blocks_per_stage: list[int],
                 num_classes: int = 1000, width: int = 64, in_channels: int = 3):
        super().__init__()
        self.in_channels = width
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._stage(block, width, blocks_per_stage[0], stride=1)
        self.layer2 = self._stage(block, width * 2, blocks_per_stage[1], stride=2)
        self.layer3 = self._stage(block, width * 4, blocks_per_stage[2], stride=2)
        self.layer4 = self._stage(block, width * 8, blocks_per_stage[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)
        self.apply(self._init_weights)

    def _stage(self, block: type[BasicBlock] | type[Bottleneck], channels: int, count: int, stride: int) -> nn.Sequential:
        out_channels = channels * block.expansion
        downsample = None
        if stride != 1 or self.in_channels != out_channels:
            downsample = nn.Sequential(conv1x1(self.in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))
        layers = [block(self.in_channels, channels, stride, downsample)]
        self.in_channels = out_channels
        layers += [block(out_channels, channels) for _ in range(1, count)]
        return nn.Sequential(*layers)

    def _init_weights(self, m: nn.Module) -> None:
        """torchvision's ResNet initialisation of one module: He-normal (fan-out) convs, BatchNorm at 1 and 0."""
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _resnet(name: str, block: type[BasicBlock] | type[Bottleneck], blocks_per_stage: list[int], *,
            num_classes: int, width: int, image_size: int, data: str) -> ModelBundle:
    check_int("num_classes", num_classes)
    check_int("width", width)
    check_image_size(name, image_size, 1)
    model = ResNet(block, blocks_per_stage, num_classes=num_classes, width=width)
    return image_bundle(model, in_channels=3, image_size=image_size, num_classes=num_classes, data=data)


def resnet18(*, num_classes: int = 1000, width: int = 64, image_size: int = 224, data: str = "synthetic") -> ModelBundle:
    """ResNet-18 (torchvision layout); ``data`` is ``"synthetic"`` or ``"digits"``."""
    return _resnet("resnet18", BasicBlock, [2, 2, 2, 2], num_classes=num_classes, width=width,
                   image_size=image_size, data=data)


def resnet50(*, num_classes: int = 1000, width: int = 64, image_size: int = 224, data: str = "synthetic") -> ModelBundle:
    """ResNet-50 (torchvision layout); ``data`` is ``"synthetic"`` or ``"digits"``."""
    return _resnet("resnet50", Bottleneck, [3, 4, 6, 3], num_classes=num_classes, width=width,
                   image_size=image_size, data=data)


def resnet152(*, num_classes: int = 1000, width: int = 64, image_size: int = 224, data: str = "synthetic") -> ModelBundle:
    """ResNet-152 (torchvision layout); ``data`` is ``"synthetic"`` or ``"digits"``."""
    return _resnet("resnet152", Bottleneck, [3, 8, 36, 3], num_classes=num_classes, width=width,
                   image_size=image_size, data=data)
