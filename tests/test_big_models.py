"""Models bigger than one worker: ranks build only their stages, read only their tensors, export by streaming.

In-process tests build models on the meta device and materialise parts of them; the
multi-process ones train a tiny codegen package on 2 and 3 ranks and compare with
single-process training built the same way (``ModelSpec.build``). Every run has a hard timeout.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import repartition_helpers as h
from pipeshift.errors import PipeshiftError
from pipeshift.materialize import build_deferred, materialize
from pipeshift.runtime import checkpoint as ckpt
from pipeshift.spec import ModelSpec
from pipeshift.weights import INDEX, load_into, open_weights

SPECS = [
    ModelSpec("pipeshift.models:gpt", {"vocab_size": 31, "width": 16, "depth": 3, "heads": 2, "block_size": 8,
                                       "tie_weights": True}, seed=5),
    ModelSpec("pipeshift.models:resnet18", {"width": 4, "num_classes": 5}, seed=2),
    h.SPEC,
]


def _groups(model: nn.Module, n: int) -> list[list[str]]:
    """The model's top-level children dealt into ``n`` contiguous groups (a stand-in for stages)."""
    names = [name for name, _ in model.named_children()]
    size = -(-len(names) // n)
    return [names[i:i + size] for i in range(0, len(names), size)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.callable.rpartition(":")[2])
def test_each_part_materialised_alone_equals_the_full_build(spec):
    full = spec.build().model.state_dict()
    seen: dict[str, torch.Tensor] = {}
    for group in _groups(spec.build(weights=False).model, 3):
        model = spec.build(weights=False).model
        held = materialize(model, group, seed=spec.seed)
        state = model.state_dict()
        assert held and set(held) <= set(state)
        for key, value in state.items():
            if key in held:
                assert torch.equal(value, full[key]), key
                seen[key] = value
            else:
                assert value.device.type == "meta", f"{key} is real but not in {group}"
    assert set(seen) == set(full)


class Custom(nn.Module):
    """A module that cannot re-create its parameter (no reset_parameters): the constructor's value is kept."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(4))
        self.proj = nn.Linear(4, 4)
        self.register_buffer("table", torch.arange(4.0))

    def forward(self, x):
        return self.proj(x * self.scale + self.table)


class ForgetsBias(nn.Linear):
    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def test_constructor_values_are_kept_and_an_unset_parameter_is_refused():
    a = build_deferred(lambda: nn.Sequential(Custom(), Custom()), {}, seed=1)
    assert a[0].proj.weight.device.type == "meta" and a[0].scale.device.type == "cpu"
    materialize(a, seed=1)
    b = build_deferred(lambda: nn.Sequential(Custom(), Custom()), {}, seed=1)
    materialize(b, ["1"], seed=1)
    for key, value in b.state_dict().items():
        if key.startswith("1."):
            assert torch.equal(value, a.state_dict()[key]), key
        else:
            assert value.device.type == "meta", key
    with pytest.raises(PipeshiftError, match="'bias'.*no defined initial value"):
        materialize(build_deferred(lambda: ForgetsBias(3, 3), {}, seed=0), seed=0)


def _write_sharded(state: dict[str, torch.Tensor], out: Path, shards: int = 2) -> Path:
    out.mkdir(parents=True)
    keys = sorted(state)
    weight_map = {}
    for s in range(shards):
        part = keys[s::shards]
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k].contiguous() for k in part}, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return out


def test_weight_sources_read_only_the_tensors_asked_for(tmp_path):
    state = {k: v.clone() for k, v in SPECS[0].build().model.state_dict().items() if k != "lm_head.weight"}
    sharded = open_weights(_write_sharded(state, tmp_path / "w"))
    model = SPECS[0].build(weights=False).model
    held = materialize(model, ["h.1"], initialize=False)
    load_into(model.state_dict(keep_vars=True), sharded, held)
    assert sorted(sharded.opened) == sorted(held)
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in held)
    # a tied head saved once under the embedding's name loads through its alias
    model = SPECS[0].build(weights=False).model
    held = materialize(model, ["lm_head"], initialize=False)
    from pipeshift.runtime.local import tensor_aliases

    load_into(model.state_dict(keep_vars=True), open_weights(tmp_path / "w"), held, aliases=tensor_aliases(model))
    assert torch.equal(model.lm_head.weight, state["wte.weight"])
    with pytest.raises(PipeshiftError, match="rank 3: --init-from .*no tensor 'nope'"):
        load_into({"nope": torch.zeros(1)}, sharded, who="rank 3")
    bad = dict(state)
    bad["ln_f.weight"] = torch.zeros(7)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(PipeshiftError, match=r"'ln_f.weight' has shape \[7\]"):
        load_into({"ln_f.weight": torch.zeros(16)}, open_weights(tmp_path / "bad.safetensors"))


def _reference_from(state: dict[str, torch.Tensor] | None, steps: int, microbatches: int) -> nn.Module:
    bundle = h.SPEC.build()
    model, crit = bundle.model, bundle.criterion()
    if state is not None:
        model.load_state_dict(state)
    data = bundle.data(h.BATCH, "train", 0) if bundle.data else bundle.synthetic_data(h.BATCH, 0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        for _ in range(microbatches):
            x, y = next(data)
            (crit(model(*x), y) / microbatches).backward()
        opt.step()
        opt.zero_grad()
    return model


def _records(workdir: Path, world: int) -> list[dict]:
    return [json.loads((workdir / "out" / f"rank{r}" / "weights.json").read_text()) for r in range(world)]


def test_three_ranks_build_only_their_stages_and_train_like_one_process(tmp_path):
    h.package(tmp_path, [4, 8], [[0], [1], [2]])
    code, out = h.launch(tmp_path, 3, ["--steps", "3", "--microbatches", "3", "--optimizer", "adam"])
    assert code == 0, out
    held = [set(r["held"]) for r in _records(tmp_path, 3)]
    every = set(h.SPEC.build().model.state_dict())
    assert all(held) and set().union(*held) == every and sum(map(len, held)) == len(every)
    h.assert_same_weights(h.final_weights(tmp_path / "ck"), _reference_from(None, 3, 3))


@pytest.fixture(scope="module")
def loaded_run(tmp_path_factory):
    """Two ranks trained from a sharded safetensors directory of other weights (another seed)."""
    workdir = tmp_path_factory.mktemp("init_from")
    h.package(workdir, [6], [[0], [1]])
    other = ModelSpec(h.SPEC.callable, h.SPEC.kwargs, seed=99).build().model.state_dict()
    _write_sharded(other, workdir / "weights")
    code, out = h.launch(workdir, 2, ["--steps", "2", "--microbatches", "2", "--optimizer", "adam",
                                      "--init-from", "weights"])
    assert code == 0, out
    return workdir, other


def test_init_from_a_sharded_directory_reads_only_owned_tensors(loaded_run):
    workdir, other = loaded_run
    records = _records(workdir, 2)
    for r in records:
        assert r["init"] == "file" and sorted(r["read"]) == sorted(r["held"])
    assert set(records[0]["read"]).isdisjoint(records[1]["read"])
    assert set(records[0]["read"]) | set(records[1]["read"]) == set(other)
    h.assert_same_weights(h.final_weights(workdir / "ck"), _reference_from(other, 2, 2))


def test_a_pipeshift_checkpoint_is_a_weight_source(loaded_run):
    workdir, _ = loaded_run
    source = open_weights(workdir / "ck")
    final = h.final_weights(workdir / "ck")
    assert source.keys() == set(final)
    key = sorted(final)[0]
    assert torch.equal(source.get(key), final[key]) and source.opened == [key]
    assert ckpt.resolve(workdir / "ck") == source.path


def test_a_resuming_rank_hashes_and_reads_only_its_own_stage_files(loaded_run, tmp_path, monkeypatch):
    import shutil

    workdir, _ = loaded_run
    root = tmp_path / "ck"
    shutil.copytree(workdir / "ck", root)
    where = ckpt.resolve(root)
    meta = ckpt.read_meta(where)
    held = meta["stage_keys"]
    assert set(held) == {"stage0.pt", "stage1.pt"} and set(held["stage0.pt"]).isdisjoint(held["stage1.pt"])
    assert set(held["stage0.pt"]) | set(held["stage1.pt"]) == set(h.final_weights(root))
    first = set(held["stage0.pt"])
    assert ckpt.files_for(meta, first, 0) == {"stage0.pt"}
    assert ckpt.files_for({**meta, "stage_keys": None}, first, 0) is None  # an older checkpoint: every file
    hashed: list[str] = []
    real = ckpt.sha256_file
    monkeypatch.setattr(ckpt, "sha256_file", lambda f: hashed.append(f.name) or real(f))
    (where / "stage1.pt").write_bytes(b"damaged")
    assert ckpt.choose(root, lambda m: ckpt.files_for(m, first, 0))[0] == where
    assert hashed == ["stage0.pt"]
    stages = ckpt.stage_files(where, meta, mmap=True, names={"stage0.pt"})  # stage1.pt is not even opened
    assert set(ckpt.assemble_state_dict(stages, where, partial=True)) == first
    with pytest.raises(PipeshiftError, match="stage1.pt.*SHA-256"):
        ckpt.choose(root, lambda m: ckpt.files_for(m, set(held["stage1.pt"]), 1))


def test_init_from_a_checkpoint_hashes_and_reads_only_the_files_a_rank_loads(loaded_run, tmp_path, monkeypatch):
    import shutil

    workdir, _ = loaded_run
    root = tmp_path / "ck"
    shutil.copytree(workdir / "ck", root)
    where = ckpt.resolve(root)
    held = ckpt.read_meta(where)["stage_keys"]
    final = h.final_weights(root)
    hashed: list[str] = []
    real = ckpt.sha256_file
    monkeypatch.setattr(ckpt, "sha256_file", lambda f: hashed.append(f.name) or real(f))
    (where / "stage1.pt").write_bytes(b"damaged")
    source = open_weights(root)  # knows every key from meta.json, opens no stage file
    assert source.keys() == set(final) and hashed == []
    first = sorted(held["stage0.pt"])
    for key in first:
        assert torch.equal(source.get(key), final[key])
    assert hashed == ["stage0.pt"]  # once, before its first read
    with pytest.raises(PipeshiftError, match="stage1.pt.*SHA-256"):
        source.get(held["stage1.pt"][0])


def test_ranks_agree_on_an_older_checkpoint_when_only_one_finds_its_file_damaged(tmp_path):
    """Rank 0 checks only stage0.pt, which is intact; rank 1 finds stage1.pt damaged: both resume from step 1."""
    h.package(tmp_path, [6], [[0], [1]])
    common = ["--microbatches", "2", "--optimizer", "adam", "--checkpoint-every", "1"]
    code, out = h.launch(tmp_path, 2, ["--steps", "2", *common])
    assert code == 0, out
    (tmp_path / "ck" / "step-00000002" / "stage1.pt").write_bytes(b"damaged")
    code, out = h.launch(tmp_path, 2, ["--steps", "3", "--resume", *common])
    assert code == 0, out
    assert "stage1.pt" in out and "previous intact checkpoint step-00000001" in out
    h.assert_same_weights(h.final_weights(tmp_path / "ck"), _reference_from(None, 3, 2))


def test_adam_steps_in_place_by_default_and_matches_the_per_parameter_step():
    """--optimizer adam takes torch's fused step (no parameter-sized temporaries) unless told otherwise."""
    import argparse

    from pipeshift.runtime.cli import optimizer_factory

    def made(*optim_args: str) -> torch.optim.Optimizer:
        args = argparse.Namespace(optimizer="adam", lr=0.01, momentum=None, weight_decay=None,
                                  optim_arg=list(optim_args))
        return optimizer_factory(args)([nn.Parameter(torch.zeros(2))])

    assert made().defaults["fused"] is True and not made("fused=False").defaults["fused"]
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    twin = nn.Linear(8, 4)
    twin.load_state_dict(model.state_dict())
    args = argparse.Namespace(optimizer="adam", lr=0.01, momentum=None, weight_decay=None, optim_arg=[])
    ours, theirs = optimizer_factory(args)(list(model.parameters())), torch.optim.Adam(twin.parameters(), lr=0.01)
    for _ in range(5):
        x = torch.randn(3, 8)
        for m, opt in ((model, ours), (twin, theirs)):
            m(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(a, b, atol=1e-6) and not torch.equal(a, torch.zeros_like(a))


def test_export_picks_the_format_from_the_output_and_round_trips(loaded_run, tmp_path, capsys):
    from safetensors.torch import load_file

    from pipeshift import cli

    workdir, _ = loaded_run
    final = h.final_weights(workdir / "ck")
    total = sum(v.numel() * v.element_size() for v in final.values())
    out = tmp_path / "sharded"
    assert cli.main(["export", str(workdir / "ck"), "-o", f"{out}/", "--max-shard-size", str(total // 3),
                     "--package", str(workdir / "stages")]) == 0
    index = json.loads((out / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and all((out / s).is_file() for s in shards)
    assert set(index["weight_map"]) == set(final)
    assert "checked against" in capsys.readouterr().out
    model = h.SPEC.build(weights=False).model
    held = materialize(model, initialize=False)
    load_into(model.state_dict(keep_vars=True), open_weights(out), held)
    h.assert_same_weights(final, model, rtol=0)
    assert cli.main(["export", str(workdir / "ck"), "-o", str(tmp_path / "one.safetensors")]) == 0
    one = load_file(str(tmp_path / "one.safetensors"))
    assert set(one) == set(final) and all(torch.equal(one[k], final[k]) for k in final)
    assert cli.main(["export", str(workdir / "ck"), "-o", str(tmp_path / "m.pt")]) == 0
    fresh = h.SPEC.build().model
    fresh.load_state_dict(torch.load(tmp_path / "m.pt"))
    h.assert_same_weights(final, fresh, rtol=0)
    assert cli.main(["export", str(workdir / "ck"), "-o", str(tmp_path / "m.onnx")]) == 1
    assert "unknown format '.onnx'" in capsys.readouterr().err


def test_a_repartition_moves_layers_to_a_rank_that_never_had_them(tmp_path):
    """Rank 1 starts with layers 6.. only, receives 3..5 at the switch, and rank 0 frees them."""
    h.package(tmp_path, [6], [[0], [1]])
    later = h.plan(tmp_path, "later", [3], [[0], [1]])
    code, out = h.launch(tmp_path, 2, ["--steps", "3", "--microbatches", "2", "--optimizer", "adam",
                                       "--repartition-at", f"1:{later}"])
    assert code == 0, out
    start = _records(tmp_path, 2)
    moved = [r for r in h.jsonl(tmp_path / "out" / "repartitions.jsonl") if r["event"] == "repartition"]
    assert len(moved) == 1
    assert any(k.startswith("layers.4.") for k in start[0]["held"])
    assert not any(k.startswith("layers.4.") for k in start[1]["held"])
    giver, taker = moved[0]["per_rank"]
    assert giver["bytes_released"] > 0 and taker["bytes_released"] == 0 and taker["keys_received"] > 0
    h.assert_same_weights(h.final_weights(tmp_path / "ck"), _reference_from(None, 3, 2))


def test_a_stage_over_the_memory_size_is_refused_before_anything_is_allocated(tmp_path):
    h.package(tmp_path, [6], [[0], [1]])
    code, out = h.launch(tmp_path, 2, ["--steps", "1", "--microbatches", "2", "--optimizer", "adam",
                                       "--memory-size", "1000"], elastic=["--max-restarts", "0"])
    assert code != 0
    assert "needs an estimated" in out and "--memory-size is 1 kB: refused before allocating" in out, out
    assert not (tmp_path / "out" / "rank0" / "weights.json").exists()


def _graph_lines(path: Path) -> list[str]:
    """graph.txt without the times: node ids, descriptions, activation and parameter sizes, edges."""
    import re

    return [re.sub(r"(forward|backward)_compute_time=[0-9.]+, ", "", line) for line in path.read_text().splitlines()]


def test_profile_per_node_gives_the_whole_profile_structure_and_auto_says_when_it_picks_it(tmp_path, monkeypatch,
                                                                                            capsys):
    from pipeshift import cli
    from pipeshift.profiler import per_node

    spec = ["pipeshift.models:gpt", "--model-arg", "width=16", "--model-arg", "depth=2", "--model-arg", "heads=2",
            "--model-arg", "block_size=8", "--model-arg", "vocab_size=31", "-b", "2", "--iterations", "2",
            "--warmup", "1", "--quiet", "--threads", "1"]
    assert cli.main(["profile", *spec, "-o", str(tmp_path / "whole"), "--materialize", "whole"]) == 0
    monkeypatch.setattr(per_node, "available_bytes", lambda: 1000)
    assert cli.main(["profile", *spec, "-o", str(tmp_path / "auto")]) == 0
    assert "profiled one node at a time" in capsys.readouterr().err
    assert _graph_lines(tmp_path / "auto" / "graph.txt") == _graph_lines(tmp_path / "whole" / "graph.txt")
    doc = json.loads((tmp_path / "auto" / "profile.json").read_text())
    assert doc["materialize"] == "per-node"
    whole = json.loads((tmp_path / "whole" / "profile.json").read_text())
    heavy = max(whole["nodes"], key=lambda n: whole["nodes"][n]["parameter_bytes"])
    assert doc["nodes"][heavy]["backward_ms"]["median"] > 0
    assert doc["nodes"][heavy]["saved_bytes"] > 0


def test_a_directory_export_of_a_tied_hugging_face_model_loads_with_from_pretrained(tmp_path):
    """The export's directory writer on a tiny Llama with a tied head: shards, index, config, one tensor per tie."""
    transformers = pytest.importorskip("transformers")
    from pipeshift.runtime.export_cli import _save_config, once_per_tensor
    from pipeshift.weights import tensor_bytes, write_sharded

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    model = build_deferred(lambda: transformers.LlamaForCausalLM(config), {}, seed=4)
    materialize(model, seed=4)
    state = model.state_dict()
    names = once_per_tensor(state, model)
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    files = write_sharded(tmp_path, {k: tensor_bytes(state[k]) for k in names}, state.__getitem__, max_bytes=4000)
    assert len(files) > 2 and (tmp_path / INDEX).is_file() and _save_config(model, tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    got = loaded.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items() if k in got)
    assert torch.equal(loaded.lm_head.weight, state["model.embed_tokens.weight"])
