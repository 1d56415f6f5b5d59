"""TP plans: the model's own (Hugging Face configs), the user's (--tp-plan), the generic graph rule."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeshift import tp_plan as T
from pipeshift.errors import PipeshiftError


class Attention(nn.Module):
    def __init__(self, width=16, head_dim=4):
        super().__init__()
        self.head_dim = head_dim
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.o = nn.Linear(width, width)

    def forward(self, x):
        b, t = x.size(0), x.size(1)
        q, k, v = (p(x).view(b, t, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attn = Attention(width)
        self.gate = nn.Linear(width, 32)
        self.up = nn.Linear(width, 32)
        self.down = nn.Linear(32, width)
        self.fused = nn.Linear(width, 3 * width)  # packed: its split is not by heads, so it stays whole
        self.out = nn.Linear(3 * width, width)

    def forward(self, x):
        x = x + self.attn(self.norm(x))
        x = x + self.down(F.silu(self.gate(x)) * self.up(x))
        h = self.fused(x).unflatten(-1, (3, 4, -1)).flatten(-3)
        return x + self.out(h)


def test_generic_rule_finds_attention_and_mlp_pairs_only() -> None:
    model = Block()
    gm = torch.fx.symbolic_trace(model)
    plan = T.generic_plan(gm, model)
    assert plan == {"attn.q": "colwise", "attn.k": "colwise", "attn.v": "colwise", "attn.o": "rowwise",
                    "gate": "colwise", "up": "colwise", "down": "rowwise"}
    resolved = T.resolve(model, gm, None)
    assert resolved.source.startswith("the generic rule") and "attn.*" not in resolved.describe()
    assert "7 modules sharded" in resolved.describe()


def test_hugging_face_llama_brings_its_own_plan() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(cfg)
    plan = T.resolve(model, None, None)
    assert "LlamaConfig.base_model_tp_plan" in plan.source
    assert plan.modules["model.layers.1.self_attn.q_proj"] == "colwise"
    assert plan.modules["model.layers.0.mlp.down_proj"] == "rowwise"
    assert plan.modules["lm_head"] == "colwise_gather_output"
    assert len(plan.sharded()) == 2 * 7 + 1


def test_user_rules_patterns_files_and_errors(tmp_path) -> None:
    model = Block()
    rules = T.parse_rules(["attn.*=colwise", "attn.o=rowwise"])
    assert T.resolve(model, None, rules).modules == {"attn.q": "colwise", "attn.k": "colwise", "attn.v": "colwise",
                                                     "attn.o": "rowwise"}
    f = tmp_path / "tp.json"
    f.write_text(json.dumps({"gate": "colwise", "down": "rowwise"}))
    assert T.resolve(model, None, T.parse_rules([str(f)])).modules == {"gate": "colwise", "down": "rowwise"}
    assert T.parse_rules(["generic"]) == {}
    with pytest.raises(PipeshiftError, match="matches no module"):
        T.resolve(model, None, {"nothing.*": "colwise"})
    with pytest.raises(PipeshiftError, match="unknown style"):
        T.parse_rules(["gate=diagonal"])
    with pytest.raises(PipeshiftError, match="shards only Linear"):
        T.resolve(model, None, {"norm": "colwise"})
