"""Several models behind one server: outputs, no lost request across swaps, LRU, each rank reads only its shard.

Three tiny models (two GPTs of different widths and seeds, an MLP whose stages sit on the ranks
the other way round) behind one 2-rank server. ``one`` keeps at most one model resident, so
interleaved requests swap on nearly every batch; ``lru`` keeps two, swaps from sharded
safetensors files written here (one shard file per stage) and is driven in a fixed order to see
which model is evicted. Every expected output is the unsplit model's forward on the same
inputs and weights, computed here.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import random
from pathlib import Path

import pytest
import torch

from pipeshift.spec import ModelSpec
from serve_helpers import GPT, Server, assert_close, graph_nodes, package, reference

pytestmark = pytest.mark.timeout(400)

GPT_B = ModelSpec("pipeshift.models:gpt", {"vocab_size": 50, "width": 24, "depth": 2, "heads": 2, "block_size": 32},
                  seed=7)
MLP = ModelSpec("pipeshift.models:mlp", {"in_features": 16, "width": 32, "depth": 3, "num_classes": 5}, seed=5)
MODELS = {"a": (GPT, [[0], [1]]), "b": (GPT_B, [[0], [1]]), "c": (MLP, [[1], [0]])}


def inputs(name: str, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if name == "c":
        return torch.randn(n, 16, generator=g)
    return torch.randint(0, 50, (n, 3 + seed % 5), generator=g)


@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    out = {}
    for name, (spec, ranks) in MODELS.items():
        nodes = graph_nodes(spec)
        out[name] = package(d / name, spec, [len(nodes) // 2], ranks, nodes)
    return out


def stage_names(pkg: Path) -> list[set[str]]:
    """The tensor names (original FQNs) of each stage of a package."""
    from pipeshift.runtime.local import stage_tensor_names
    from pipeshift.runtime.package import load_stage_package

    p = load_stage_package(pkg)
    entries = p.entries(torch.nn.Identity())
    names: list[set[str]] = [set() for _ in range(p.num_stages)]
    for i, (module, _, _) in enumerate(entries[:-1]):
        names[p.module_to_stage[i]] |= stage_tensor_names(module)
    return names


def write_stage_shards(state: dict[str, torch.Tensor], stages: list[set[str]], out: Path) -> list[str]:
    """A sharded safetensors directory with one shard per stage (the Hugging Face layout)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    files, weight_map = [], {}
    for s, names in enumerate(stages):
        name = f"model-{s + 1:05d}-of-{len(stages):05d}.safetensors"
        save_file({k: state[k].clone().contiguous() for k in sorted(names)}, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in names})
        files.append(name)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return files


@pytest.fixture(scope="module")
def one(tmp_path_factory, packages):
    d = tmp_path_factory.mktemp("one")
    server = Server(d, None, 2, [*[a for n, p in packages.items() for a in ("--model", f"{n}={p}")],
                                 "--max-loaded", "1", "--max-batch", "4", "--queue", "64"])
    yield server
    server.close()


@pytest.fixture(scope="module")
def lru(tmp_path_factory, packages):
    d = tmp_path_factory.mktemp("lru")
    weights, refs = {}, {}
    for name, (spec, _) in MODELS.items():
        other = ModelSpec(spec.callable, spec.kwargs, seed=spec.seed + 100).build().model  # not the seed's weights
        state = other.state_dict()
        files = write_stage_shards(state, stage_names(packages[name]), d / f"w_{name}")
        weights[name] = (d / f"w_{name}", files)
        other.eval()
        refs[name] = other
    args = [a for n, p in packages.items() for a in ("--model", f"{n}={p}:{weights[n][0]}")]
    server = Server(d, None, 2, [*args, "--max-loaded", "2", "--swap-from", "file"])
    yield server, weights, refs
    server.close()


