"""The bundle plumbing shared by the image classifiers (AlexNet, VGG, ResNet, Inception)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pipeshift.errors import PipeshiftError
from pipeshift.models import data as datasets
from pipeshift.models.common import DataSource, check_int, make_bundle
from pipeshift.spec import ModelBundle


def check_image_size(model_name: str, image_size: int, minimum: int) -> int:
    check_int("image_size", image_size)
    if image_size < minimum:
        raise PipeshiftError(f"{model_name} needs image_size >= {minimum} (its pooling shrinks it to nothing), got {image_size}")
    return image_size


def image_bundle(
    model: nn.Module,
    *,
    in_channels: int,
    image_size: int,
    num_classes: int,
    data: str,
    criterion: Callable[[], nn.Module] = nn.CrossEntropyLoss,
) -> ModelBundle:
    """Inputs ``(B, in_channels, image_size, image_size)`` float32; labels ``(B,)`` int64.

    ``data="synthetic"``: standard-normal images, uniform labels. ``data="digits"``: scikit-learn's
    handwritten digits, upsampled and replicated to the input shape (see
    :mod:`pipeshift.models.data`).
    """
    shape = (in_channels, image_size, image_size)

    def random_images(batch_size: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        return (torch.randn((batch_size, *shape), generator=g),)

    def digits() -> DataSource:
        datasets.check_digits_classes(num_classes)
        return datasets.digits_images(in_channels, image_size)

    return make_bundle(
        model,
        data=data,
        synthetic=datasets.synthetic_classification(random_images, num_classes),
        real={"digits": digits},
        criterion=criterion,
    )
