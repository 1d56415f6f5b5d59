"""A GNMT-style LSTM encoder–decoder with attention (the GNMT v2 layout PipeDream trains).

Encoder: embedding; a bidirectional LSTM; a unidirectional LSTM over its concatenated
directions; then ``depth - 2`` LSTMs, each around a residual. Decoder: embedding; a first LSTM
whose outputs query additive (Bahdanau) attention over the encoder's outputs; ``depth - 1``
LSTMs that each read the previous layer's output concatenated with the attention context, with
residuals from the third layer on; a linear classifier over the vocabulary.

Training uses teacher forcing, so attention is computed for all target positions at once from
the first decoder layer's outputs (GNMT v2's simplification) and the whole forward is a static
graph with no Python loop over time steps: torch.fx traces it, and every LSTM is one graph node.
Inputs are two int64 tensors, ``(B, S)`` source tokens and ``(B, T)`` decoder-input tokens;
the output is ``(B, T, vocab)`` logits. No padding: sequences have a fixed length.

Knobs: ``vocab_size`` (32320 as in PipeDream's GNMT), ``width`` (hidden size, 1024), ``depth``
(layers per encoder and decoder, 4; PipeDream's GNMT-8 is 8), ``seq_len``, ``dropout`` (0, so
forward is deterministic; GNMT uses 0.2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeshift.models.common import check_int, check_prob
from pipeshift.models.data import reversal_batches
from pipeshift.models.sequences import default_vocab, sequence_bundle
from pipeshift.spec import ModelBundle

GNMT_VOCAB = 32320


class AdditiveAttention(nn.Module):
    """Bahdanau attention: score(q, k) = v · tanh(W_q q + W_k k), softmax over source positions."""

    def __init__(self, query_size: int, key_size: int, units: int):
        super().__init__()
        self.linear_q = nn.Linear(query_size, units, bias=False)
        self.linear_k = nn.Linear(key_size, units, bias=False)
        self.linear_att = nn.Linear(units, 1, bias=False)

    def forward(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``query (B, T, Q)``, ``keys (B, S, K)`` → context ``(B, T, K)``."""
        energy = torch.tanh(self.linear_q(query).unsqueeze(2) + self.linear_k(keys).unsqueeze(1))  # (B, T, S, U)
        weights = F.softmax(self.linear_att(energy).squeeze(-1), dim=-1)  # (B, T, S)
        return torch.bmm(weights, keys)


class Encoder(nn.Module):
    def __init__(self, vocab_size: int, width: int, depth: int, dropout: float):
        super().__init__()
        self.embedder = nn.Embedding(vocab_size, width)
        self.dropout = nn.Dropout(dropout)
        layers = [nn.LSTM(width, width, batch_first=True, bidirectional=True),
                  nn.LSTM(2 * width, width, batch_first=True)]
        layers += [nn.LSTM(width, width, batch_first=True) for _ in range(depth - 2)]
        self.rnn_layers = nn.ModuleList(layers)

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.embedder(source))
        x = self.rnn_layers[0](x)[0]
        x = self.rnn_layers[1](self.dropout(x))[0]
        for layer in self.rnn_layers[2:]:
            x = x + layer(self.dropout(x))[0]
        return x


class RecurrentAttention(nn.Module):
    """The decoder's first LSTM and the attention its outputs drive."""

    def __init__(self, width: int):
        super().__init__()
        self.rnn = nn.LSTM(width, width, batch_first=True)
        self.attn = AdditiveAttention(width, width, width)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.rnn(x)[0]
        return out, self.attn(out, memory)


class Decoder(nn.Module):
    def __init__(self, vocab_size: int, width: int, depth: int, dropout: float):
        super().__init__()
        self.embedder = nn.Embedding(vocab_size, width)
        self.dropout = nn.Dropout(dropout)
        self.att_rnn = RecurrentAttention(width)
        self.rnn_layers = nn.ModuleList(nn.LSTM(2 * width, width, batch_first=True) for _ in range(depth - 1))
        self.classifier = nn.Linear(width, vocab_size)

    def forward(self, target_in: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.embedder(target_in))
        x, context = self.att_rnn(x, memory)
        x = self.rnn_layers[0](torch.cat([self.dropout(x), context], 2))[0]
        for layer in self.rnn_layers[1:]:
            x = x + layer(torch.cat([self.dropout(x), context], 2))[0]
        return self.classifier(x)


class GNMT(nn.Module):
    def __init__(self, vocab_size: int = GNMT_VOCAB, width: int = 1024, depth: int = 4, dropout: float = 0.0):
        super().__init__()
        self.encoder = Encoder(vocab_size, width, depth, dropout)
        self.decoder = Decoder(vocab_size, width, depth, dropout)

    def forward(self, source: torch.Tensor, target_in: torch.Tensor) -> torch.Tensor:
        return self.decoder(target_in, self.encoder(source))


def gnmt(*, vocab_size: int | None = None, width: int = 1024, depth: int = 4, seq_len: int = 50,
         dropout: float = 0.0, data: str = "synthetic") -> ModelBundle:
    """GNMT; inputs ``(source, target_in)``, both ``(B, seq_len)`` int64; target ``(B, seq_len)``.

    The task is to output the source reversed (``data="text"``: windows of scikit-learn's
    English text, 98-symbol vocabulary by default; ``data="synthetic"``: uniform random tokens).
    Reversal puts the token a target position needs at the far end of the source, so it cannot
    be learned without attention and the encoder's backward direction.
    """
    vocab = check_int("vocab_size", default_vocab(vocab_size, data, GNMT_VOCAB))
    check_int("width", width)
    check_int("depth", depth, minimum=2)
    check_int("seq_len", seq_len)
    model = GNMT(vocab_size=vocab, width=width, depth=depth, dropout=check_prob("dropout", dropout))
    return sequence_bundle(model, task=reversal_batches, window=seq_len, vocab_size=vocab, data=data)