def test_interleaved_requests_across_swaps_equal_each_model_alone(one):
    refs = {name: reference(spec) for name, (spec, _) in MODELS.items()}
    rng = random.Random(0)
    cases = [(rng.choice("abc"), 1 + i % 3, 500 + i) for i in range(45)]

    def send(case):
        name, n, seed = case
        x = inputs(name, n, seed)
        if seed % 2:
            return one.client.post(f"/v1/models/{name}/predict", json={"inputs": [x.tolist()]})
        return one.client.post("/v1/predict", json={"model": name, "inputs": [x.tolist()]})

    with cf.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(send, cases))
    assert len(answers) == len(cases)
    for (name, n, seed), r in zip(cases, answers):
        assert r.status_code == 200, (name, r.text)
        with torch.no_grad():
            assert_close(r.json()["outputs"][0], refs[name](inputs(name, n, seed)), tol=1e-5)
    listing = one.client.get("/v1/models").json()
    by_name = {m["id"]: m for m in listing["data"]}
    assert sum(m["state"] in ("resident", "loading") for m in by_name.values()) <= 1
    assert listing["swaps"] >= 3 and all(m["swaps_in"] >= 1 for m in by_name.values())
    assert sum(m["batches"] for m in by_name.values()) >= 1
    # counted end to end: the server answered exactly what was sent, every one with 200
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(one.client.get("/metrics").text)}
    answered = {s.labels["status"]: s.value for s in families["pipeshift_serve_requests"].samples
                if s.name.endswith("_total") and s.labels["endpoint"] == "predict"}
    assert answered == {"200": float(len(cases))}
    swapped = {s.labels["model"]: s.value for s in families["pipeshift_serve_swaps"].samples
               if s.name.endswith("_total") and s.labels["kind"] == "in"}
    assert sum(swapped.values()) == listing["swaps"]
    # completions name their model in the body (OpenAI-style), greedy decoding through swaps
    prompt = [3, 14, 15]
    r = one.client.post("/v1/completions", json={"model": "b", "prompt": prompt, "max_tokens": 3})
    assert r.status_code == 200, r.text
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(3):
            ids.append(int(refs["b"](torch.tensor([ids]))[0, -1].argmax()))
    assert r.json()["choices"][0]["token_ids"] == ids[len(prompt):]
    r = one.client.post("/v1/completions", json={"model": "c", "prompt": prompt})
    assert r.status_code == 400 and "not a causal language model" in r.json()["error"]
    # requests that name no model or an unknown one get one-line reasons
    r = one.client.post("/v1/predict", json={"inputs": [[[1, 2]]]})
    assert r.status_code == 400 and "name the model" in r.json()["error"]
    r = one.client.post("/v1/models/zz/predict", json={"inputs": [[[1, 2]]]})
    assert r.status_code == 404 and "zz" in r.json()["error"]


def test_eviction_is_lru_and_each_rank_reads_only_its_shard(lru, packages):
    server, weights, refs = lru
    decisions_before = len(server.client.get("/v1/models").json()["decisions"])
    for k, name in enumerate("abac"):  # a and b resident; a used again; c comes: b is the least recently used
        x = inputs(name, 2, 900 + k)
        r = server.client.post(f"/v1/models/{name}/predict", json={"inputs": [x.tolist()]})
        assert r.status_code == 200, r.text
        with torch.no_grad():
            assert_close(r.json()["outputs"][0], refs[name](x), tol=1e-5)
    listing = server.client.get("/v1/models").json()
    events = [(d["event"], d["model"]) for d in listing["decisions"][decisions_before:]
              if d["event"] in ("swap-in", "evict")]
    assert events == [("swap-in", "a"), ("swap-in", "b"), ("evict", "b"), ("swap-in", "c")]
    states = {m["id"]: m["state"] for m in listing["data"]}
    assert states == {"a": "resident", "b": "offloaded", "c": "resident"}
    for m in listing["data"]:
        name = m["id"]
        if m["swaps_in"] == 0:
            continue
        stages = stage_names(packages[name])
        stage_of_rank = {r: s for s, ranks in enumerate(MODELS[name][1]) for r in ranks}
        directory, files = weights[name]
        for rank, rec in m["last_swap_in"].items():
            s = stage_of_rank[int(rank)]
            assert rec["error"] is None
            assert set(rec["tensors"]) == stages[s], (name, rank)  # its own tensors, every one, nothing else
            assert [Path(f).name for f in rec["files"]] == [files[s]]  # only its own shard file was opened
            assert rec["bytes"] == m["bytes_per_rank"][rank]


