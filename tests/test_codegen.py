"""Code generator: generated stages compose to the original model exactly.

For each model (small local ones, and tiny zoo ResNet-50, GPT, GNMT, Inception-v3) and plans of
2, 3 and 5 stages cut from one topological order — with cuts inside residual blocks and
branches — running the generated stages in order gives outputs and parameter gradients that are
bitwise equal to the original model's; the files compile and pass ruff; the stages' state_dicts
re-assemble into the original's.
"""

from __future__ import annotations

import ast
import json
import py_compile
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from helpers import REPO
from pipeshift.codegen import build_stages, generate_package, load_package, render_package
from pipeshift.errors import PipeshiftError
from pipeshift.graph.capture import LeafPolicy, capture
from pipeshift.spec import ModelSpec

TESTS = Path(__file__).resolve().parent

TINY_ZOO = {
    "resnet50": dict(width=4, num_classes=10, image_size=32),
    "inception_v3": dict(width=4, num_classes=10, image_size=75),
    "gnmt": dict(width=16, depth=3, vocab_size=40, seq_len=6),
    "gpt": dict(width=16, depth=2, heads=2, vocab_size=40, block_size=16, seq_len=8),
}
BATCH = 2


def spec_of(name: str, **kwargs: Any) -> ModelSpec:
    if name in TINY_ZOO:
        return ModelSpec(callable=f"pipeshift.models:{name}", kwargs={**TINY_ZOO[name], **kwargs})
    return ModelSpec(callable=f"test_codegen_models:{name}", kwargs=kwargs)


_node_cache: dict[str, list[str]] = {}


def node_ids(spec: ModelSpec, policy: LeafPolicy | None = None) -> list[str]:
    """The graph's node ids in topological (fx) order."""
    key = json.dumps([spec.to_json(), policy.to_json() if policy else None], sort_keys=True)
    if key not in _node_cache:
        bundle = spec.build()
        _node_cache[key] = [g.node_id for g in capture(bundle.model, bundle.example_inputs(BATCH), policy).groups]
    return _node_cache[key]


def plan_for(spec: ModelSpec, cuts: list[int], replicas: list[int] | None = None,
             policy: LeafPolicy | None = None) -> dict[str, Any]:
    """A plan.json dict: the topological order cut before the node indices in ``cuts``."""
    ids = node_ids(spec, policy)
    bounds = [0, *cuts, len(ids)]
    stages, rank = [], 0
    for i in range(len(bounds) - 1):
        r = replicas[i] if replicas else 1
        stages.append({"stage_id": i, "nodes": ids[bounds[i]:bounds[i + 1]], "replicas": r,
                       "ranks": list(range(rank, rank + r))})
        rank += r
    return {"version": 1, "graph": "graph.txt", "model": spec.to_json(),
            "leaf_policy": policy.to_json() if policy else None,
            "batch_size": BATCH, "stages": stages}


def even_cuts(n_nodes: int, n_stages: int) -> list[int]:
    return [round(n_nodes * k / n_stages) for k in range(1, n_stages)]


def crossing(groups: list[Any], cut: int) -> int:
    """How many tensors (raw inputs aside) a cut before index ``cut`` has to carry."""
    before = {g.node_id for g in groups[:cut] if g.op != "placeholder"}
    return len({src for g in groups[cut:] for src in g.inputs if src in before})


