"""The model zoo, written in this project (no torchvision at run time).

Every entry is a callable taking keyword size knobs and returning a
:class:`~pipeshift.spec.ModelBundle` (model, example inputs, loss, data), so
``pipeshift profile pipeshift.models:resnet50 --model-arg width=16`` needs no other flag.
Where torchvision has the model, module names and parameter shapes at the default size are
torchvision's, so its state_dicts load. Common knobs: ``width`` (channels or hidden size; the
default is the published model's), ``depth`` (layers, for GPT, GNMT, MLP), ``num_classes``,
``image_size``, ``seq_len``, ``vocab_size``, ``dropout`` (0 by default, so forward is
deterministic) and ``data`` (``"synthetic"``, or the small real dataset: ``"digits"`` for image
models and the MLP, ``"text"`` for GPT and GNMT — see :mod:`pipeshift.models.data`).
"""

from pipeshift.models.alexnet import alexnet
from pipeshift.models.gnmt import gnmt
from pipeshift.models.gpt import gpt
from pipeshift.models.inception import inception_v3
from pipeshift.models.mlp import mlp
from pipeshift.models.resnet import resnet18, resnet50, resnet152
from pipeshift.models.vgg import vgg16

ZOO = {
    "alexnet": alexnet,
    "vgg16": vgg16,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "resnet152": resnet152,
    "inception_v3": inception_v3,
    "gnmt": gnmt,
    "gpt": gpt,
    "mlp": mlp,
}

__all__ = ["ZOO", *ZOO]