class _Routing:
    """A stand-in for a model's routing: the scheduler only tells models apart by it."""


def _frontend(budget: dict[int, int], max_loaded: int, max_swaps_in_a_row: int = 2):
    from types import SimpleNamespace

    from pipeshift.serve import wire
    from pipeshift.serve.frontend import Config
    from pipeshift.serve.scheduler import MultiFrontend, Served

    models = [Served(n, _Routing(), {0: 100, 1: 100}) for n in "abc"]
    worker = SimpleNamespace(routing=models[0].routing, repartitioner=None)
    return MultiFrontend(0, 2, worker, wire.Mailbox(), Config(), models, budget=budget, max_loaded=max_loaded,
                         max_swaps_in_a_row=max_swaps_in_a_row)


def _wait(frontend, name: str, at: float) -> None:
    from pipeshift.serve.frontend import Request

    req = Request([torch.zeros(1, 2)], 60.0, lambda outcome: None)
    req.arrived = at
    frontend.models[name].queue.append(req)


def test_choice_is_oldest_first_lru_never_busy_and_bounded_swaps():
    from pipeshift.serve.frontend import Batch
    from pipeshift.serve.residency import RESIDENT

    f = _frontend({0: 1000, 1: 1000}, max_loaded=2)
    a, b, c = (f.models[n] for n in "abc")
    a.state = c.state = RESIDENT
    a.last_use, c.last_use = 1.0, 2.0
    _wait(f, "c", at=10.0)
    _wait(f, "b", at=5.0)  # b waited longest but is offloaded: a swap, evicting the least recently used
    with f._cv:
        assert f._choose() == ("swap", b, [a])
    with f._inflight_lock:  # a batch of a in flight: a cannot go, and c is the only other one
        f._inflight[0] = Batch(0, [], a.routing, 0.0)
    with f._cv:
        assert f._choose() == ("serve", c, [])  # room only once a's batch is done: serve what is resident
    f._inflight.clear()
    f.swaps_in_a_row = 2  # two swaps in a row: a resident model's waiting requests go first
    with f._cv:
        assert f._choose() == ("serve", c, [])
    assert f.decisions[-1]["event"] == "hold" and f.decisions[-1]["model"] == "b"
    # the budget, not the count, can make room: b needs 100 bytes on each rank, 50 are left
    f = _frontend({0: 250, 1: 250}, max_loaded=3)
    a, b, c = (f.models[n] for n in "abc")
    a.state = c.state = RESIDENT
    a.last_use, c.last_use = 3.0, 2.0
    _wait(f, "b", at=1.0)
    with f._cv:
        assert f._choose() == ("swap", b, [c])


def test_bad_model_arguments_are_one_line_errors(packages, capsys):
    from pipeshift.cli import main

    a = packages["a"]
    cases = [
        (["--model", "a"], "expected NAME=STAGES"),
        (["--model", f"a/b={a}"], "a name is letters"),
        (["--model", f"a={a}", "--model", f"a={a}"], "given twice"),
        (["--model", "a=/nonexistent/stages"], "not a stage package directory"),
        (["--model", f"a={a}:/nonexistent/weights"], "no such file"),
        ([str(a), "--model", f"a={a}"], "not both"),
        (["--model", f"a={a}", "--max-loaded", "0"], "--max-loaded must be >= 1"),
        ([str(a), "--max-loaded", "1"], "--max-loaded needs --model"),
        (["--model", f"a={a}", "--allow-repartition"], "works with one model"),
        (["--model", f"a={a}", "--init-from", str(a)], "NAME=STAGES:WEIGHTS"),
        ([], "nothing to serve"),
    ]
    for argv, message in cases:
        assert main(["serve", *argv, "--local", "2"]) == 1, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (argv, err)
