"""The profiler (issue 3): graph structure, sizes, timing consistency, CLI, error messages.

References are computed here, independently of the profiler: an fx trace + Interpreter and
forward hooks for structure and output bytes, a plain eager forward+backward loop for the
whole-step time.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.fx
from torch import nn

from helpers import REPO
from pipeshift.cli import main
from pipeshift.graph import read_graph_txt
from pipeshift.graph.capture import TraceError, capture
from pipeshift.profiler import profile_model
from pipeshift.profiler import report
from pipeshift.profiler.runner import GroupRunner
from pipeshift.profiler.validate import backward_execution_order, collapse_runs
from pipeshift.spec import ModelSpec

from tests import profiler_user_model as user  # noqa: E402

# Tiny but not trivial: per-node Python overhead must stay small next to compute for the
# sum-of-nodes check to be meaningful (each whole step is ~10-40 ms on one core). One thread,
# so the reference step's thread CPU time is its compute time (see _reference_step_ms).
ZOO = {
    "resnet50": ({"width": 16, "image_size": 64, "num_classes": 10}, 4),
    "gpt": ({"width": 128, "depth": 2, "heads": 4, "vocab_size": 256, "block_size": 64}, 4),
    "gnmt": ({"width": 128, "depth": 2, "vocab_size": 256, "seq_len": 16}, 4),
    "inception_v3": ({"width": 16, "image_size": 75, "num_classes": 10}, 4),
}
THREADS = 1
REFERENCE_RUNS = 8  # before and again after profiling, so a change in machine load hits both


def _model_args(kwargs: dict) -> list[str]:
    return [a for k, v in kwargs.items() for a in ("--model-arg", f"{k}={v}")]


def _tensors(value) -> list[torch.Tensor]:
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _is_tensor_value(value) -> bool:
    if torch.is_tensor(value):
        return True
    return isinstance(value, (tuple, list)) and bool(value) and all(_is_tensor_value(v) for v in value)


def _nbytes(value) -> list[int]:
    return [t.numel() * t.element_size() for t in _tensors(value)]


def _reference_step_ms(model: nn.Module, inputs, runs: int) -> list[float]:
    """Plain eager forward + backward (random output gradients): CPU time of this thread per run.

    With one intra-op thread, CPU autograd computes everything on the calling thread, so its
    CPU time is the step's compute time; unlike wall clock it does not grow when other jobs
    on this shared machine take the core away mid-step (a 30 ms step is preempted most times,
    a 0.1 ms node interval almost never, so wall clock would compare unlike things).
    """
    out = model(*inputs)
    grad = torch.randn_like(out)
    times = []
    for _ in range(runs + 2):  # two warm-up runs
        t0 = time.thread_time()
        out = model(*inputs)
        out.backward(grad)
        times.append((time.thread_time() - t0) * 1e3)
        model.zero_grad(set_to_none=True)
    return times[2:]


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.values = {}

    def run_node(self, n):
        out = super().run_node(n)
        self.values[n.name] = out
        return out


def _reference_graph(model: nn.Module, inputs):
    """Tensor-valued fx nodes, the tensor edges between them, and every node's real value."""
    gm = torch.fx.symbolic_trace(model)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    rec = _Recorder(gm)
    with torch.no_grad():
        rec.run(*inputs)
    nodes = [n for n in gm.graph.nodes if n.op == "placeholder" or (n.op != "output" and _is_tensor_value(rec.values[n.name]))]
    names = {n.name for n in nodes}
    edges = set()
    for n in nodes:
        todo, seen = list(n.all_input_nodes), set()
        while todo:  # look through non-tensor helpers (x.size(0), shape arithmetic)
            m = todo.pop()
            if m.name in seen:
                continue
            seen.add(m.name)
            if m.name in names:
                edges.add((m.name, n.name))
            else:
                todo.extend(m.all_input_nodes)
    return [n.name for n in nodes], edges, rec.values


def _per_node_sum_ms(out_dir: Path) -> float:
    profile = json.loads((out_dir / "profile.json").read_text())
    return sum(n["forward_ms"]["median"] + n["backward_ms"]["median"] for n in profile["nodes"].values())


