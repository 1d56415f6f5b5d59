"""A tiny Hugging Face Llama and hand-written stage packages for the tensor-parallel tests.

The model is ``transformers``' own ``LlamaModel`` (4 heads, 2 key/value heads, width 32) under a
vocabulary head, so sharding runs through Hugging Face's attention code (grouped-query heads,
rotary embeddings, ``view(..., -1, head_dim)``). The packages follow CONTRIBUTING.md's contract:
stage modules adopt the model's submodules under their original FQNs.
"""

from __future__ import annotations

import json
from pathlib import Path

LLAMA_MODULE = '''
import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel

from pipeshift.spec import ModelBundle

VOCAB, SEQ = 64, 8


class TinyLlamaLM(nn.Module):
    def __init__(self, layers):
        super().__init__()
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(32, VOCAB, bias=False)

    def forward(self, ids):
        return self.lm_head(self.model(input_ids=ids).last_hidden_state)


class TokenLoss(nn.Module):
    def forward(self, logits, target):
        return nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())


def data(batch_size, split, seed):
    g = torch.Generator().manual_seed(seed * 2 + (split != "train"))
    while True:
        ids = torch.randint(0, VOCAB, (batch_size, SEQ + 1), generator=g)
        yield (ids[:, :-1],), ids[:, 1:]


def build(layers=2):
    return ModelBundle(model=TinyLlamaLM(layers), example_inputs=lambda b: (torch.zeros(b, SEQ, dtype=torch.long),),
                       criterion=TokenLoss, example_target=lambda b: torch.zeros(b, SEQ, dtype=torch.long), data=data)


class Layers(nn.Module):
    """Decoder layers ``first .. last-1`` (and, on the last stage, the final norm and the head)."""

    def __init__(self, model, first, last, embed=False, head=False):
        super().__init__()
        self.model = nn.Module()
        if embed:
            self.model.embed_tokens = model.model.embed_tokens
        self.model.rotary_emb = model.model.rotary_emb
        self.model.layers = nn.Module()
        for i in range(first, last):
            self.model.layers.add_module(str(i), model.model.layers[i])
        self.range = (first, last)
        self.head = head
        if head:
            self.model.norm = model.model.norm
            self.lm_head = model.lm_head

    def forward(self, h):
        if hasattr(self.model, "embed_tokens"):
            h = self.model.embed_tokens(h)
        pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        pe = self.model.rotary_emb(h, pos)
        for i in range(*self.range):
            h = getattr(self.model.layers, str(i))(h, position_embeddings=pe, position_ids=pos)
        if self.head:
            h = self.lm_head(self.model.norm(h))
        return (h,)
'''

INIT = '''
import json
import pathlib

from pipeshift.spec import ModelSpec
from tp_test_llama import Layers

_HERE = pathlib.Path(__file__).parent
CUTS = {cuts!r}


def arch():
    return "tiny llama"


def full_model():
    plan = json.loads((_HERE / "plan.json").read_text())
    return ModelSpec.from_json(plan["model"]).build().model


def model(criterion, original=None):
    m = original if original is not None else full_model()
    bounds = [0, *CUTS, {layers}]
    out = []
    for s, (a, b) in enumerate(zip(bounds, bounds[1:])):
        last = s == len(bounds) - 2
        out.append((Layers(m, a, b, embed=s == 0, head=last), ["input0" if s == 0 else f"h{{a}}"],
                    ["logits" if last else f"h{{b}}"]))
    out.append((criterion, ["logits", "target"], ["loss"]))
    return out
'''

LLAMA_SPEC = {"callable": "tp_test_llama:build", "kwargs": {"layers": 2}, "seed": 7}


def llama_tp_plan(layers: int, head: bool = True) -> dict[str, str]:
    """Hugging Face's own plan for Llama (``LlamaConfig.base_model_tp_plan``) expanded per layer."""
    from transformers import LlamaConfig

    plan = {}
    for i in range(layers):
        for pattern, style in LlamaConfig.base_model_tp_plan.items():
            plan["model." + pattern.replace("*", str(i))] = style
    if head:
        plan["lm_head"] = "colwise_gather_output"
    return plan


def write_llama_package(out: Path, cuts: list[int], ranks: list[list[int]], tp: dict[int, int] | None = None,
                        layers: int = 2, batch_size: int = 2, tp_plan: dict[str, str] | None = None) -> Path:
    """A stage package over the tiny Llama, cut before the given layer numbers."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "__init__.py").write_text(INIT.format(cuts=list(cuts), layers=layers))
    k = len(cuts) + 1
    conf = {"module_to_stage_map": list(range(k)) + [k - 1],
            "stage_to_rank_map": {str(s): r for s, r in enumerate(ranks)}}
    if tp:
        conf["stage_to_tp_degree"] = {str(s): t for s, t in tp.items()}
        conf["tp_plan"] = tp_plan if tp_plan is not None else llama_tp_plan(layers)
    (out / "conf.json").write_text(json.dumps(conf, indent=1))
    spec = {**LLAMA_SPEC, "kwargs": {"layers": layers}}
    (out / "plan.json").write_text(json.dumps({"version": 1, "batch_size": batch_size, "model": spec}))
    return out


def install_llama_module(mods: Path) -> None:
    mods.mkdir(parents=True, exist_ok=True)
    (mods / "tp_test_llama.py").write_text(LLAMA_MODULE)
