"""Hugging Face transformers models end to end, built from tiny configs (random init, no hub).

Each model directory is written with ``save_pretrained`` into a temporary directory, as users keep
their models, and named as ``pipeshift.hf:auto --model-arg path=DIR``. The steps run through the
command line (profile → plan → codegen); training runs as real ranks (gloo, CPU) on real text
and images and is compared with single-process training of the same tied model, with gradient
accumulation, computed here. The in-process checks run generated stages against the model's own
forward, in both modes and at shapes other than the profiled ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeshift import cli
from pipeshift.codegen import build_stages
from pipeshift.plan import read_plan
from pipeshift.runtime import checkpoint as ckpt
from pipeshift.spec import ModelSpec

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

from helpers import REPO  # noqa: E402
from test_runtime import train as train_ranks  # noqa: E402 - after the importorskip

SEQ = 16


def corpus(path: Path) -> Path:
    """Real English text: this repository's own documentation."""
    text = "\n".join((REPO / name).read_text(encoding="utf-8") for name in ("README.md", "CONTRIBUTING.md"))
    path.write_text(text, encoding="utf-8")
    return path


CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=256, n_positions=64, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "llama": lambda: transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0),
    "llama-untied": lambda: transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0),
    "mistral": lambda: transformers.MistralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, max_position_embeddings=64, sliding_window=8, tie_word_embeddings=False, bos_token_id=0,
        eos_token_id=0),
    "qwen2": lambda: transformers.Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0),
    "t5": lambda: transformers.T5Config(
        d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=256,
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
    "bert": lambda: transformers.BertConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=256,
        max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "vit": lambda: transformers.ViTConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=8,
        patch_size=4, num_channels=1, num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
}
TASKS = {"gpt2": "causal-lm", "llama": "causal-lm", "llama-untied": "causal-lm", "mistral": "causal-lm",
         "qwen2": "causal-lm", "t5": "seq2seq-lm", "bert": "seq-cls", "vit": "image-cls"}


def model_dir(root: Path, name: str, **overrides) -> Path:
    config = CONFIGS[name]()
    for key, value in overrides.items():
        setattr(config, key, value)
    out = root / name
    config.save_pretrained(out)
    return out


def spec_of(directory: Path, name: str) -> ModelSpec:
    return ModelSpec("pipeshift.hf:auto", {"path": str(directory), "task": TASKS[name], "seq_len": SEQ}, seed=3)


def run_cli(*argv: str) -> None:
    assert cli.main(list(argv)) == 0


def text_data(root: Path) -> list[str]:
    return ["--data", "pipeshift.data:text_file", "--data-arg", f"path={corpus(root / 'corpus.txt')}",
            "--data-arg", f"seq_len={SEQ}"]


def labelled_text(root: Path) -> list[str]:
    """Real text classification: which of three documents a window of bytes comes from."""
    from safetensors.torch import save_file

    docs = [(REPO / name).read_bytes() for name in ("README.md", "CONTRIBUTING.md", "pipeshift/runtime/README.md")]
    g = torch.Generator().manual_seed(0)
    rows, labels = [], []
    for label, doc in enumerate(docs):
        tokens = torch.frombuffer(bytearray(doc), dtype=torch.uint8).long()
        for start in torch.randint(0, len(tokens) - SEQ, (100,), generator=g).tolist():
            rows.append(tokens[start:start + SEQ])
            labels.append(label)
    order = torch.randperm(len(rows), generator=g)
    save_file({"input0": torch.stack(rows)[order], "target": torch.tensor(labels)[order]}, root / "docs.safetensors")
    return ["--data", "pipeshift.data:tensor_file", "--data-arg", f"path={root / 'docs.safetensors'}"]