@pytest.fixture(scope="module", params=sorted(ZOO))
def zoo_profile(request, tmp_path_factory):
    """Profile a zoo model through the CLI, with an eager reference step timed before and after.

    Other processes share this machine's two cores, and a burst of their load during one phase
    only (reference or profile) skews the comparison; such an attempt is repeated, profile and
    reference both, up to three times, and every attempt is kept for the failure message.
    """
    name = request.param
    kwargs, batch = ZOO[name]
    spec = ModelSpec(f"pipeshift.models:{name}", kwargs=kwargs)
    bundle = spec.build()
    model = bundle.model.train()
    inputs = bundle.example_inputs(batch)
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    attempts = []
    try:
        for attempt in range(3):
            out_dir = tmp_path_factory.mktemp(f"prof_{name}_{attempt}")
            reference = _reference_step_ms(model, inputs, REFERENCE_RUNS)
            rc = main(["profile", spec.callable, *_model_args(kwargs), "-b", str(batch), "-o", str(out_dir),
                       "--threads", str(THREADS), "--iterations", "15", "--warmup", "3", "--quiet", "--device", "cpu"])
            assert rc == 0
            reference += _reference_step_ms(model, inputs, REFERENCE_RUNS)
            attempts.append((_per_node_sum_ms(out_dir), statistics.median(reference)))
            if abs(attempts[-1][0] / attempts[-1][1] - 1) <= 0.25:
                break
    finally:
        torch.set_num_threads(previous)
    return {"name": name, "dir": out_dir, "model": model, "inputs": inputs, "attempts": attempts}


def test_graph_is_the_traced_dag(zoo_profile):
    graph = read_graph_txt(zoo_profile["dir"] / "graph.txt")
    graph.topological_order()  # raises on a cycle
    names, edges, _ = _reference_graph(zoo_profile["model"], zoo_profile["inputs"])
    fx_name = {n.node_id: n.meta["fx_name"] for n in graph}
    assert [fx_name[n] for n in graph.nodes] == names
    assert {(fx_name[a], fx_name[b]) for a, b in graph.edges} == edges
    assert list(graph.nodes) == [f"node{i}" for i in range(1, len(names) + 1)]
    profile = json.loads((zoo_profile["dir"] / "profile.json").read_text())
    assert set(graph.sinks()) <= set(profile["outputs"])
    assert all(graph[s].is_input for s in graph.sources() if graph[s].meta["op"] == "placeholder")


def test_activation_sizes_are_real_output_bytes(zoo_profile):
    model, inputs = zoo_profile["model"], zoo_profile["inputs"]
    graph = read_graph_txt(zoo_profile["dir"] / "graph.txt")
    _, _, values = _reference_graph(model, inputs)
    # Leaf modules' outputs, seen by forward hooks on the real model (not the traced graph).
    seen: dict[str, list[list[int]]] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, fqn=fqn: seen.setdefault(fqn, []).append(_nbytes(out)))
             for fqn, m in model.named_modules() if fqn]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    checked_modules = 0
    for node in graph:
        expected = _nbytes(values[node.meta["fx_name"]])
        written = node.activation_size if isinstance(node.activation_size, list) else [node.activation_size]
        if len(expected) == 1:
            assert written == [float(expected[0])], node.node_id
        else:
            assert written == [float(b) for b in expected], node.node_id
        if node.meta["op"] == "call_module" and len(seen.get(node.meta["fqn"], [])) == 1:
            assert [float(b) for b in seen[node.meta["fqn"]][0]] == written, node.node_id
            checked_modules += 1
    assert checked_modules > 0


def test_node_times_sum_to_the_whole_step(zoo_profile):
    per_node, whole = zoo_profile["attempts"][-1]
    print(f"{zoo_profile['name']}: sum of per-node medians {per_node:.2f} ms, eager step median {whole:.2f} ms, "
          f"ratio {per_node / whole:.3f} (attempt {len(zoo_profile['attempts'])})")
    assert abs(per_node / whole - 1) <= 0.25, (
        f"{zoo_profile['name']}: (sum of per-node medians, median eager step) in ms per attempt: {zoo_profile['attempts']}"
    )
    profile = json.loads((zoo_profile["dir"] / "profile.json").read_text())
    assert profile["threads"] == THREADS
    for n in profile["nodes"].values():
        for key in ("forward_ms", "backward_ms"):
            stats = n[key]
            assert stats["n"] == 15 and stats["p10"] <= stats["median"] <= stats["p90"]


def test_each_nodes_backward_runs_back_to_back(zoo_profile):
    """The premise of the hook timeline: no node's backward functions interleave with another's."""
    runner = GroupRunner(capture(zoo_profile["model"], zoo_profile["inputs"]))
    order = backward_execution_order(runner, zoo_profile["inputs"])
    runs = collapse_runs(order)
    assert len(order) > len(runner) // 2
    assert len(runs) == len(set(runs)), [i for i in runs if runs.count(i) > 1]


