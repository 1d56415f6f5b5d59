"""Loading a stage package (CONTRIBUTING.md, "Stage package") without touching ``sys.path``.

The package directory is imported by codegen's :func:`~pipeshift.codegen.load_package`: under a
fresh name derived from its absolute path, registered in ``sys.modules`` so its
``from .stage0 import Stage0`` lines resolve; nothing is added to the import path. ``conf.json``
and ``plan.json`` are input files: every field the runtime uses is checked and a bad one is an
:class:`~pipeshift.errors.InputFileError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from pipeshift.codegen import load_package
from pipeshift.errors import InputFileError, PipeshiftError
from pipeshift.jsonfile import read_json_object, read_json_text
from pipeshift.plan import Plan, parse_plan
from pipeshift.runtime.stage import StageEntry
from pipeshift.runtime.ties import parse_ties
from pipeshift.spec import ModelBundle, ModelSpec



class AdoptingModule:
    """A package's module whose ``model(criterion)`` adopts the layers of a model we already hold.

    Codegen's ``model(criterion, original)`` builds the stages over ``original``'s own tensors,
    so a rank that holds the full model (to repartition it) gets stages that share its storage.
    """

    def __init__(self, module: ModuleType, original: nn.Module) -> None:
        self._module, self._original = module, original

    def model(self, criterion: nn.Module) -> Any:
        return self._module.model(criterion, self._original)

    def full_model(self) -> Any:
        return self._module.full_model()


@dataclasses.dataclass
class StagePackage:
    path: Path
    module: ModuleType | AdoptingModule
    module_to_stage: list[int]
    stage_to_rank: dict[int, list[int]]
    plan_doc: dict[str, Any]  # plan.json as read ({} without one); a hand-written package's may list no stages
    spec: ModelSpec | None
    tp_degrees: dict[int, int] = dataclasses.field(default_factory=dict)  # stage -> TP degree (absent: 1)
    tp_plan: dict[str, str] = dataclasses.field(default_factory=dict)  # module FQN -> TP style
    ties: list[dict[str, list[int]]] = dataclasses.field(default_factory=list)  # conf.json's tied_parameters
    plan: Plan | None = None  # plan.json's stages on conf.json's ranks, checked; None if it lists none

    @property
    def num_stages(self) -> int:
        return len(self.stage_to_rank)

    @property
    def world_size(self) -> int:
        return sum(len(r) for r in self.stage_to_rank.values())

    @property
    def batch_size(self) -> int | None:
        b = self.plan_doc.get("batch_size")
        return b if isinstance(b, int) and not isinstance(b, bool) and b > 0 else None

    @property
    def adopts(self) -> bool:
        """Whether the package's ``model`` takes a model to adopt (codegen's packages do)."""
        import inspect

        if isinstance(self.module, AdoptingModule):
            return True
        try:
            return len(inspect.signature(self.module.model).parameters) >= 2
        except (TypeError, ValueError, AttributeError):
            return False

    def adopting(self, original: nn.Module) -> StagePackage:
        """This package with stages built over ``original`` (see :class:`AdoptingModule`)."""
        module = self.module._module if isinstance(self.module, AdoptingModule) else self.module
        return dataclasses.replace(self, module=AdoptingModule(module, original))

    def bundle(self, *, weights: bool = True) -> ModelBundle:
        """The spec's bundle; ``weights=False``: the model's parameters on meta (see :mod:`pipeshift.materialize`)."""
        if self.spec is None:
            raise InputFileError(self.path / "plan.json", None,
                                 "no 'model' spec: the runtime needs it for the data and the loss")
        return self.spec.build(weights=weights)

    def entries(self, criterion: nn.Module) -> list[StageEntry]:
        """``model(criterion)`` with every entry checked against the contract."""
        made = self.module.model(criterion)
        if not isinstance(made, (list, tuple)) or not made:
            raise PipeshiftError(f"{self.path}/__init__.py: model(criterion) must return a non-empty list")
        out: list[StageEntry] = []
        for k, entry in enumerate(made):
            ok = (isinstance(entry, (list, tuple)) and len(entry) == 3 and isinstance(entry[0], nn.Module)
                  and all(isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names)
                          for names in entry[1:]))
            if not ok:
                raise PipeshiftError(
                    f"{self.path}/__init__.py: model(criterion)[{k}] must be (module, input_names, output_names)"
                )
            out.append((entry[0], list(entry[1]), list(entry[2])))
        return out

    def full_model(self) -> nn.Module:
        model = self.module.full_model()
        if not isinstance(model, nn.Module):
            raise PipeshiftError(f"{self.path}/__init__.py: full_model() must return a torch.nn.Module")
        return model

    def digest(self) -> str:
        """Hash of the package's files: ranks must all run the same package."""
        h = hashlib.sha256()
        for f in sorted(self.path.iterdir()):
            if f.is_file() and (f.suffix in (".py", ".json")):
                h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
        return h.hexdigest()