def continuations(root: Path) -> list[str]:
    """Real text-to-text pairs: a window of this repository's documentation, and the window after it
    (the decoder reads that target shifted right, from token 0, as T5's ``labels=`` would)."""
    from safetensors.torch import save_file

    tokens = torch.frombuffer(bytearray(corpus(root / "corpus.txt").read_bytes()), dtype=torch.uint8).long()
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(tokens) - 2 * SEQ, (300,), generator=g)
    source = torch.stack([tokens[s:s + SEQ] for s in starts.tolist()])
    target = torch.stack([tokens[s + SEQ:s + 2 * SEQ] for s in starts.tolist()])
    decoder = torch.cat([torch.zeros(len(target), 1, dtype=torch.long), target[:, :-1]], dim=1)
    save_file({"input0": source, "input1": decoder, "target": target}, root / "pairs.safetensors")
    return ["--data", "pipeshift.data:tensor_file", "--data-arg", f"path={root / 'pairs.safetensors'}"]


def digit_images(root: Path) -> list[str]:
    """Real images: scikit-learn's 8x8 handwritten digits."""
    from safetensors.torch import save_file
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:400, None] / 16.0
    save_file({"input0": images, "target": torch.tensor(digits.target[:400], dtype=torch.int64)},
              root / "digits.safetensors")
    return ["--data", "pipeshift.data:tensor_file", "--data-arg", f"path={root / 'digits.safetensors'}"]


DATA = {"gpt2": text_data, "llama": text_data, "llama-untied": text_data, "mistral": text_data, "qwen2": text_data,
        "t5": continuations, "bert": labelled_text, "vit": digit_images}
LOSS = {"causal-lm": "pipeshift.losses:causal_lm", "seq2seq-lm": "pipeshift.losses:causal_lm", "seq-cls": "torch.nn:CrossEntropyLoss",
        "image-cls": "torch.nn:CrossEntropyLoss"}


def prepare(root: Path, name: str) -> dict:
    """``name`` profiled once on its real data, planned and generated on 2 and 3 stages."""
    directory = model_dir(root, name)
    spec = spec_of(directory, name)
    flags = [*DATA[name](root), "--loss", LOSS[TASKS[name]]]
    run_cli("profile", spec.callable, *[f"--model-arg={k}={v}" for k, v in spec.kwargs.items()], "--seed", "3",
            *flags, "-b", "4", "-o", str(root / "prof"), "--quiet",
            "--iterations", "1", "--warmup", "0", "--threads", "1", "--no-malloc-tuning")
    out = {"root": root, "dir": directory, "flags": flags, "name": name}
    for n in (2, 3):
        run_cli("plan", str(root / "prof" / "graph.txt"), "-n", str(n), "--straight-pipeline", "-o", str(root / f"plan{n}"))
        run_cli("codegen", str(root / f"plan{n}"), "-o", str(root / f"stages{n}"))
        out[f"stages{n}"], out[f"plan{n}"] = root / f"stages{n}", root / f"plan{n}"
    return out


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> dict:
    """GPT-2 (tied head) profiled once on real text, planned and generated on 2 and 3 stages."""
    return prepare(tmp_path_factory.mktemp("hf_gpt2"), "gpt2")


# -- the spec, the flags ------------------------------------------------------------------------


def test_hf_auto_keeps_the_model_its_names_and_its_tie(tmp_path: Path) -> None:
    directory = model_dir(tmp_path, "gpt2")
    model = ModelSpec("pipeshift.hf:auto", {"path": str(directory), "config.n_layer": 1}).build().model
    assert type(model).__name__ == "GPT2LMHeadModel" and isinstance(model, transformers.GPT2LMHeadModel)
    assert len(model.transformer.h) == 1  # config.KEY=VALUE overrides the file
    assert model.lm_head.weight is model.transformer.wte.weight
    reference = transformers.GPT2LMHeadModel(model.config)
    assert set(model.state_dict()) == set(reference.state_dict())
    ids = torch.randint(0, 256, (2, 5))
    model.eval()
    assert torch.equal(model(ids), transformers.GPT2LMHeadModel.forward(model, input_ids=ids, use_cache=False).logits)