def test_profile_json_schema(zoo_profile):
    profile = json.loads((zoo_profile["dir"] / "profile.json").read_text())
    assert profile["version"] == 1 and profile["batch_size"] == 4
    assert profile["model"]["callable"] == f"pipeshift.models:{zoo_profile['name']}"
    assert profile["torch_version"] == torch.__version__ and profile["machine"]["cpu_count"]
    for node in profile["nodes"].values():
        for key in ("fx_name", "fx_nodes", "op", "target", "fqn", "inputs", "shapes", "dtypes", "activation_bytes",
                    "parameter_bytes", "buffer_bytes", "saved_bytes", "optimizer_bytes"):
            assert key in node
        assert node["optimizer_bytes"]["sgd_momentum"] <= node["parameter_bytes"]
    assert any(node["saved_bytes"] > 0 for node in profile["nodes"].values())
    assert (zoo_profile["dir"] / "graph.svg").is_file() or (zoo_profile["dir"] / "graph.dot").is_file()


# -- sizes on a model whose autograd formulas are known -----------------------------------------
def test_saved_and_optimizer_bytes():
    batch = 3
    model = user.saving()
    prof = profile_model(model, (torch.randn(batch, 16),), batch_size=batch, iterations=1, warmup=0, progress=False,
                         device="cpu")
    by_what = {g.fx_name: (g, n) for g, n in zip(prof.captured.groups, prof.nodes)}
    fc, fc_prof = by_what["fc"]
    _, act_prof = by_what["act"]
    _, mul_prof = by_what["mul"]
    f32 = 4
    assert (fc_prof.saved.total, fc_prof.saved.from_inputs) == (batch * 16 * f32, batch * 16 * f32)  # input only
    assert (act_prof.saved.total, act_prof.saved.from_inputs) == (batch * 32 * f32, 0)  # its own output
    assert (mul_prof.saved.total, mul_prof.saved.from_inputs) == (batch * 32 * f32, batch * 32 * f32)  # y, once
    params = 16 * 32 * f32 + 32 * f32
    assert fc.parameter_bytes == params
    assert fc_prof.optimizer_bytes == {"sgd_momentum": params, "adam": 2 * params + 2 * 4}
    assert act_prof.optimizer_bytes == {"sgd_momentum": 0, "adam": 0}