def cut_inside(spec: ModelSpec, fx_prefix: str, n_stages: int) -> list[int]:
    """Even cuts, with the first one moved inside the block whose fx nodes start with ``fx_prefix``,
    at a point where two or more tensors cross (a skip connection, or parallel branches)."""
    bundle = spec.build()
    groups = capture(bundle.model, bundle.example_inputs(BATCH)).groups
    inside = [i for i, g in enumerate(groups) if g.fx_name.startswith(fx_prefix)]
    assert len(inside) >= 2, f"no block {fx_prefix!r} to cut through"
    from_middle = sorted(inside[1:], key=lambda i: abs(i - inside[len(inside) // 2]))
    middle = next(i for i in from_middle if crossing(groups, i) >= 2)
    cuts = even_cuts(len(groups), n_stages)
    cuts[0] = middle
    cuts = sorted(set(cuts))
    for i in range(1, len(cuts)):  # keep cuts strictly increasing and stages non-empty
        cuts[i] = max(cuts[i], cuts[i - 1] + 1)
    assert cuts[-1] < len(groups) and len(cuts) == n_stages - 1
    return cuts


def run_stages(stages: list[tuple[nn.Module, list[str], list[str]]], inputs: tuple[torch.Tensor, ...],
               final: list[str]) -> list[torch.Tensor]:
    """Run stages in order, passing tensors by name, as a one-process pipeline would."""
    env: dict[str, torch.Tensor] = {f"input{i}": x for i, x in enumerate(inputs)}
    for module, ins, outs in stages:
        result = module(*[env[n] for n in ins])
        assert isinstance(result, tuple) and len(result) == len(outs)
        assert all(torch.is_tensor(t) for t in result), "everything on the wire is a plain tensor"
        env.update(zip(outs, result))
    return [env[n] for n in final]


def loss_of(outputs: list[torch.Tensor]) -> torch.Tensor:
    return sum((o.float() ** 2).mean() for o in outputs)  # type: ignore[return-value]


def assert_exact(spec: ModelSpec, plan: dict[str, Any], pkg_dir: Path) -> None:
    """Stages from the generated package vs. the original model: outputs, grads, buffers, state_dict."""
    bundle = spec.build()
    reference = bundle.model
    original = spec.build().model  # same seed: same weights; the stages adopt its pieces
    inputs = tuple(bundle.example_inputs(BATCH))

    generate_package(plan, pkg_dir)
    pkg = load_package(pkg_dir)
    criterion = nn.MSELoss()
    listed = pkg.model(criterion, original)
    *stages, (crit, crit_in, crit_out) = listed
    assert crit is criterion and crit_out == ["loss"] and crit_in[-1] == "target"
    assert len(stages) == len(plan["stages"])

    torch.manual_seed(0)
    ref_out = reference(*inputs)
    ref_out = list(ref_out) if isinstance(ref_out, (tuple, list)) else [ref_out]
    torch.manual_seed(0)
    got = run_stages(stages, inputs, crit_in[:-1])
    assert len(got) == len(ref_out)
    for a, b in zip(got, ref_out):
        assert torch.equal(a, b)
    loss_of(ref_out).backward()
    loss_of(got).backward()
    ref_params = dict(reference.named_parameters())
    for name, p in original.named_parameters():
        q = ref_params[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), f"gradient of {name} differs"
    for (name, b), (_, c) in zip(original.named_buffers(), reference.named_buffers()):
        assert torch.equal(b, c), f"buffer {name} differs after forward"

    merged: dict[str, torch.Tensor] = {}
    for module, _, _ in stages:
        for key, value in module.state_dict().items():
            if key in merged:
                assert torch.equal(merged[key], value)
            merged[key] = value
    full = original.state_dict()
    assert set(merged) == set(full)
    for key in full:
        assert torch.equal(merged[key], full[key]), key
    fresh = spec.build().model
    fresh.load_state_dict(merged, strict=True)

    for f in sorted(pkg_dir.glob("*.py")):
        py_compile.compile(str(f), doraise=True)
    ruff = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--config", str(REPO / "pyproject.toml"), str(pkg_dir)],
        capture_output=True, text=True, timeout=120,
    )
    assert ruff.returncode == 0, ruff.stdout + ruff.stderr

    conf = json.loads((pkg_dir / "conf.json").read_text())
    n = len(plan["stages"])
    assert conf["module_to_stage_map"] == [*range(n), n - 1]
    assert conf["stage_to_rank_map"] == {str(s["stage_id"]): s["ranks"] for s in plan["stages"]}
    assert json.loads((pkg_dir / "plan.json").read_text()) == plan


# -- local models ------------------------------------------------------------------------
LOCAL_CASES = [
    ("residual_cnn", [4]),  # between BatchNorm and an in-place ReLU
    ("residual_cnn", [3, 7]),  # the skip of block 0 crosses the cut
    ("residual_cnn", [2, 5, 9, 14]),
    ("lstm_tuples", [4]),  # after the encoder: its (out, (h, c)) tuple crosses
    ("lstm_tuples", [5, 9]),
    ("lstm_tuples", [3, 4, 6, 8]),  # raw input read by the last stage, tuples crossing twice
    ("branchy_cat", [4]),  # inside the first fan-out
    ("branchy_cat", [3, 8]),
    ("branchy_cat", [2, 5, 9, 14]),  # a bare parameter crosses a cut
    ("traced_constant", [3]),  # tensors forward builds from literals travel inside the stage file
    ("step_loop", [6]),  # captured by the torch.export fallback: ATen ops, one cell called in two stages
    ("step_loop", [4, 8, 11]),
    ("wrapped_function", [3]),
    ("sequential_root", [3]),  # FQNs "0", "1", ...: the stage indexes itself like the nn.Sequential  # a torch.fx.wrap'ed user function and math.sqrt, imported by the stage file
]


@pytest.mark.parametrize(("name", "cuts"), LOCAL_CASES, ids=[f"{n}-{len(c) + 1}" + "-".join(map(str, c)) for n, c in LOCAL_CASES])
def test_local_models_exact(tmp_path: Path, name: str, cuts: list[int]) -> None:
    spec = spec_of(name)
    assert_exact(spec, plan_for(spec, cuts), tmp_path / "pkg")


# -- zoo models --------------------------------------------------------------------------
ZOO_BLOCKS = {"resnet50": "layer1_0", "inception_v3": "mixed_5b", "gpt": "h_0", "gnmt": "encoder"}


@pytest.mark.parametrize("n_stages", [2, 3, 5])
@pytest.mark.parametrize("name", list(TINY_ZOO))
def test_zoo_models_exact(tmp_path: Path, name: str, n_stages: int) -> None:
    spec = spec_of(name)
    cuts = cut_inside(spec, ZOO_BLOCKS[name], n_stages)
    assert_exact(spec, plan_for(spec, cuts), tmp_path / "pkg")


# -- as a multi-process runtime runs them ----------------------------------------------------
def run_detached(stages: list[tuple[nn.Module, list[str], list[str]]], inputs: tuple[torch.Tensor, ...],
                 final: list[str]) -> torch.Tensor:
    """Forward with every boundary tensor detached (as if received), then backward stage by stage,
    sending each input's gradient back to its producer; returns the loss."""
    env: dict[str, torch.Tensor] = {f"input{i}": x for i, x in enumerate(inputs)}
    records = []
    for module, ins, outs in stages:
        args = [env[n] if n.startswith("input") else env[n].detach().requires_grad_(env[n].requires_grad) for n in ins]
        result = module(*args)
        records.append((args, ins, result, outs))
        env.update(zip(outs, result))
    last = [env[n].detach().requires_grad_() for n in final]
    loss = loss_of(last)
    loss.backward()
    grads: dict[str, torch.Tensor] = {n: t.grad for n, t in zip(final, last)}
    for args, ins, result, outs in reversed(records):
        pairs = [(r, grads[o]) for r, o in zip(result, outs) if o in grads and r.requires_grad]
        if pairs:
            torch.autograd.backward([r for r, _ in pairs], [g for _, g in pairs])
        for a, n in zip(args, ins):
            if a.requires_grad and a.grad is not None:
                grads[n] = grads[n] + a.grad if n in grads else a.grad
    return loss


DETACHED_CASES = [("residual_cnn", [4]), ("lstm_tuples", [3, 4, 6, 8]), ("branchy_cat", [2, 5, 9, 14]),
                  ("gnmt", [5, 16]), ("gpt", [19, 31])]


@pytest.mark.parametrize(("name", "cuts"), DETACHED_CASES, ids=[n for n, _ in DETACHED_CASES])
def test_stages_run_with_detached_boundaries(name: str, cuts: list[int]) -> None:
    """What a real pipeline does: in-place ops on received tensors, partial tuples, skips all work."""
    spec = spec_of(name)
    bundle = spec.build()
    reference, original = bundle.model, spec.build().model
    inputs = tuple(bundle.example_inputs(BATCH))
    stages = build_stages(plan_for(spec, cuts), original)
    final = render_package(plan_for(spec, cuts)).layout.criterion_inputs[:-1]
    out = reference(*inputs)
    ref_loss = loss_of(list(out) if isinstance(out, (tuple, list)) else [out])
    ref_loss.backward()
    loss = run_detached(stages, inputs, final)
    assert torch.equal(loss, ref_loss)
    ref_params = dict(reference.named_parameters())
    for pname, p in original.named_parameters():
        q = ref_params[pname]
        assert (p.grad is None) == (q.grad is None), pname
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), pname


def test_leaf_policy_is_honoured(tmp_path: Path) -> None:
    """Whole residual blocks as leaves: the stage calls ``self.layer1[0](...)`` and stays exact."""
    spec = spec_of("resnet50")
    policy = LeafPolicy(max_depth=2)
    plan = plan_for(spec, [4, 9], policy=policy)
    assert_exact(spec, plan, tmp_path / "pkg")
    text = (tmp_path / "pkg" / "stage0.py").read_text() + (tmp_path / "pkg" / "stage1.py").read_text()
    assert "self.layer1[0](" in text and "self.layer1[0].conv1" not in text


# -- hostile inputs ----------------------------------------------------------------------------
def _import_fresh(pkg_dir: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Import the package and build its stages in a child process whose cwd is ``cwd``."""
    code = (
        "import sys; from pipeshift.codegen import load_package; "
        f"pkg = load_package({str(pkg_dir)!r}); print(len(pkg.model(None)))"
    )
    env = {"PYTHONPATH": f"{TESTS}", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_hostile_strings_are_escaped_and_never_run(tmp_path: Path) -> None:
    """A module repr with newlines and code, a string argument full of quotes, and spec kwargs with
    the same text: the package compiles, passes ruff, and importing it executes none of it."""
    from test_codegen_models import HOSTILE_TEXT

    spec = spec_of("hostile_strings", note=HOSTILE_TEXT)
    plan = plan_for(spec, [2], policy=LeafPolicy(leaf_types=("Tagged",)))
    pkg_dir = tmp_path / "pkg"
    assert_exact(spec, plan, pkg_dir)
    stage0 = (pkg_dir / "stage0.py").read_text()
    assert "self.tagged(input0, tag=" in stage0
    for f in pkg_dir.glob("*.py"):
        tree = ast.parse(f.read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert imported <= {"torch", "pipeshift.codegen.support", "pipeshift.spec", "stage0", "stage1"}, imported
        assert not {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} & {"os", "exec", "eval", "system"}
    result = _import_fresh(pkg_dir, tmp_path)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "PWNED").exists()
    pkg = load_package(pkg_dir)
    assert pkg.MODEL_SPEC["kwargs"]["note"] == HOSTILE_TEXT
    stage = pkg.model(None)[0][0]
    assert stage.tagged is not None  # the leaf kept its original FQN


def test_hostile_module_name_is_refused(tmp_path: Path) -> None:
    spec = spec_of("hostile_name")
    with pytest.raises(PipeshiftError, match="not a dotted module"):
        generate_package(plan_for(spec, [2]), tmp_path / "pkg")
    assert not (tmp_path / "pkg").exists()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: p["stages"][0]["nodes"].append('node1"; import os'), "is not a node id"),
        (lambda p: p["stages"][0].__setitem__("fqns", ["x; import os; os.system('touch PWNED')"]), "not a dotted module"),
        (lambda p: p["stages"][1]["nodes"].append("node999"), "lists node999"),
        (lambda p: p["stages"][1]["nodes"].pop(), "in no stage"),
        (lambda p: p["stages"][1]["nodes"].append(p["stages"][0]["nodes"][-1]), "exactly one stage"),
        (lambda p: p["stages"].reverse(), "pipeline order"),
        (lambda p: p.__setitem__("model", None), "no 'model' spec"),
        (lambda p: p["stages"][0].__setitem__("ranks", ["0"]), "ranks must be"),
        (lambda p: p["stages"][0].__setitem__("replicas", 2), "replicas=2 but 1 ranks"),
        (lambda p: p["stages"][1].__setitem__("ranks", [0]), "rank 0 is in stage 0 and stage 1"),
        (lambda p: p.__setitem__("batch_size", "32"), "batch_size"),
        (lambda p: p["stages"].append({"stage_id": 2, "nodes": []}), "no stage may be empty"),
        (lambda p: p["model"].__setitem__("callable", "os:system; x"), "pkg.module:callable"),
    ],
)
def test_bad_plans_give_one_clear_error(tmp_path: Path, mutate: Any, message: str) -> None:
    spec = spec_of("residual_cnn")
    plan = json.loads(json.dumps(plan_for(spec, [5])))
    mutate(plan)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(PipeshiftError, match=message) as err:
        generate_package(tmp_path, tmp_path / "pkg")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "pkg").exists()


def test_stage_reading_a_later_stage_is_refused(tmp_path: Path) -> None:
    spec = spec_of("residual_cnn")
    plan = plan_for(spec, [5])
    first, second = plan["stages"][0]["nodes"], plan["stages"][1]["nodes"]
    first.append(second.pop(0))  # node6 moves back; fine
    second.insert(0, first.pop(2))  # node3 moves forward: node4 (stage 0) would read it from stage 1
    with pytest.raises(PipeshiftError, match="reads node3 from the later stage 1"):
        render_package(plan)


def test_stage_of_only_inputs_is_refused() -> None:
    spec = spec_of("residual_cnn")
    with pytest.raises(PipeshiftError, match="holds only model inputs"):
        render_package(plan_for(spec, [1]))


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "plan.json").write_text('{\n  "version": 1,\n  "stages": [,]\n}\n')
    with pytest.raises(PipeshiftError, match=r"plan.json:3: invalid JSON"):
        render_package(tmp_path)


def test_profile_mismatch_means_the_model_changed(tmp_path: Path) -> None:
    spec = spec_of("residual_cnn")
    plan = plan_for(spec, [5])
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    profile = {"version": 1, "model": plan["model"], "nodes": {"node3": {"fx_name": "blocks_0_conv1"}}}
    (tmp_path / "profile.json").write_text(json.dumps(profile))
    render_package(tmp_path)  # matches today's capture
    profile["nodes"]["node3"]["fx_name"] = "stem"
    (tmp_path / "profile.json").write_text(json.dumps(profile))
    with pytest.raises(PipeshiftError, match="changed since profiling"):
        render_package(tmp_path)


# -- package behaviour ---------------------------------------------------------------------------
def test_output_is_deterministic_and_regeneration_replaces_stale_stages(tmp_path: Path) -> None:
    spec = spec_of("branchy_cat")
    five = render_package(plan_for(spec, [2, 5, 9, 14])).files
    assert render_package(plan_for(spec, [2, 5, 9, 14])).files == five
    pkg_dir = tmp_path / "pkg"
    generate_package(plan_for(spec, [2, 5, 9, 14]), pkg_dir)
    assert sorted(p.name for p in pkg_dir.glob("stage*.py")) == [f"stage{i}.py" for i in range(5)]
    load_package(pkg_dir)
    generate_package(plan_for(spec, [9]), pkg_dir)
    assert sorted(p.name for p in pkg_dir.glob("stage*.py")) == ["stage0.py", "stage1.py"]
    pkg = load_package(pkg_dir)
    assert len(pkg.model(None)) == 3


def test_refuses_to_overwrite_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(PipeshiftError, match="refusing to overwrite"):
        generate_package(plan_for(spec_of("residual_cnn"), [5]), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_load_package_leaves_sys_path_alone_and_loads_afresh(tmp_path: Path) -> None:
    generate_package(plan_for(spec_of("residual_cnn"), [5]), tmp_path / "pkg")
    before = list(sys.path)
    a, b = load_package(tmp_path / "pkg"), load_package(tmp_path / "pkg")
    assert sys.path == before
    assert a is not b and a.Stage0 is not b.Stage0
    assert a.arch() == "residual_cnn"
    assert isinstance(a.full_model(), nn.Module)


def test_tied_weights_across_stages_are_recorded(tmp_path: Path) -> None:
    spec = spec_of("gpt", tie_weights=True)
    n = len(node_ids(spec))
    plan = plan_for(spec, [n // 2])
    assert_exact(spec, plan, tmp_path / "pkg")
    conf = json.loads((tmp_path / "pkg" / "conf.json").read_text())
    assert conf["tied_parameters"] == [{"lm_head.weight": [1], "wte.weight": [0]}]


def test_replicas_go_to_the_rank_map(tmp_path: Path) -> None:
    spec = spec_of("residual_cnn")
    generate_package(plan_for(spec, [5, 10], replicas=[2, 1, 3]), tmp_path / "pkg")
    conf = json.loads((tmp_path / "pkg" / "conf.json").read_text())
    assert conf == {"module_to_stage_map": [0, 1, 2, 2], "stage_to_rank_map": {"0": [0, 1], "1": [2], "2": [3, 4, 5]}}


def test_build_stages_adopts_the_callers_weights() -> None:
    """In-process repartitioning: stages share the running model's tensors, nothing is copied."""
    spec = spec_of("residual_cnn")
    model = spec.build().model
    with torch.no_grad():
        model.head.weight.fill_(0.5)
    rng = torch.get_rng_state()
    stages = build_stages(plan_for(spec, [5, 10]), model)
    assert torch.equal(torch.get_rng_state(), rng)
    assert stages[-1][0].head.weight is model.head.weight
    assert [s[1] for s in stages][0] == ["input0"]


# -- command line ----------------------------------------------------------------------------------
def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": f"{TESTS}", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "pipeshift", "codegen", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_writes_the_package(tmp_path: Path) -> None:
    plan_dir = tmp_path / "plan"
    plan_dir.mkdir()
    (plan_dir / "plan.json").write_text(json.dumps(plan_for(spec_of("lstm_tuples"), [4, 8])))
    refused = _cli(str(plan_dir), "-o", str(tmp_path / "stages"), cwd=tmp_path)
    assert refused.returncode == 1 and "--trust-spec" in refused.stderr and refused.stderr.count("\n") == 1
    assert not (tmp_path / "stages").exists()
    result = _cli(str(plan_dir), "-o", str(tmp_path / "stages"), "--trust-spec", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "3 stages" in result.stdout
    assert {p.name for p in (tmp_path / "stages").iterdir()} >= {"stage0.py", "stage1.py", "stage2.py", "__init__.py",
                                                                 "conf.json", "plan.json"}


def test_cli_error_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "plan.json").write_text('{"version": 1,\n "stages": [{"nodes": ["node1"]}],\n "model": null}')
    result = _cli(str(tmp_path), "-o", str(tmp_path / "stages"), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "plan.json:3: model: no 'model' spec" in result.stderr


def test_module_called_in_two_stages_is_recorded_as_shared(tmp_path: Path) -> None:
    spec = spec_of("step_loop")
    generate_package(plan_for(spec, [6]), tmp_path / "pkg")
    conf = json.loads((tmp_path / "pkg" / "conf.json").read_text())
    assert conf["tied_parameters"] == [{f"cell.{n}": [0, 1]} for n in ("bias_hh", "bias_ih", "weight_hh", "weight_ih")]


# -- the literal writer ------------------------------------------------------------------------
WEIRD_STRINGS = ["", "plain", 'say "hi"', "it's", "back\\slash", "new\nline", "tab\tcr\r", "\x00\x1b\x7f",
                 "\u2028\u2029\x85", "é中\U0001f600", "\ud800", '"""', "'''", "\\N{BULLET}", "{x}"]


@pytest.mark.parametrize("text", WEIRD_STRINGS)
def test_string_literal_round_trips_as_one_ascii_line(text: str) -> None:
    from pipeshift.codegen.emit import comment_text, string_literal

    lit = string_literal(text)
    assert lit.isascii() and "\n" not in lit and "\r" not in lit
    assert ast.literal_eval(lit) == text
    note = comment_text(text)
    assert note.isascii() and note.isprintable() and len(note.splitlines()) <= 1


def test_constants_are_written_exactly() -> None:
    from pipeshift.codegen.emit import literal

    values = [None, True, 0, -7, 2**70, 0.1, -0.0, 1e-300, float("inf"), float("-inf"), 1.5 + 2j, "x\n'y'",
              (1,), (), [1, (2, 3)], {"k": [None]}, slice(None, -1, 2), Ellipsis, torch.float16, torch.bfloat16,
              torch.int64, torch.strided, torch.channels_last, torch.device("cpu"), torch.Size([2, 3])]
    for v in values:
        text = literal(v, "test")
        back = eval(text, {"torch": torch, "__builtins__": {"float": float, "complex": complex, "slice": slice}})
        assert back == v and type(back) is type(v), (v, text)
    assert str(eval(literal(float("nan"), "test"), {"__builtins__": {"float": float}})) == "nan"
    with pytest.raises(PipeshiftError, match="cannot write the constant"):
        literal(object(), "test")