def test_hf_auto_loads_the_directorys_weights(tmp_path: Path) -> None:
    saved = transformers.GPT2LMHeadModel(CONFIGS["gpt2"]())
    saved.save_pretrained(tmp_path / "m")
    model = ModelSpec("pipeshift.hf:auto", {"path": str(tmp_path / "m")}, seed=123).build().model
    for key, value in saved.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.parametrize("argv, message", [
    (["--model-arg", "path=/nonexistent"], "no config.json"),
    (["--model-arg", "path=DIR", "--model-arg", "task=translate"], "task='translate'"),
    (["--model-arg", "path=DIR", "--model-arg", "config.no_such_field=1"], "has no field 'no_such_field'"),
    (["--model-arg", "path=DIR", "--model-arg", "colour=red"], "has no argument 'colour'"),
])
def test_bad_hf_specs_are_one_line_errors(tmp_path: Path, capsys, argv, message) -> None:
    directory = model_dir(tmp_path, "gpt2")
    argv = [a.replace("DIR", str(directory)) for a in argv]
    assert cli.main(["profile", "pipeshift.hf:auto", *argv, "-b", "2", "-o", str(tmp_path / "p"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_model_without_loss_or_data_is_refused_with_the_flag_to_add() -> None:
    """A bare nn.Module brings neither: the run says which flag to add instead of inventing one."""
    import argparse

    from pipeshift.runspec import with_data_and_loss

    bundle = ModelSpec("torch.nn:Linear", {"in_features": 4, "out_features": 2}, input_shape=[4]).build()
    args = argparse.Namespace(data=None, data_arg=[], loss=None, loss_arg=[])
    with pytest.raises(Exception, match="brings no data: add --data"):
        with_data_and_loss(bundle, args, "torch.nn:Linear")
    args.data = "synthetic"
    with pytest.raises(Exception, match="brings no loss: add --loss"):
        with_data_and_loss(bundle, args, "torch.nn:Linear")
    args.loss = "torch.nn:MSELoss"
    made = with_data_and_loss(bundle, args, "torch.nn:Linear", announce=False)
    assert isinstance(made.criterion(), torch.nn.MSELoss)
    (x,), y = next(made.data(3, "train", 0))
    assert x.shape == (3, 4)


# -- GPT-2: the tie, trained across ranks --------------------------------------------------------


def user_fns(flags: list[str]):
    """The data source and loss the flags name, for the single-process reference."""
    import argparse

    from pipeshift.runspec import data_spec_from_args, loss_spec_from_args, user_data, user_loss

    parser = argparse.ArgumentParser()
    for flag in ("--data", "--loss"):
        parser.add_argument(flag)
        parser.add_argument(flag + "-arg", action="append", default=[])
    args = parser.parse_args(flags)
    return user_data(data_spec_from_args(args)), user_loss(loss_spec_from_args(args))()


def reference(spec: ModelSpec, flags: list[str], steps: int, m: int, b: int, lr: float, momentum: float):
    model = spec.build().model
    model.train()
    data_fn, crit = user_fns(flags)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    data = data_fn(b, "train", 0)
    for _ in range(steps):
        for _ in range(m):
            x, y = next(data)
            (crit(model(*x), y) / m).backward()
        opt.step()
        opt.zero_grad()
    return model


def eval_loss(model, flags: list[str], minibatches: int, m: int, b: int) -> float:
    """The model's own eval-mode loss over the val split, as the pipeline's --eval-steps reads it."""
    data_fn, crit = user_fns(flags)
    model.eval()
    val = data_fn(b, "val", 0)
    with torch.no_grad():
        return float(torch.stack([crit(model(*x), y) for x, y in (next(val) for _ in range(minibatches * m))]).mean())


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach(), want.detach()
    return float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12))


def flush_train(prepared: dict, workdir: Path, pkg: Path, *extra: str, limit: float | None = None):
    """Flush on 2 ranks; ``limit``: a longer hard limit (and rank timeout) for models whose capture
    (torch.export, on every rank) is slow on two shared cores."""
    args = ["--schedule", "flush", "--microbatches", "2", "--steps", "3", "--batch-size", "4", "--lr", "0.1",
            "--momentum", "0.9", *prepared["flags"], "--checkpoint-dir", str(workdir / "ck"), *extra]
    if limit is None:
        return train_ranks(workdir, pkg, 2, *args)
    return slow_ranks(workdir, pkg, 2, args, limit)


def slow_ranks(workdir: Path, pkg: Path, world: int, args: list[str], limit: float):
    """``world`` ranks that must all succeed within ``limit`` seconds (each waits up to half of it)."""
    from test_runtime import finish, start_ranks

    results = finish(start_ranks(workdir, pkg, world, [*args, "--timeout", str(limit / 2)]), limit=limit)
    for r, (rc, _o, e) in enumerate(results):
        assert rc == 0, f"rank {r} exited {rc}:\n{e[-3000:]}"
    return results


def reported_eval_loss(results) -> float:
    lines = [line for _rc, out, err in results for line in (out + err).splitlines() if "eval loss" in line]
    assert lines, results
    return float(lines[0].split("eval loss ")[1].split(";")[0])


def check_trained(prepared: dict, workdir: Path, pkg: Path, results) -> ModelSpec:
    """Trained weights equal the single-process reference's; eval equals its eval forward; the
    export loads strictly into the original model with every tie intact."""
    spec = ModelSpec.from_json(json.loads((pkg / "plan.json").read_text())["model"])
    want = reference(spec, prepared["flags"], steps=3, m=2, b=4, lr=0.1, momentum=0.9)
    where = ckpt.resolve(workdir / "ck")
    meta = ckpt.read_meta(where)
    got = ckpt.assemble_state_dict(ckpt.stage_files(where, meta), where, meta["tied_parameters"])
    for key, value in want.state_dict().items():  # a zero-gradient tensor (attention's key bias) moves by noise only
        assert relative_error(got[key], value) <= 1e-5 or float((got[key] - value).abs().max()) <= 1e-7, key
    expected = eval_loss(want, prepared["flags"], 2, 2, 4)
    assert abs(reported_eval_loss(results) - expected) <= 1e-4 * abs(expected)
    run_cli("export", str(workdir / "ck"), "-o", str(workdir / "model.pt"), "--package", str(pkg))
    fresh = spec.build().model
    fresh.load_state_dict(torch.load(workdir / "model.pt", weights_only=True), strict=True)
    for key, value in want.state_dict().items():
        loaded = fresh.state_dict()[key]
        assert relative_error(loaded, value) <= 1e-5 or float((loaded - value).abs().max()) <= 1e-7, key
    return spec


def test_gpt2_tied_head_trains_as_one_parameter_and_exports_once(gpt2, tmp_path: Path) -> None:
    pkg = gpt2["stages2"]
    conf = json.loads((pkg / "conf.json").read_text())
    assert conf["tied_parameters"] == [{"lm_head.weight": [1], "transformer.wte.weight": [0]}]
    results = flush_train(gpt2, tmp_path, pkg, "--eval-steps", "2")
    where = ckpt.resolve(tmp_path / "ck")
    stages = ckpt.stage_files(where, ckpt.read_meta(where))
    assert "lm_head.weight" not in stages[1]["model"]  # stored once, by the first holder
    spec = check_trained(gpt2, tmp_path, pkg, results)
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()
    fresh = spec.build().model
    fresh.load_state_dict(state, strict=True)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight


def test_gpt2_trains_at_a_sequence_length_it_was_not_profiled_at(gpt2, tmp_path: Path) -> None:
    """Profiled on windows of SEQ tokens, trained on 3 x SEQ: nothing in the stages fixes the length."""
    longer = [f"seq_len={3 * SEQ}" if f == f"seq_len={SEQ}" else f for f in gpt2["flags"]]
    assert longer != gpt2["flags"]
    prepared = {**gpt2, "flags": longer}
    results = flush_train(prepared, tmp_path, gpt2["stages2"], "--eval-steps", "2")
    check_trained(prepared, tmp_path, gpt2["stages2"], results)


def test_gpt2_plan_counts_the_tie_on_both_holders_and_charges_its_all_reduce(gpt2) -> None:
    prof = json.loads((gpt2["root"] / "prof" / "profile.json").read_text())
    holders = {m["fqn"] for m in prof["nodes"].values() if "transformer.wte.weight" in m.get("shared_parameters", {})}
    assert holders == {"transformer.wte", "lm_head"}
    doc = json.loads((gpt2["plan2"] / "plan.json").read_text())
    wte = 256 * 32 * 4
    for st in doc["stages"]:
        assert st["costs"]["tie_allreduce_s"] > 0
        assert st["costs"]["parameter_bytes"] >= wte


def test_without_the_tie_all_reduce_the_copies_drift_apart(gpt2, tmp_path: Path) -> None:
    """The tie is what keeps training right: drop it from conf.json and the run leaves the reference."""
    import shutil

    pkg = tmp_path / "untied"
    shutil.copytree(gpt2["stages2"], pkg)
    conf = json.loads((pkg / "conf.json").read_text())
    del conf["tied_parameters"]
    (pkg / "conf.json").write_text(json.dumps(conf))
    flush_train(gpt2, tmp_path, pkg)
    where = ckpt.resolve(tmp_path / "ck")
    got = ckpt.assemble_state_dict(ckpt.stage_files(where, ckpt.read_meta(where)))
    spec = ModelSpec.from_json(json.loads((pkg / "plan.json").read_text())["model"])
    want = reference(spec, gpt2["flags"], steps=3, m=2, b=4, lr=0.1, momentum=0.9)
    assert relative_error(got["lm_head.weight"], got["transformer.wte.weight"]) > 1e-3
    assert relative_error(got["transformer.wte.weight"], want.transformer.wte.weight) > 1e-3


def test_gpt2_tie_survives_a_switch_that_moves_both_holders(gpt2, tmp_path: Path) -> None:
    """Flush on 3 ranks, one switch after step 1: the head moves to another stage (replicated on
    two ranks) and the embedding to another rank. The weights end equal to single-process
    training of the tied model, and the tie is one tensor in the re-assembled state."""
    plan3 = json.loads((gpt2["plan3"] / "plan.json").read_text())
    nodes = [st["nodes"] for st in plan3["stages"]]
    # wte: stage 0 on rank 0 -> stage 0 on rank 2; lm_head: stage 2 on rank 2 -> stage 1 on ranks 0 and 1
    stages = [{"stage_id": 0, "nodes": nodes[0], "replicas": 1, "ranks": [2]},
              {"stage_id": 1, "nodes": nodes[1] + nodes[2], "replicas": 2, "ranks": [0, 1]}]
    switch = tmp_path / "switch.json"
    switch.write_text(json.dumps({**plan3, "graph": str((gpt2["plan3"] / plan3["graph"]).resolve()), "stages": stages}))
    args = ["--schedule", "flush", "--microbatches", "4", "--steps", "2", "--batch-size", "4", "--lr", "0.1",
            "--momentum", "0.9", *gpt2["flags"], "--checkpoint-dir", str(tmp_path / "ck"),
            "--repartition-at", f"1:{switch}"]
    # three ranks each capturing GPT-2 (torch.export) share two cores: a longer limit than the default
    slow_ranks(tmp_path, gpt2["stages3"], 3, args, limit=400)
    log = [json.loads(line) for line in (tmp_path / "out" / "repartitions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["event"] == "repartition"] == [1]
    where = ckpt.resolve(tmp_path / "ck")
    meta = ckpt.read_meta(where)
    assert meta["tied_parameters"] == [{"lm_head.weight": [1], "transformer.wte.weight": [0]}]
    got = ckpt.assemble_state_dict(ckpt.stage_files(where, meta), where, meta["tied_parameters"])
    want = reference(ModelSpec.from_json(plan3["model"]), gpt2["flags"], steps=2, m=4, b=4, lr=0.1, momentum=0.9)
    for key, value in want.state_dict().items():
        assert relative_error(got[key], value) <= 1e-5 or float((got[key] - value).abs().max()) <= 1e-7, key
    assert got["lm_head.weight"] is got["transformer.wte.weight"]


# -- generated stages: shapes and modes not baked in ---------------------------------------------


def chain(stages, *inputs: torch.Tensor) -> torch.Tensor:
    env = {f"input{i}": t for i, t in enumerate(inputs)}
    for module, ins, outs in stages:
        env.update(zip(outs, module(*[env[n] for n in ins])))
    return env[stages[-1][2][0]]


def test_gpt2_stages_run_at_other_shapes_and_follow_the_mode(gpt2) -> None:
    for n in (2, 3):
        plan = read_plan(gpt2[f"plan{n}"])
        spec = ModelSpec.from_json(plan.model) if isinstance(plan.model, dict) else plan.model
        model = ModelSpec(spec.callable, {**spec.kwargs, "config.resid_pdrop": 0.2, "config.attn_pdrop": 0.2},
                          seed=spec.seed).build().model
        stages = build_stages(plan, model)
        assert all("input0" not in ins for _m, ins, _o in stages[1:])  # later stages get no raw input for sizes
        for batch, seq in ((4, SEQ), (3, 2 * SEQ), (1, 5)):
            ids = torch.randint(0, 256, (batch, seq))
            model.eval()
            for m, _i, _o in stages:
                m.eval()
            with torch.no_grad():
                got, want = chain(stages, ids), model(ids)
                assert torch.allclose(got, want, atol=1e-5), (n, batch, seq, float((got - want).abs().max()))
            for m, _i, _o in stages:
                m.train()
            with torch.no_grad():
                a, b = chain(stages, ids), chain(stages, ids)
            assert not torch.allclose(a, b), "dropout must be active in training mode"


# -- the model matrix (slow: `pytest -m slow tests/test_hf.py`) -----------------------------------

TIED = {"llama": [{"lm_head.weight": [1], "model.embed_tokens.weight": [0]}], "llama-untied": [], "mistral": [],
        "qwen2": [{"lm_head.weight": [1], "model.embed_tokens.weight": [0]}], "bert": [], "vit": [],
        # T5's one embedding: the encoder's and the decoder's input, and the head
        "t5": [{"decoder.embed_tokens.weight": [0], "encoder.embed_tokens.weight": [0], "lm_head.weight": [1],
                "shared.weight": [1]}]}


# T5 captures, plans and generates stages equal to its forward, trains and exports with the tie
# intact, but 2-rank flush training leaves the single-process reference (1.7e-1 relative on an
# encoder layer norm after 3 steps, the error growing from the head towards the inputs): a
# gradient across the cut is still wrong. Strict: the day it passes, this mark must go.
T5_TRAINING = pytest.mark.xfail(strict=True, reason="T5: 2-rank flush training is not yet equal to the reference")


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("name", [pytest.param(n, marks=T5_TRAINING) if n == "t5" else n for n in sorted(TIED)])
def test_model_end_to_end(name: str, tmp_path: Path) -> None:
    """Profile, plan (2 and 3 stages), generate, run at other shapes in both modes, train with flush
    on 2 ranks against single-process training, evaluate, export and load strictly."""
    prepared = prepare(tmp_path, name)
    for n in (2, 3):
        plan = read_plan(prepared[f"plan{n}"])
        model = ModelSpec.from_json(plan.model).build().model.eval()
        stages = build_stages(plan, model)
        for m, _i, _o in stages:
            m.eval()
        assert all("input0" not in ins for _m, ins, _o in stages[1:])
        for batch, seq in ((4, SEQ), (3, 2 * SEQ)):
            x = (torch.randn(batch, 1, 8, 8),) if name == "vit" else (torch.randint(0, 256, (batch, seq)),)
            if name == "t5":  # a decoder input of another length than the encoder's
                x = (*x, torch.randint(0, 256, (batch, seq - 3)))
            with torch.no_grad():
                assert torch.allclose(chain(stages, *x), model(*x), atol=1e-5), (n, batch, seq)
    pkg = prepared["stages2"]
    assert json.loads((pkg / "conf.json").read_text()).get("tied_parameters", []) == TIED[name]
    results = flush_train(prepared, tmp_path, pkg, "--eval-steps", "2", limit=900)
    check_trained(prepared, tmp_path, pkg, results)
