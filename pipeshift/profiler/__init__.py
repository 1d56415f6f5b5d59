"""The profiler step: per-node time and sizes of a model into graph.txt + profile.json.

:func:`profile_model` measures one model at one batch size (see :mod:`pipeshift.profiler.timing`
for how backward time is attributed to nodes); :mod:`pipeshift.profiler.cli` is
``pipeshift profile``.
"""

from pipeshift.profiler.profile import ModelProfile, NodeProfile, profile_model
from pipeshift.profiler.timing import Stats

__all__ = ["ModelProfile", "NodeProfile", "Stats", "profile_model"]