def parse_conf(data: Any, path: Path) -> tuple[list[int], dict[int, list[int]]]:
    def bad(msg: str) -> InputFileError:
        return InputFileError(path, None, msg)

    if not isinstance(data, dict):
        raise bad("expected a JSON object")
    m2s = data.get("module_to_stage_map")
    if not isinstance(m2s, list) or not m2s or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                         for s in m2s):
        raise bad("'module_to_stage_map' must be a non-empty list of stage numbers")
    s2r = data.get("stage_to_rank_map")
    if not isinstance(s2r, dict) or not s2r:
        raise bad("'stage_to_rank_map' must be an object {\"0\": [ranks], …}")
    table: dict[int, list[int]] = {}
    for key, ranks in s2r.items():
        if not (isinstance(key, str) and key.isdigit()):
            raise bad(f"stage_to_rank_map key {key!r} is not a stage number")
        if not isinstance(ranks, list) or not ranks or not all(
                isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in ranks):
            raise bad(f"stage_to_rank_map[{key!r}] must be a non-empty list of ranks, got {ranks!r}")
        table[int(key)] = ranks
    if sorted(table) != list(range(len(table))):
        raise bad(f"stage_to_rank_map lists stages {sorted(table)[:8]}; expected 0..{len(table) - 1} with none skipped")
    if set(m2s) != set(table):
        raise bad(f"module_to_stage_map uses stages {sorted(set(m2s))[:8]} but stage_to_rank_map has "
                  f"0..{len(table) - 1}; every stage needs a module and every module a stage")
    ranks = sorted(r for rs in table.values() for r in rs)
    if ranks != list(range(len(ranks))):
        raise bad(f"the stages use ranks {ranks[:8]}{' …' if len(ranks) > 8 else ''}; expected each of "
                  f"0..{len(ranks) - 1} exactly once")
    return m2s, table


def parse_tensor_parallel(data: dict[str, Any], path: Path,
                          stage_to_rank: dict[int, list[int]]) -> tuple[dict[int, int], dict[str, str]]:
    """conf.json's ``stage_to_tp_degree`` ({"0": 2, …}) and ``tp_plan`` ({module FQN: style}).

    Both are data: styles come from a fixed list, FQNs are only looked up in the model.
    """
    from pipeshift.tp_plan import STYLE_NAMES

    def bad(msg: str) -> InputFileError:
        return InputFileError(path, None, msg)

    degrees: dict[int, int] = {}
    raw = data.get("stage_to_tp_degree", {})
    if not isinstance(raw, dict):
        raise bad("'stage_to_tp_degree' must be an object {\"0\": 2, …}")
    for key, t in raw.items():
        if not (isinstance(key, str) and key.isdigit()) or int(key) not in stage_to_rank:
            raise bad(f"stage_to_tp_degree key {key!r} is not a stage of stage_to_rank_map")
        ranks = stage_to_rank[int(key)]
        if not isinstance(t, int) or isinstance(t, bool) or t < 1 or len(ranks) % t:
            raise bad(f"stage_to_tp_degree[{key!r}] = {t!r} must be a positive integer dividing the stage's "
                      f"{len(ranks)} ranks")
        if t > 1:
            degrees[int(key)] = t
    tp_plan = data.get("tp_plan", {})
    if not isinstance(tp_plan, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tp_plan.items()):
        raise bad("'tp_plan' must be an object {\"module FQN\": \"colwise\" | \"rowwise\" | …}")
    unknown = sorted({v for v in tp_plan.values() if v not in STYLE_NAMES})
    if unknown:
        raise bad(f"tp_plan uses unknown styles {unknown}; known: {', '.join(STYLE_NAMES)}")
    if degrees and not any(v != "replicate" for v in tp_plan.values()):
        raise bad("stages have a tensor-parallel degree above 1 but 'tp_plan' shards nothing")
    return degrees, dict(tp_plan)


