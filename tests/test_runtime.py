"""The pipeline runtime end to end: real processes (gloo, CPU), compared with single-process training.

Stage packages are written by hand here, following CONTRIBUTING.md's contract exactly: an MLP
chain from the zoo, and a small model with a skip connection so that one boundary carries
several tensors, one tensor skips a stage and the raw input is forwarded to the last stage.
Every run has a hard timeout, a free port, and kills what it started.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

from helpers import PY, accumulate, assert_same_weights, final_weights, free_port, stream
from pipeshift import cli
from pipeshift.runtime import checkpoint as ckpt
from pipeshift.spec import ModelSpec

TIMEOUT = 120  # hard limit per multi-process run (2 shared cores)

# -- packages ---------------------------------------------------------------------------------

MLP_SPEC = {"callable": "pipeshift.models:mlp",
            "kwargs": {"in_features": 8, "width": 12, "depth": 4, "num_classes": 4}, "seed": 3}

SKIP_MODULE = '''
import torch
from torch import nn
from pipeshift.spec import ModelBundle


class SkipNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 10)
        self.b = nn.Linear(10, 10)
        self.c = nn.Linear(10, 10)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        g = torch.tanh(self.b(h))
        k = torch.relu(self.c(h))
        return self.head(torch.cat([g * k + h, x], dim=1))


def build():
    bundle = ModelBundle(model=SkipNet(), example_inputs=lambda b: (torch.randn(b, 6),), criterion=nn.MSELoss,
                         example_target=lambda b: torch.zeros(b, 3))
    bundle.data = lambda b, split, seed: bundle.synthetic_data(b, seed + (split != "train"))
    return bundle
'''

# (class, attributes adopted, input names, output names, forward body)
SKIP_STAGES = {
    2: [("Stage0", ["a", "b", "c"], ["input0"], ["node1", "node2", "node3"],
         "node1 = torch.relu(self.a(input0))\nreturn (node1, torch.tanh(self.b(node1)), torch.relu(self.c(node1)))"),
        ("Stage1", ["head"], ["node1", "node2", "node3", "input0"], ["node4"],
         "return (self.head(torch.cat([node2 * node3 + node1, input0], dim=1)),)")],
    3: [("Stage0", ["a"], ["input0"], ["node1"], "return (torch.relu(self.a(input0)),)"),
        ("Stage1", ["b", "c"], ["node1"], ["node2", "node3"],
         "return (torch.tanh(self.b(node1)), torch.relu(self.c(node1)))"),
        ("Stage2", ["head"], ["node1", "node2", "node3", "input0"], ["node4"],
         "return (self.head(torch.cat([node2 * node3 + node1, input0], dim=1)),)")],
}


def _write_package(out: Path, spec: dict, stages: list, ranks: list[list[int]], batch_size: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for cls, attrs, ins, _outs, body in stages:
        adopt = "\n".join(f"        {line}" for line in attrs)
        src = (f"import torch\nfrom torch import nn\n\n\nclass {cls}(nn.Module):\n"
               f"    def __init__(self, model):\n        super().__init__()\n{adopt}\n\n"
               f"    def forward(self, {', '.join(ins)}):\n{textwrap.indent(body, ' ' * 8)}\n")
        (out / f"{cls.lower()}.py").write_text(src)
    entries = "\n".join(f"        ({cls}(m), {ins!r}, {outs!r})," for cls, _a, ins, outs, _b in stages)
    imports = "\n".join(f"from .{cls.lower()} import {cls}" for cls, *_ in stages)
    (out / "__init__.py").write_text(
        f"import json\nimport pathlib\n\nfrom pipeshift.spec import ModelSpec\n\n{imports}\n\n"
        "_HERE = pathlib.Path(__file__).parent\n\n\ndef arch():\n    return 'test'\n\n\n"
        "def full_model():\n    plan = json.loads((_HERE / 'plan.json').read_text())\n"
        "    return ModelSpec.from_json(plan['model']).build().model\n\n\n"
        f"def model(criterion):\n    m = full_model()\n    return [\n{entries}\n"
        f"        (criterion, [{stages[-1][3][0]!r}, 'target'], ['loss']),\n    ]\n")
    k = len(stages)
    (out / "conf.json").write_text(json.dumps({"module_to_stage_map": list(range(k)) + [k - 1],
                                               "stage_to_rank_map": {str(s): r for s, r in enumerate(ranks)}}))
    (out / "plan.json").write_text(json.dumps({"version": 1, "batch_size": batch_size, "model": spec}))
    return out


def mlp_package(out: Path, cuts: list[int], ranks: list[list[int]] | None = None, batch_size: int = 4) -> Path:
    """The zoo MLP (depth 4: layers.0 … layers.6) cut before the given linear layers."""
    bounds = [0, *[2 * c for c in cuts], 7]
    stages = []
    for s, (a, b) in enumerate(zip(bounds, bounds[1:])):
        attrs = ["self.layers = nn.Module()"] + [f"self.layers.add_module('{i}', model.layers[{i}])" for i in range(a, b)]
        name_in = "input0" if s == 0 else f"node{a}"
        body = "x = " + name_in + "\n" + "\n".join(f"x = self.layers._modules['{i}'](x)" for i in range(a, b))
        stages.append((f"Stage{s}", attrs, [name_in], [f"node{b}"], body + "\nreturn (x,)"))
    return _write_package(out, MLP_SPEC, stages, ranks or [[s] for s in range(len(stages))], batch_size)


def skip_package(out: Path, num_stages: int, ranks: list[list[int]] | None = None, batch_size: int = 4) -> Path:
    stages = [(cls, [f"self.{a} = model.{a}" for a in attrs], ins, outs, body)
              for cls, attrs, ins, outs, body in SKIP_STAGES[num_stages]]
    spec = {"callable": "runtime_test_skipnet:build", "kwargs": {}, "seed": 5}
    return _write_package(out, spec, stages, ranks or [[s] for s in range(num_stages)], batch_size)


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch) -> Path:
    """A scratch directory whose user module (the skip model) is importable here and in children."""
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "runtime_test_skipnet.py").write_text(SKIP_MODULE)
    monkeypatch.syspath_prepend(str(mods))
    sys.modules.pop("runtime_test_skipnet", None)
    return tmp_path


# -- running ranks ----------------------------------------------------------------------------


def _env(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(workdir / "mods"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def start_ranks(workdir: Path, pkg: Path, world: int, args: list[str], per_rank: dict[int, list[str]] | None = None,
                timeout_s: float = 20, packages: dict[int, Path] | None = None) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for r in range(world):
        cmd = [PY, "-m", "pipeshift", "train", str((packages or {}).get(r, pkg)), "--rank", str(r), "--world-size", str(world),
               "--dist-addr", f"127.0.0.1:{port}", "--threads", "1", "--no-progress", "--timeout", str(timeout_s),
               "--output-dir", str(workdir / "out"), *args, *(per_rank or {}).get(r, [])]
        procs.append(subprocess.Popen(cmd, cwd=workdir, env=_env(workdir), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs: list[subprocess.Popen], limit: float = TIMEOUT) -> list[tuple[int, str, str]]:
    deadline = time.monotonic() + limit
    out = []
    try:
        for p in procs:
            o, e = p.communicate(timeout=max(deadline - time.monotonic(), 1))
            out.append((p.returncode, o, e))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return out


def train(workdir: Path, pkg: Path, world: int, *args: str, per_rank=None, expect_ok: bool = True):
    results = finish(start_ranks(workdir, pkg, world, list(args), per_rank))
    if expect_ok:
        for r, (rc, _o, e) in enumerate(results):
            assert rc == 0, f"rank {r} exited {rc}:\n{e[-3000:]}"
    return results


# -- single-process references ----------------------------------------------------------------


def _bundle(spec: dict):
    return ModelSpec.from_json(spec).build()


def reference_accumulate(spec: dict, steps: int, m: int, b: int, make_opt, seed: int = 0):
    """Plain single-process training: gradient accumulation over m microbatches per step."""
    return accumulate(_bundle(spec), steps, m, b, make_opt, seed)


def reference_versions(spec: dict, stage_fqns: list[list[str]], microbatches: int, b: int, lr: float,
                       momentum: float, version_of, step_every: int, seed: int = 0):
    """Single-process emulation of weight-version semantics.

    Microbatch ``t``'s forward and backward on stage ``s`` use that stage's weights after
    ``version_of(s, t)`` updates; gradients (mean over ``step_every`` microbatches) update the
    newest weights every ``step_every`` microbatches.
    """
    bundle = _bundle(spec)
    model, crit = bundle.model, bundle.criterion()
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(params.values(), lr=lr, momentum=momentum)
    history = [{n: p.detach().clone() for n, p in params.items()}]
    data = stream(bundle, b, seed)
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    for t in range(microbatches):
        x, y = next(data)
        weights = {}
        for s, fqns in enumerate(stage_fqns):
            version = history[version_of(s, t)]
            weights.update({n: version[n].clone().requires_grad_() for n in fqns})
        loss = crit(functional_call(model, weights, x), y)
        for n, g in zip(weights, torch.autograd.grad(loss, list(weights.values()))):
            grads[n] += g
        if (t + 1) % step_every == 0:
            for n, p in params.items():
                p.grad = grads[n] / step_every
                grads[n] = torch.zeros_like(p)
            opt.step()
            opt.zero_grad()
            history.append({n: p.detach().clone() for n, p in params.items()})
    return model


def sgd(lr=0.05, momentum=0.9):
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum)


# -- synchronous schedules: exact equality with gradient accumulation ---------------------------

SYNC_CASES = [
    # schedule, model, stages, ranks per stage, microbatches
    ("flush", "mlp", [1], [[0], [1]], 4),
    ("gpipe", "mlp", [1, 2], [[0], [1], [2]], 3),
    ("flush", "skip", 3, [[0], [1], [2]], 4),
    ("gpipe", "skip", 2, [[0], [1]], 2),
    ("flush", "mlp", [2], [[0, 1], [2]], 4),  # replicated first stage: data sharded over it
    ("gpipe", "skip", 2, [[0], [1, 2]], 4),  # replicated last stage: targets dealt to both replicas
]


@pytest.mark.parametrize("schedule, model, shape, ranks, m", SYNC_CASES,
                         ids=[f"{c[0]}-{c[1]}-{'x'.join(str(len(r)) for r in c[3])}" for c in SYNC_CASES])
def test_synchronous_schedules_match_gradient_accumulation(workdir, schedule, model, shape, ranks, m):
    if model == "mlp":
        pkg, spec = mlp_package(workdir / "pkg", shape, ranks), MLP_SPEC
    else:
        pkg, spec = skip_package(workdir / "pkg", shape, ranks), {"callable": "runtime_test_skipnet:build", "seed": 5}
    world = sum(len(r) for r in ranks)
    steps = 3
    train(workdir, pkg, world, "--schedule", schedule, "--microbatches", str(m), "--steps", str(steps),
          "--lr", "0.05", "--momentum", "0.9", "--checkpoint-dir", str(workdir / "ck"))
    ref = reference_accumulate(spec, steps, m, 4, sgd())
    assert_same_weights(final_weights(workdir / "ck"), ref)


def test_flush_run_writes_metrics_trace_and_evaluates(workdir):
    pkg = mlp_package(workdir / "pkg", [2])
    train(workdir, pkg, 2, "--microbatches", "2", "--steps", "2", "--lr", "0.1", "--eval-steps", "2",
          "--checkpoint-dir", str(workdir / "ck"))
    rows = {r: list(csv.DictReader(open(workdir / "out" / f"rank{r}" / "metrics.csv"))) for r in (0, 1)}
    for r in (0, 1):
        train_rows = [x for x in rows[r] if x["split"] == "train"]
        assert [int(x["step"]) for x in train_rows] == [1, 2]
        assert all(float(x["samples_per_s"]) > 0 and float(x["compute_s"]) > 0 for x in train_rows)
        assert all(x["stage"] == str(r) for x in rows[r])
    assert all(x["loss"] == "" for x in rows[0])  # only the last stage sees the loss
    val = [x for x in rows[1] if x["split"] == "val"]
    assert len(val) == 1
    # evaluation = forward-only loss of the trained weights on the val split
    bundle = _bundle(MLP_SPEC)
    bundle.model.load_state_dict(final_weights(workdir / "ck"))
    bundle.model.eval()
    data, crit = stream(bundle, 4, 0, "val"), bundle.criterion()
    with torch.no_grad():
        want = torch.stack([crit(bundle.model(*x), y) for x, y in (next(data) for _ in range(4))]).mean()
    assert abs(float(val[0]["loss"]) - float(want)) <= 1e-5 * abs(float(want))
    for r in (0, 1):
        events = json.loads((workdir / "out" / f"rank{r}" / "trace.json").read_text())["traceEvents"]
        work = [e for e in events if e["ph"] == "X"]
        assert work and all(e["pid"] == r and e["tid"] in (0, 1) and e["dur"] >= 0 for e in work)
        threads = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
        assert threads == {0: "compute", 1: "communication"}
        names = {e["name"] for e in work}
        assert {"F0", "F1", "B0", "B1", "step"} <= names


# -- asynchronous schedules: their weight-version semantics -------------------------------------


def _stage_fqns(spec: dict, package: Path) -> list[list[str]]:
    conf = json.loads((package / "conf.json").read_text())
    from pipeshift.runtime.package import load_stage_package

    pkg = load_stage_package(package)
    entries = pkg.entries(_bundle(spec).criterion())
    out: list[list[str]] = [[] for _ in conf["stage_to_rank_map"]]
    for (module, _i, _o), stage in zip(entries, conf["module_to_stage_map"]):
        out[stage] += [n for n, _ in module.named_parameters()]
    return out


# schedule -> (steps, weight version of stage s for microbatch t, microbatches per update), given stages, m
WEIGHT_VERSIONS = {
    # PipeDream: stage s runs microbatch t on the weights after t - (stages - s - 1) updates,
    # forward and backward alike, and updates after every microbatch
    "1f1b": (3, lambda stages, m: (lambda s, t: max(0, t - (stages - s - 1)), 1)),
    # PipeDream-2BW: W(t+1) = W(t) - lr * grad(W(t-1)); minibatch b runs on W(max(b-1, 0))
    "2bw": (4, lambda stages, m: (lambda s, t: max(t // m - 1, 0), m)),
}


@pytest.mark.parametrize("schedule", sorted(WEIGHT_VERSIONS))
@pytest.mark.parametrize("model, shape", [("mlp", [2]), ("skip", 3)])
def test_asynchronous_schedules_match_their_weight_versions(workdir, schedule, model, shape):
    if model == "mlp":
        pkg, spec = mlp_package(workdir / "pkg", shape), MLP_SPEC
    else:
        pkg, spec = skip_package(workdir / "pkg", shape), {"callable": "runtime_test_skipnet:build", "seed": 5}
    stages = len(json.loads((pkg / "conf.json").read_text())["stage_to_rank_map"])
    m = stages
    steps, rule = WEIGHT_VERSIONS[schedule]
    version_of, step_every = rule(stages, m)
    train(workdir, pkg, stages, "--schedule", schedule, "--microbatches", str(m), "--steps", str(steps),
          "--lr", "0.05", "--momentum", "0.9", "--checkpoint-dir", str(workdir / "ck"))
    ref = reference_versions(spec, _stage_fqns(spec, pkg), m * steps, 4, 0.05, 0.9, version_of, step_every)
    assert_same_weights(final_weights(workdir / "ck"), ref)
    # and it is not plain synchronous SGD: the versions matter
    sync = reference_versions(spec, _stage_fqns(spec, pkg), m * steps, 4, 0.05, 0.9, lambda s, t: t // step_every,
                              step_every)
    with pytest.raises(AssertionError):
        assert_same_weights(final_weights(workdir / "ck"), sync)


# -- checkpoints: resume and export --------------------------------------------------------------


def test_resumed_flush_run_equals_uninterrupted_run_and_exports(workdir):
    pkg = mlp_package(workdir / "pkg", [1])
    common = ["--microbatches", "3", "--optimizer", "adam", "--lr", "0.01", "--lr-scheduler", "step",
              "--lr-scheduler-arg", "step_size=1", "--lr-scheduler-arg", "gamma=0.5"]
    train(workdir, pkg, 2, *common, "--steps", "4", "--checkpoint-dir", str(workdir / "whole"), "--checkpoint-every", "2")
    train(workdir, pkg, 2, *common, "--steps", "2", "--checkpoint-dir", str(workdir / "parts"))
    assert (workdir / "parts" / "latest").read_text().strip() == "step-00000002"
    train(workdir, pkg, 2, *common, "--steps", "4", "--checkpoint-dir", str(workdir / "parts"), "--resume")
    whole, resumed = final_weights(workdir / "whole"), final_weights(workdir / "parts")
    assert set(whole) == set(resumed)
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
    # the resumed run's optimizer moments and LR schedule continued too
    meta = ckpt.read_meta(ckpt.resolve(workdir / "parts"))
    files = ckpt.stage_files(ckpt.resolve(workdir / "parts"), meta)
    assert files[0]["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.01 * 0.5 ** 4)
    assert set(files[0]["optimizer"]["state"]) == {"layers.0.weight", "layers.0.bias"}

    # export: one state_dict that loads into the original model
    out = workdir / "model.pt"
    assert cli.main(["export", str(workdir / "whole"), "-o", str(out)]) == 0
    state = torch.load(out, weights_only=True)
    model = _bundle(MLP_SPEC).model
    model.load_state_dict(state)  # strict
    for name, t in model.state_dict().items():
        assert torch.equal(t, whole[name])
    assert cli.main(["export", str(workdir / "whole" / "step-00000002"), "-o", str(workdir / "m2.pt")]) == 0
    assert set(torch.load(workdir / "m2.pt", weights_only=True)) == set(state)


def test_export_rejects_incomplete_or_foreign_checkpoints(workdir, capsys):
    pkg = mlp_package(workdir / "pkg", [2])
    where = workdir / "ck" / "step-00000001"
    bundle = _bundle(MLP_SPEC)
    halves = [{k: v for k, v in bundle.model.state_dict().items() if k.startswith(p)}
              for p in ("layers.0.", "layers.")]
    halves[1] = {k: v for k, v in halves[1].items() if k not in halves[0]}
    for s, half in enumerate(halves):
        ckpt.save_file({"stage": s, "step": 1, "model": half}, where / f"stage{s}.pt")
    meta = {"format": ckpt.FORMAT, "step": 1, "num_stages": 2, "package": str(pkg)}
    ckpt.write_meta(meta, where)
    ckpt.mark_latest(workdir / "ck", 1)
    assert cli.main(["export", str(workdir / "ck"), "-o", str(workdir / "m.pt"), "--package", str(pkg)]) == 0
    capsys.readouterr()
    # a stage file that holds another model's tensors does not pass the check against the package
    ckpt.save_file({"stage": 1, "step": 1, "model": {**halves[1], "extra.weight": torch.zeros(1)}},
                   where / "stage1.pt")
    ckpt.write_meta(meta, where)
    assert cli.main(["export", str(workdir / "ck"), "-o", str(workdir / "m.pt"), "--package", str(pkg)]) == 1
    assert "unexpected ['extra.weight']" in capsys.readouterr().err
    (where / "stage1.pt").write_bytes(b"not a checkpoint")
    ckpt.write_meta(meta, where)
    assert cli.main(["export", str(workdir / "ck"), "-o", str(workdir / "m.pt")]) == 1
    assert "stage1.pt" in capsys.readouterr().err
    (where / "stage1.pt").unlink()
    assert cli.main(["export", str(workdir / "ck"), "-o", str(workdir / "m.pt")]) == 1
    assert "incomplete" in capsys.readouterr().err
    assert cli.main(["export", str(workdir / "nothing"), "-o", str(workdir / "m.pt")]) == 1
    assert "no such checkpoint" in capsys.readouterr().err


# -- no silent hangs ---------------------------------------------------------------------------


def _wait_for_progress(workdir: Path, rank: int, rows: int, procs, limit: float = 60) -> None:
    path = workdir / "out" / f"rank{rank}" / "metrics.csv"
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) > rows:
            return
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.1)
    for p in procs:
        p.kill()
    raise AssertionError("the pipeline made no progress: " + " | ".join(p.communicate()[1][-500:] for p in procs))


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("pipeshift train: error:")]


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_dead_or_silent_rank_ends_every_other_rank_with_one_clear_message(workdir, how):
    pkg = mlp_package(workdir / "pkg", [1, 2])
    timeout = 6.0
    procs = start_ranks(workdir, pkg, 3, ["--microbatches", "3", "--steps", "100000"], timeout_s=timeout)
    victim = procs[1] if how == "kill" else procs[2]
    try:
        _wait_for_progress(workdir, 2, 3, procs)
        os.kill(victim.pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        t0 = time.monotonic()
        survivors = [p for p in procs if p is not victim]
        results = finish(survivors, limit=3 * timeout + 30)
        elapsed = time.monotonic() - t0
    finally:
        if how == "stop":
            os.kill(victim.pid, signal.SIGKILL)
        finish([victim], limit=10)
    assert elapsed <= 2 * timeout + 10, f"survivors took {elapsed:.1f} s"
    for p, (rc, _out, err) in zip(survivors, results):
        rank = procs.index(p)
        assert rc != 0
        lines = _error_lines(err)
        assert len(lines) == 1, err[-2000:]
        line = lines[0]
        assert "Traceback" not in err
        assert f"rank {rank} (stage {rank})" in line and "action #" in line and "step " in line
        assert "microbatch" in line and ("activation" in line or "gradient" in line)
    # the rank next to the victim names it
    neighbour = _error_lines(results[0][2] if how == "kill" else results[1][2])[0]
    if how == "kill":
        assert "rank 1 (stage 1)" in neighbour and "exited" in neighbour
    else:
        assert "rank 2 (stage 2)" in neighbour and f"no answer within {timeout:g} s" in neighbour
        # and the rank beyond it, which only saw its neighbour go, names the original failure too
        far = _error_lines(results[0][2])[0]
        assert far.startswith("pipeshift train: error: rank 2 failed first (rank 1 (stage 1): no answer"), far


# -- start-up checks -----------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["too-few-microbatches", "uneven-replicas", "different-config", "bad-package"])
def test_startup_mistakes_are_reported_on_every_rank(workdir, case):
    ranks = [[0, 1], [2]] if case == "uneven-replicas" else [[0], [1]]
    pkg = mlp_package(workdir / "pkg", [1], ranks)
    args, per_rank = ["--steps", "2", "--microbatches", "3"], None
    expected = {
        "too-few-microbatches": "--microbatches 1 is fewer than the 2 pipeline stages",
        "uneven-replicas": "stage 0 has 2 replicas but a minibatch has 3 microbatches",
        "different-config": "different configurations — lr: rank 0 has 0.01, rank 1 has 0.5",
        "bad-package": "rank 1 could not start: ",
    }[case]
    if case == "too-few-microbatches":
        args = ["--steps", "2", "--microbatches", "1"]
    if case == "different-config":
        per_rank = {1: ["--lr", "0.5"]}
    if case == "bad-package":
        bad = workdir / "bad"
        bad.mkdir()
        (bad / "__init__.py").write_text("")
        (bad / "conf.json").write_text('{"module_to_stage_map": [0, 1,')
        expected += f"{bad / 'conf.json'}:1: invalid JSON"
        results = finish(start_ranks(workdir, pkg, 2, args, packages={1: bad}), limit=60)
    else:
        results = train(workdir, pkg, sum(map(len, ranks)), *args, per_rank=per_rank, expect_ok=False)
    for rc, _o, err in results:
        assert rc == 1, err[-2000:]
        lines = _error_lines(err)
        assert len(lines) == 1 and expected in lines[0], err[-2000:]
        assert "Traceback" not in err


# -- launching -----------------------------------------------------------------------------------


def test_launch_local_runs_ranks_under_torchrun(workdir):
    pkg = mlp_package(workdir / "pkg", [2])
    proc = subprocess.run([PY, "-m", "pipeshift", "launch", "--local", "2", str(pkg), "--steps", "2",
                           "--microbatches", "2", "--no-progress", "--output-dir", str(workdir / "out")],
                          cwd=workdir, env=_env(workdir), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained 2 steps" in proc.stdout
    for r in (0, 1):
        assert (workdir / "out" / f"rank{r}" / "metrics.csv").exists()


def test_launch_hosts_prints_per_machine_commands(tmp_path, capsys):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("# cluster\nnode-a 2\nnode-b slots=1\n")
    assert cli.main(["launch", "--hosts", str(hosts), "--port", "29999", "stages/", "--steps", "5"]) == 0
    out = capsys.readouterr().out
    torchrun = [line for line in out.splitlines() if "torch.distributed.run" in line]
    assert len(torchrun) == 2
    assert all("--rdzv-backend c10d --rdzv-endpoint node-a:29999" in line for line in torchrun)
    assert "--nproc-per-node 2" in torchrun[0] and "--nproc-per-node 1" in torchrun[1]
    assert all("-m pipeshift -- train stages/ --steps 5" in line for line in torchrun)
    explicit = [line for line in out.splitlines() if "--dist-addr" in line]
    assert [line.split("--rank ")[1].split()[0] for line in explicit] == ["0", "1", "2"]
    assert all("--world-size 3 --dist-addr node-a:29999" in line for line in explicit)
    assert explicit[2].startswith("[node-b]")


def test_launch_hosts_ssh_runs_each_machine(tmp_path):
    """``--ssh`` with a stand-in ssh that runs the command locally: every host runs, output is tagged."""
    fake = tmp_path / "fake_ssh"
    fake.write_text("#!/bin/sh\nhost=$1\nshift\necho \"on $host\"\nexec sh -c \"exit 0\"\n")
    fake.chmod(0o755)
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("alpha\nbeta\n")
    proc = subprocess.run([PY, "-m", "pipeshift", "launch", "--hosts", str(hosts), "--ssh", "--ssh-program", str(fake),
                           "stages/"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "[alpha] on alpha" in proc.stdout and "[beta] on beta" in proc.stdout
    fake.write_text("#!/bin/sh\n[ \"$1\" = beta ] && exit 3\nexec sleep 30\n")
    t0 = time.monotonic()
    proc = subprocess.run([PY, "-m", "pipeshift", "launch", "--hosts", str(hosts), "--ssh", "--ssh-program", str(fake),
                           "stages/"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and "beta exited with 3" in proc.stderr
    assert time.monotonic() - t0 < 20  # the other machine was stopped, not waited for


@pytest.mark.parametrize("text, message", [
    ("", "no hosts listed"), ("a 0\n", "hosts.txt:1: slots"), ("a\na\n", "2: host 'a' listed twice"),
    ("a b c\n", "1: expected HOST [SLOTS]"), ("-rf\n", "1: '-rf' is not a host name"),
])
def test_launch_rejects_bad_hosts_files(tmp_path, capsys, text, message):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text(text)
    assert cli.main(["launch", "--hosts", str(hosts), "stages/"]) == 1
    assert message in capsys.readouterr().err
