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


MLP = {"callable": "pipeshift.models:mlp", "kwargs": {"in_features": 8, "width": 16, "depth": 3, "num_classes": 4},
       "seed": 3}


def mlp_plan(stages: list[tuple[list[str], int]]) -> dict:
    out, rank = [], 0
    for i, (nodes, tp) in enumerate(stages):
        out.append({"stage_id": i, "nodes": nodes, "replicas": 1, "tp": tp, "ranks": list(range(rank, rank + tp))})
        rank += tp
    return {"version": 1, "graph": "graph.txt", "model": MLP, "batch_size": 4, "stages": out}


@pytest.mark.timeout(900)  # two ranks on two shared cores
def test_codegen_writes_the_tp_plan_and_refuses_a_cut_between_a_pair(tmp_path) -> None:
    from pipeshift.codegen import render_package
    from helpers import assert_same_weights, final_weights
    from test_runtime import reference_accumulate, sgd
    from test_tp import train

    # zoo MLP, depth 3: node1 input, node2 layers.0, node3 ReLU, node4 layers.2, node5 ReLU, node6 layers.4
    with pytest.raises(PipeshiftError, match="layers.0 .column-parallel, stage 0. feeds stage 1"):
        render_package(mlp_plan([(["node1", "node2", "node3"], 2), (["node4", "node5", "node6"], 1)]))
    rendered = render_package(mlp_plan([(["node1", "node2", "node3", "node4", "node5", "node6"], 2)]))
    conf = json.loads(rendered.files["conf.json"])
    assert conf["stage_to_tp_degree"] == {"0": 2}
    assert conf["tp_plan"] == {"layers.0": "colwise", "layers.2": "rowwise"}
    assert "2 modules sharded" in rendered.tp_plan.describe()
    from pipeshift.codegen.package import write_package

    pkg = write_package(rendered, tmp_path / "pkg")
    (tmp_path / "mods").mkdir()
    train(tmp_path, pkg, 2, "--schedule", "flush", "--microbatches", "2", "--steps", "2", "--lr", "0.05",
          "--momentum", "0.9", "--checkpoint-dir", str(tmp_path / "ck"))
    assert_same_weights(final_weights(tmp_path / "ck"), reference_accumulate(MLP, 2, 2, 4, sgd()))


def test_conf_json_tensor_parallel_fields_are_checked(tmp_path) -> None:
    from pipeshift.errors import InputFileError
    from pipeshift.runtime.package import parse_tensor_parallel

    ranks = {0: [0, 1], 1: [2]}
    path = tmp_path / "conf.json"
    assert parse_tensor_parallel({"stage_to_tp_degree": {"0": 2}, "tp_plan": {"a": "colwise"}}, path, ranks) == (
        {0: 2}, {"a": "colwise"})
    for bad, message in [({"stage_to_tp_degree": {"1": 2}, "tp_plan": {"a": "colwise"}}, "dividing"),
                         ({"stage_to_tp_degree": {"7": 2}}, "not a stage"),
                         ({"stage_to_tp_degree": {"0": 2}, "tp_plan": {"a": "__import__('os')"}}, "unknown styles"),
                         ({"stage_to_tp_degree": {"0": 2}, "tp_plan": {}}, "shards nothing")]:
        with pytest.raises(InputFileError, match=message):
            parse_tensor_parallel(bad, path, ranks)


def test_a_block_kept_whole_records_its_sharded_share() -> None:
    """A traced block left as one node (a decoder layer under a leaf policy) carries the share of
    its weights the plan shards and its row-parallel count, for the planner to price it."""

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, Block) or super().is_leaf_module(m, qualname)

    model = nn.Sequential(Block(), nn.Linear(16, 16))
    gm = torch.fx.GraphModule(model, Tracer().trace(model))
    plan = T.with_leaves(T.TPPlan(T.expand({"0.attn.*": "colwise", "0.attn.o": "rowwise", "0.up": "colwise",
                                            "0.gate": "colwise", "0.down": "rowwise"}, model, strict=True), "test"),
                         model, gm)
    block = model[0]
    split = sum(p.numel() for m in (block.attn.q, block.attn.k, block.attn.v, block.attn.o, block.up, block.gate,
                                    block.down) for p in m.parameters())
    want = split / sum(p.numel() for p in block.parameters())
    assert plan.leaves == {"0": {"sharded_fraction": pytest.approx(want), "row_parallel": 2.0}}
    assert T.to_json(plan)["leaves"]["0"]["row_parallel"] == 2.0