def load_stage_package(path: str | Path) -> StagePackage:
    path = Path(path).resolve()
    if not path.is_dir():
        raise PipeshiftError(f"{path}: not a stage package directory")
    init = path / "__init__.py"
    if not init.is_file():
        raise InputFileError(init, None, "file not found: not a stage package")
    conf_path = path / "conf.json"
    conf = read_json_object(conf_path, "conf.json of the stage package")
    m2s, s2r = parse_conf(conf, conf_path)
    tp_degrees, tp_plan = parse_tensor_parallel(conf, conf_path, s2r)
    ties = parse_ties(conf.get("tied_parameters"), conf_path, len(s2r))
    plan_path = path / "plan.json"
    plan, text = read_json_text(plan_path, "plan file") if plan_path.exists() else ({}, "")
    module = import_package(path)
    spec = plan_spec = None
    if plan.get("model") is not None:
        try:
            plan_spec = ModelSpec.from_json(plan["model"])
        except PipeshiftError as e:
            raise InputFileError(plan_path, None, f"'model': {e}") from None
    if isinstance(getattr(module, "MODEL_SPEC", None), dict):
        try:
            spec = ModelSpec.from_json(module.MODEL_SPEC)
        except PipeshiftError as e:
            raise InputFileError(init, None, f"MODEL_SPEC: {e}") from None
        # The package's code says which model its stages slice; a plan.json that names another
        # (a hand-edited seed, a swapped file) would train or rebuild something else silently.
        if plan_spec is not None and plan_spec != spec:
            diff = ", ".join(f"{k} {getattr(plan_spec, k)!r} vs {getattr(spec, k)!r}"
                             for k in ("callable", "kwargs", "inputs", "input_shape", "input_dtype", "seed")
                             if getattr(plan_spec, k) != getattr(spec, k))
            raise InputFileError(plan_path, None, f"'model' differs from MODEL_SPEC in {init.name} ({diff})")
    else:
        spec = plan_spec
    for fn in ("model", "full_model"):
        if not callable(getattr(module, fn, None)):
            raise InputFileError(init, None, f"defines no {fn}() function")
    return StagePackage(path, module, m2s, s2r, plan, spec, tp_degrees, tp_plan, ties,
                        plan=_on_conf_ranks(plan, text, plan_path, s2r))


def _on_conf_ranks(doc: dict[str, Any], text: str, path: Path, stage_to_rank: dict[int, list[int]]) -> Plan | None:
    """plan.json's stages with each stage's ranks taken from conf.json (the package's own placement)."""
    stages = doc.get("stages")
    if not isinstance(stages, list) or not stages:
        return None
    if len(stages) != len(stage_to_rank):
        raise InputFileError(path, None, f"lists {len(stages)} stages but conf.json has {len(stage_to_rank)}")

    def placed(stage: Any, ranks: list[int]) -> Any:
        if not isinstance(stage, dict):
            return stage  # the plan's checks name what is wrong with it
        tp = stage.get("tp", 1)
        replicas = len(ranks) // tp if isinstance(tp, int) and not isinstance(tp, bool) and tp > 0 else 1
        return {**stage, "ranks": list(ranks), "replicas": replicas}

    return parse_plan({**doc, "stages": [placed(st, stage_to_rank[k]) for k, st in enumerate(stages)]},
                      str(path), text)


def import_package(path: Path) -> ModuleType:
    """Import the directory ``path`` as a package through codegen's loader.

    The package is user input: anything its code raises becomes one :class:`PipeshiftError` line.
    """
    try:
        return load_package(path)
    except PipeshiftError:
        raise
    except Exception as e:
        raise PipeshiftError(f"{path}/__init__.py: import failed: {type(e).__name__}: {e}") from None
