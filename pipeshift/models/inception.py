"""Inception-v3, laid out exactly as torchvision's ``inception_v3`` — a genuinely branchy graph.

Every ``Mixed_*`` block feeds one input to three or four parallel branches and concatenates
them, so the captured graph has fan-out and fan-in at every block: the planner's DAG handling
is exercised here, not on the chains of VGG or the single skips of ResNet.

Module names match torchvision (``Conv2d_1a_3x3.conv``, ``Mixed_5b.branch1x1.bn``,
``AuxLogits.fc``, ``fc``) for the same ``aux_logits`` setting, so its weights load. Knobs:
``width`` rescales every channel count by ``width / 64`` (64 = torchvision), ``num_classes``,
``image_size`` (299; at least 75), ``dropout`` (0 here, torchvision 0.5: keeps forward
deterministic), ``transform_input``.

``aux_logits`` defaults to False (torchvision: True), so the model always returns one logits
tensor. With ``aux_logits=True`` a model in training mode returns ``(logits, aux_logits)`` — a
plain tuple of tensors, which capture and the pipeline carry as two outputs — and the bundle's
criterion is :class:`AuxCrossEntropy`; in eval mode it returns the logits alone. The mode at
capture time decides which graph is traced.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeshift.models.common import check_bool, check_int, check_prob, scaled
from pipeshift.models.images import check_image_size, image_bundle
from pipeshift.spec import ModelBundle

MIN_IMAGE_SIZE = 75
MIN_IMAGE_SIZE_AUX = 299  # the aux head's 5x5/3 pool and 5x5 conv need the full 17x17 grid
AUX_WEIGHT = 0.4


class BasicConv2d(nn.Module):
    """Conv (no bias) → BatchNorm (eps 1e-3) → ReLU, the unit every branch is built from."""

    def __init__(self, in_channels: int, out_channels: int, **conv_args: object):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_args)  # type: ignore[arg-type]
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class InceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1→5x5 | 1x1→3x3→3x3 | avgpool→1x1."""

    def __init__(self, in_channels: int, pool_features: int, width: int):
        super().__init__()
        c = lambda n: scaled(n, width)  # noqa: E731
        self.branch1x1 = BasicConv2d(in_channels, c(64), kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, c(48), kernel_size=1)
        self.branch5x5_2 = BasicConv2d(c(48), c(64), kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, c(64), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(c(64), c(96), kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(c(96), c(96), kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, c(pool_features), kernel_size=1)
        self.out_channels = c(64) + c(64) + c(96) + c(pool_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """Grid reduction 35→17: strided 3x3 | 1x1→3x3→strided 3x3 | max-pool."""

    def __init__(self, in_channels: int, width: int):
        super().__init__()
        c = lambda n: scaled(n, width)  # noqa: E731
        self.branch3x3 = BasicConv2d(in_channels, c(384), kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, c(64), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(c(64), c(96), kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(c(96), c(96), kernel_size=3, stride=2)
        self.out_channels = c(384) + c(96) + in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convs (1x7 and 7x1)."""

    def __init__(self, in_channels: int, channels_7x7: int, width: int):
        super().__init__()
        c = lambda n: scaled(n, width)  # noqa: E731
        c7 = c(channels_7x7)
        self.branch1x1 = BasicConv2d(in_channels, c(192), kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, c(192), kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, c(192), kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, c(192), kernel_size=1)
        self.out_channels = 4 * c(192)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        bd = self.branch7x7dbl_3(self.branch7x7dbl_2(bd))
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(bd))
        bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    """Grid reduction 17→8: 1x1→strided 3x3 | 1x1→1x7→7x1→strided 3x3 | max-pool."""

    def __init__(self, in_channels: int, width: int):
        super().__init__()
        c = lambda n: scaled(n, width)  # noqa: E731
        self.branch3x3_1 = BasicConv2d(in_channels, c(192), kernel_size=1)
        self.branch3x3_2 = BasicConv2d(c(192), c(320), kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, c(192), kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(c(192), c(192), kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(c(192), c(192), kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(c(192), c(192), kernel_size=3, stride=2)
        self.out_channels = c(320) + c(192) + in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_2(self.branch7x7x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(b7))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class InceptionE(nn.Module):
    """8x8 block whose 3x3 branches split again into parallel 1x3 and 3x1 convs."""

    def __init__(self, in_channels: int, width: int):
        super().__init__()
        c = lambda n: scaled(n, width)  # noqa: E731
        self.branch1x1 = BasicConv2d(in_channels, c(320), kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, c(384), kernel_size=1)
        self.branch3x3_2a = BasicConv2d(c(384), c(384), kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(c(384), c(384), kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, c(448), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(c(448), c(384), kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(c(384), c(384), kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(c(384), c(384), kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, c(192), kernel_size=1)
        self.out_channels = c(320) + 4 * c(384) + c(192)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([b1, b3, bd, bp], 1)


class InceptionAux(nn.Module):
    """Auxiliary classifier on the 17x17 grid (a training-time regulariser)."""

    def __init__(self, in_channels: int, num_classes: int, width: int):
        super().__init__()
        c = lambda n: scaled(n, width)  # noqa: E731
        self.conv0 = BasicConv2d(in_channels, c(128), kernel_size=1)
        self.conv1 = BasicConv2d(c(128), c(768), kernel_size=5)
        self.fc = nn.Linear(c(768), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(x, kernel_size=5, stride=3)
        x = self.conv1(self.conv0(x))
        x = F.adaptive_avg_pool2d(x, (1, 1))
        return self.fc(torch.flatten(x, 1))


class Inception3(nn.Module):
    def __init__(self, num_classes: int = 1000, aux_logits: bool = False, transform_input: bool = False,
                 dropout: float = 0.0, width: int = 64):
        super().__init__()
        c = lambda n: scaled(n, width)  # noqa: E731
        self.transform_input = transform_input
        self.Conv2d_1a_3x3 = BasicConv2d(3, c(32), kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(c(32), c(32), kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(c(32), c(64), kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(c(64), c(80), kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(c(80), c(192), kernel_size=3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = InceptionA(c(192), pool_features=32, width=width)
        self.Mixed_5c = InceptionA(self.Mixed_5b.out_channels, pool_features=64, width=width)
        self.Mixed_5d = InceptionA(self.Mixed_5c.out_channels, pool_features=64, width=width)
        self.Mixed_6a = InceptionB(self.Mixed_5d.out_channels, width=width)
        self.Mixed_6b = InceptionC(self.Mixed_6a.out_channels, channels_7x7=128, width=width)
        self.Mixed_6c = InceptionC(self.Mixed_6b.out_channels, channels_7x7=160, width=width)
        self.Mixed_6d = InceptionC(self.Mixed_6c.out_channels, channels_7x7=160, width=width)
        self.Mixed_6e = InceptionC(self.Mixed_6d.out_channels, channels_7x7=192, width=width)
        self.AuxLogits = InceptionAux(self.Mixed_6e.out_channels, num_classes, width) if aux_logits else None
        self.Mixed_7a = InceptionD(self.Mixed_6e.out_channels, width=width)
        self.Mixed_7b = InceptionE(self.Mixed_7a.out_channels, width=width)
        self.Mixed_7c = InceptionE(self.Mixed_7b.out_channels, width=width)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(self.Mixed_7c.out_channels, num_classes)
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        """torchvision's initialisation of one module: truncated N(0, 0.1) weights, the aux classifier's at 0.001.

        Per module (the convention :mod:`pipeshift.materialize` calls), so a rank building only
        its stages initialises them as a whole-model build does.
        """
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            aux = self.AuxLogits is not None and m is self.AuxLogits.fc
            nn.init.trunc_normal_(m.weight, mean=0.0, std=0.001 if aux else 0.1, a=-2.0, b=2.0)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def _normalize_like_imagenet(self, x: torch.Tensor) -> torch.Tensor:
        """Map ImageNet-normalised input to the [-1, 1] scaling the original weights expect."""
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        channels = [torch.unsqueeze(x[:, i], 1) * (std[i] / 0.5) + (mean[i] - 0.5) / 0.5 for i in range(3)]
        return torch.cat(channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.transform_input:
            x = self._normalize_like_imagenet(x)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.maxpool1(x)
        x = self.maxpool2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6a(x)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))
        aux = self.AuxLogits(x) if self.AuxLogits is not None and self.training else None
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        x = self.dropout(self.avgpool(x))
        logits = self.fc(torch.flatten(x, 1))
        return logits if aux is None else (logits, aux)


class AuxCrossEntropy(nn.Module):
    """Cross entropy of the main logits plus 0.4x that of the auxiliary ones, when present."""

    def __init__(self, aux_weight: float = AUX_WEIGHT):
        super().__init__()
        self.aux_weight = aux_weight
        self.cross_entropy = nn.CrossEntropyLoss()

    def forward(self, output: torch.Tensor | tuple[torch.Tensor, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(output, (tuple, list)):
            logits, aux = output
            return self.cross_entropy(logits, target) + self.aux_weight * self.cross_entropy(aux, target)
        return self.cross_entropy(output, target)


def inception_v3(*, num_classes: int = 1000, width: int = 64, image_size: int = 299, aux_logits: bool = False,
                 transform_input: bool = False, dropout: float = 0.0, data: str = "synthetic") -> ModelBundle:
    """Inception-v3 (torchvision layout); ``data`` is ``"synthetic"`` or ``"digits"``."""
    check_int("num_classes", num_classes)
    check_int("width", width)
    aux_logits = check_bool("aux_logits", aux_logits)
    check_image_size("inception_v3" + (" with aux_logits" if aux_logits else ""), image_size,
                     MIN_IMAGE_SIZE_AUX if aux_logits else MIN_IMAGE_SIZE)
    model = Inception3(num_classes=num_classes, aux_logits=aux_logits, transform_input=check_bool("transform_input", transform_input),
                       dropout=check_prob("dropout", dropout), width=width)
    criterion = AuxCrossEntropy if aux_logits else nn.CrossEntropyLoss
    return image_bundle(model, in_channels=3, image_size=image_size, num_classes=num_classes, data=data,
                        criterion=criterion)
