"""A GPT-style decoder-only Transformer language model (GPT-2's layout, pre-LayerNorm).

Token and position embeddings (``wte``, ``wpe``), ``depth`` blocks ``h.N`` of causal
self-attention and a GELU MLP, each behind a LayerNorm and around a residual, a final LayerNorm
``ln_f`` and a vocabulary head ``lm_head``. At the defaults (``width=768``, ``depth=12``,
``heads=12``, ``vocab_size=50257``, ``block_size=1024``, ``tie_weights=True``) the parameter count
is GPT-2 small's. The head is untied by default: a pipeline puts the embedding and the head on
different stages, and a weight shared across stages is not something the runtime synchronises.

Attention is written with plain tensor ops and ``F.scaled_dot_product_attention(is_causal=True)``
so torch.fx traces it at leaf-module granularity (the projections are graph nodes).
Dropout defaults to 0 so forward is deterministic.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeshift.errors import PipeshiftError
from pipeshift.models.common import check_bool, check_int, check_prob
from pipeshift.models.data import next_token_batches
from pipeshift.models.sequences import default_vocab, sequence_bundle
from pipeshift.spec import ModelBundle

GPT2_VOCAB = 50257


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.c_attn = nn.Linear(width, 3 * width)  # queries, keys and values in one matmul
        self.c_proj = nn.Linear(width, width)
        self.c_proj.residual_projection = True  # GPT-2 shrinks the init of projections into the residual
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, T, 3*C) -> (3, B, heads, T, C/heads)
        qkv = self.c_attn(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).flatten(2)))


class MLP(nn.Module):
    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * width, width)
        self.c_proj.residual_projection = True
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, dropout)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int = GPT2_VOCAB, block_size: int = 1024, width: int = 768, depth: int = 12,
                 heads: int = 12, dropout: float = 0.0, tie_weights: bool = False):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, width)
        self.wpe = nn.Embedding(block_size, width)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(Block(width, heads, dropout) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab_size, bias=False)
        self.residual_std = 0.02 / math.sqrt(2 * depth)
        self.apply(self._init_weights)
        if tie_weights:
            self.lm_head.weight = self.wte.weight

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2's initialisation of one module: N(0, 0.02), residual projections shrunk by sqrt(2 * depth).

        Per module (the convention :mod:`pipeshift.materialize` calls), so a rank that builds only
        its stages initialises them exactly as a whole-model build does.
        """
        if isinstance(module, (nn.Linear, nn.Embedding)):
            residual = isinstance(module, nn.Linear) and getattr(module, "residual_projection", False)
            nn.init.normal_(module.weight, 0.0, self.residual_std if residual else 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.size(1), device=tokens.device)
        x = self.drop(self.wte(tokens) + self.wpe(positions))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def gpt(*, vocab_size: int | None = None, width: int = 768, depth: int = 12, heads: int = 12,
        block_size: int = 1024, seq_len: int | None = None, dropout: float = 0.0, tie_weights: bool = False,
        data: str = "synthetic") -> ModelBundle:
    """GPT language model; inputs ``(B, seq_len)`` int64 tokens, logits ``(B, seq_len, vocab)``.

    ``data="text"``: next-character prediction on scikit-learn's English text (vocabulary
    defaults to its 98 symbols); ``data="synthetic"``: uniform random tokens. ``seq_len``
    defaults to ``block_size``.
    """
    vocab = check_int("vocab_size", default_vocab(vocab_size, data, GPT2_VOCAB))
    check_int("width", width)
    check_int("depth", depth)
    check_int("heads", heads)
    check_int("block_size", block_size)
    if width % heads:
        raise PipeshiftError(f"width={width} must be a multiple of heads={heads}")
    length = check_int("seq_len", block_size if seq_len is None else seq_len)
    if length > block_size:
        raise PipeshiftError(f"seq_len={length} exceeds block_size={block_size} (no position embedding beyond it)")
    model = GPT(vocab_size=vocab, block_size=block_size, width=width, depth=depth, heads=heads,
                dropout=check_prob("dropout", dropout), tie_weights=check_bool("tie_weights", tie_weights))
    return sequence_bundle(model, task=next_token_batches, window=length + 1, vocab_size=vocab, data=data)
