"""Losses users name with ``--loss`` (besides any ``torch.nn`` loss class).

``pipeshift.losses:causal_lm`` is the language-modelling loss on logits, so a Hugging Face
causal LM whose forward returns ``logits`` (``pipeshift.hf:auto``) trains as
``model(input_ids, labels=...)`` would: token cross-entropy, mean over the tokens that count.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pipeshift.errors import PipeshiftError


class CausalLMLoss(nn.Module):
    """Cross-entropy of ``(B, T, V)`` logits against ``(B, T)`` token ids.

    ``shift=False``: the target is already the next token of each position (what
    :func:`pipeshift.data.text_file` yields). ``shift=True``: the target is the input ids
    themselves (Hugging Face's ``labels``), so position ``t`` predicts target ``t + 1`` and the last
    position predicts nothing. Positions whose target is ``ignore_index`` do not count.
    """

    def __init__(self, shift: bool = False, ignore_index: int = -100):
        super().__init__()
        self.shift = shift
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.shift:
            logits, target = logits[:, :-1], target[:, 1:]
        if logits.shape[:-1] != target.shape:
            raise PipeshiftError(f"causal_lm loss: logits {list(logits.shape)} do not match target "
                                 f"{list(target.shape)} (expected (B, T, V) and (B, T))")
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                               ignore_index=self.ignore_index)

    def extra_repr(self) -> str:
        return f"shift={self.shift}, ignore_index={self.ignore_index}"


def causal_lm(shift: bool = False, ignore_index: int = -100) -> CausalLMLoss:
    """``--loss pipeshift.losses:causal_lm [--loss-arg shift=true]``."""
    if isinstance(shift, str) and shift.lower() in ("true", "false"):
        shift = shift.lower() == "true"
    if not isinstance(shift, bool):
        raise PipeshiftError(f"shift={shift!r}: expected true or false")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise PipeshiftError(f"ignore_index={ignore_index!r}: expected an integer")
    return CausalLMLoss(shift, ignore_index)