# -- user models from the command line ------------------------------------------------------
def _run_cli(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeshift", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_user_model_with_input_shape_profiles(tmp_path):
    out = tmp_path / "prof"
    done = _run_cli("profile", "tests.profiler_user_model:tiny_net", "--model-arg", "channels=6",
                    "--input-shape", "3,16,16", "-b", "2", "-o", str(out), "--threads", "1",
                    "--iterations", "3", "--warmup", "1", "--quiet")
    assert done.returncode == 0, done.stderr
    graph = read_graph_txt(out / "graph.txt")
    profile = json.loads((out / "profile.json").read_text())
    assert profile["model"]["input_shape"] == [3, 16, 16] and profile["model"]["kwargs"] == {"channels": 6}
    model = user.tiny_net(channels=6)
    leaves = {fqn for fqn, m in model.named_modules() if fqn}
    assert {n.meta["fqn"] for n in graph if n.meta["op"] == "call_module"} == leaves
    inputs = [n for n in graph if n.is_input]
    assert len(inputs) == 1 and inputs[0].activation_size == 2 * 3 * 16 * 16 * 4
    bf16 = [n for n in graph if n.meta["dtypes"] == ["bfloat16"]]
    assert len(bf16) == 1 and bf16[0].activation_size == 2 * 6 * 16 * 16 * 2
    assert graph.topological_order()


def test_several_batch_sizes_go_to_subdirectories(tmp_path, capsys):
    rc = main(["profile", "tests.profiler_user_model:tiny_net", "--input-shape", "3,8,8", "-b", "2", "-b", "5",
               "-o", str(tmp_path), "--iterations", "1", "--warmup", "0", "--quiet", "--device", "cpu"])
    assert rc == 0
    for b in (2, 5):
        profile = json.loads((tmp_path / f"b{b}" / "profile.json").read_text())
        assert profile["batch_size"] == b
        assert read_graph_txt(tmp_path / f"b{b}" / "graph.txt")["node1"].activation_size == b * 3 * 8 * 8 * 4


# -- capture: the untraceable model and the torch.export fallback ---------------------------
def test_untraceable_model_names_the_op_and_the_fix():
    with pytest.raises(TraceError) as err:
        capture(user.gated(), (torch.randn(2, 8),))
    message = str(err.value)
    assert "\n" not in message
    assert "module 'gate' (Gate)" in message and "`if x.sum() > 0:`" in message and "--leaf gate" in message


def test_untraceable_model_on_the_command_line(tmp_path):
    done = _run_cli("profile", "tests.profiler_user_model:gated", "--input-shape", "8", "-b", "2",
                    "-o", str(tmp_path / "p"), "--quiet")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pipeshift profile: error: cannot trace Gated"), done.stderr
    assert "--leaf gate" in lines[0] and "Traceback" not in done.stderr
    # ... and following the advice works.
    rc = main(["profile", "tests.profiler_user_model:gated", "--input-shape", "8", "-b", "2", "--leaf", "gate",
               "-o", str(tmp_path / "q"), "--iterations", "1", "--warmup", "0", "--quiet", "--device", "cpu"])
    assert rc == 0
    graph = read_graph_txt(tmp_path / "q" / "graph.txt")
    assert [n.meta["fqn"] for n in graph if n.meta["op"] == "call_module"] == ["inp", "gate", "out"]


def test_export_fallback_keeps_leaf_modules():
    torch.manual_seed(0)
    model = user.looped().eval()
    x = torch.randn(3, 4, 8)
    captured = capture(model, (x,))
    assert captured.tracer == "torch.export"
    # The same leaf-module calls, in the same order, as the eager model makes.
    calls: list[str] = []
    leaves = [(fqn, m) for fqn, m in model.named_modules() if fqn and not list(m.children())]
    hooks = [m.register_forward_pre_hook(lambda mod, args, fqn=fqn: calls.append(fqn)) for fqn, m in leaves]
    with torch.no_grad():
        expected = model(x)
    for h in hooks:
        h.remove()
    assert [g.target for g in captured.groups if g.op == "call_module"] == calls
    with torch.no_grad():
        assert torch.allclose(captured.gm(x), expected)
        other = torch.randn(5, 4, 8)  # the batch dimension stays symbolic
        assert torch.allclose(captured.gm(other), model(other))
    prof = profile_model(model, (x,), batch_size=3, iterations=2, warmup=1, progress=False, device="cpu")
    graph = prof.graph()
    graph.topological_order()
    cells = [n for n in graph if n.meta.get("fqn") == "decoder.cell"]
    assert len(cells) == 4 and all(n.backward_ms > 0 for n in cells)


# -- user mistakes ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--leaf", "nosuch"], "--leaf 'nosuch': the model has no submodule"),
        (["--leaf-type", "Nope"], "--leaf-type 'Nope': the model has no module of that class"),
        (["--depth", "0"], "--depth must be at least 1"),
        (["--threads", "0"], "--threads must be at least 1"),
        (["-b", "0"], "a batch size must be at least 1"),
    ],
)
def test_bad_flags_are_one_line_errors(tmp_path, capsys, extra, message):
    rc = main(["profile", "tests.profiler_user_model:tiny_net", "--input-shape", "3,8,8", "-b", "2",
               "-o", str(tmp_path), "--quiet", "--device", "cpu", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and message in err, err


def test_wrong_input_shape_is_a_user_error(tmp_path, capsys):
    rc = main(["profile", "tests.profiler_user_model:tiny_net", "--input-shape", "5,8,8", "-b", "2",
               "-o", str(tmp_path), "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and "fails on its example inputs ([2, 5, 8, 8] float32)" in err


# -- picture --------------------------------------------------------------------------------------
def _small_profile():
    return profile_model(user.saving(), (torch.randn(2, 16),), batch_size=2, iterations=1, warmup=0, progress=False,
                         device="cpu")


def test_picture_without_dot_writes_dot_file(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    path, warning = report.write_picture(_small_profile(), tmp_path)
    assert path == tmp_path / "graph.dot" and path.read_text().startswith("digraph")
    assert warning and "\n" not in warning and "not installed" in warning


def test_picture_survives_a_broken_graphviz(tmp_path, monkeypatch):
    from pipeshift.graph import render

    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/dot")

    def broken(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", "dot")

    monkeypatch.setattr(render.subprocess, "run", broken)
    path, warning = report.write_picture(_small_profile(), tmp_path)
    assert path.name == "graph.dot" and "graphviz failed" in warning


def test_picture_with_dot_is_svg(tmp_path):
    if shutil.which("dot") is None:
        pytest.skip("graphviz 'dot' is not installed")
    path, warning = report.write_picture(_small_profile(), tmp_path)
    assert warning is None and path.name == "graph.svg" and b"<svg" in path.read_bytes()


def test_heaviest_nodes_table():
    prof = _small_profile()
    table = report.heaviest_nodes(prof, top=2)
    assert len(table) == 2
    costs = [p.forward.median + p.backward.median for p in prof.nodes]
    assert list(table["fwd ms"] + table["bwd ms"]) == sorted(costs, reverse=True)[:2]
