"""Python source for one stage: a readable, straight-line ``forward`` over named tensors.

Each fx node becomes one assignment, written the way a person would write it: ``self.layer1[0]
.conv1(node11)`` for a module, ``node14 + node9`` for an operator, ``node20.view(size, -1)`` for a
method, ``torch.flatten(node30, 1)`` for a function. Tensors are named by graph node id
(``node12``) so a line of the stage file, a line of graph.txt and a row of profile.json can be
matched by eye; the small non-tensor helpers (``size = node20.size(0)``) keep their fx names.

Nothing is pasted into the source unchecked: names must be identifiers or dotted FQNs, constants
are written by :func:`literal` (which round-trips through :func:`ast.literal_eval` for strings),
callables must resolve to the very same object by import, and free text (module reprs) only goes
into comments after :func:`comment_text` strips it to one printable ASCII line.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import keyword
import math
import operator
import re
import sys
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.fx
from torch import nn

from pipeshift.codegen.partition import NONE, CodegenError, Flow, Layout, StageLayout, Structure, leaf_count
from pipeshift.codegen.support import FQN_RE
from pipeshift.graph.capture import describe

MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
WIRE_RE = re.compile(r"^(node|input)[0-9]+(_[0-9]+)*$")
_AMBIGUOUS = {"l", "O", "I"}  # ruff E741

_BINARY = {
    operator.add: "+", operator.sub: "-", operator.mul: "*", operator.truediv: "/",
    operator.floordiv: "//", operator.mod: "%", operator.pow: "**", operator.matmul: "@",
    operator.lshift: "<<", operator.rshift: ">>", operator.and_: "&", operator.or_: "|",
    operator.xor: "^", operator.eq: "==", operator.ne: "!=", operator.lt: "<", operator.le: "<=",
    operator.gt: ">", operator.ge: ">=",
}
_COMPARISONS = {operator.eq, operator.ne}
_UNARY = {operator.neg: "-", operator.pos: "+", operator.invert: "~"}
_INPLACE_OPERATORS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor, operator.ilshift,
    operator.irshift, operator.setitem,
}
_PUBLIC_NAMESPACES = ("torch", "torch.nn.functional", "torch.special", "torch.linalg", "torch.fft")


def is_simple_name(name: str) -> bool:
    """A plain ASCII identifier usable after a dot (``self.conv1``)."""
    return name.isascii() and name.isidentifier() and not keyword.iskeyword(name)


def comment_text(text: str, limit: int = 90) -> str:
    """``text`` as one line of printable ASCII, safe to put after ``#``."""
    clean = "".join(c if " " <= c <= "~" else " " for c in str(text))
    clean = " ".join(clean.split())
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape(c: str) -> str:
    if c in _ESCAPES:
        return _ESCAPES[c]
    if " " <= c <= "~":
        return c
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def string_literal(s: str) -> str:
    """A double-quoted, ASCII-only Python literal for ``s``: anything unusual becomes an escape."""
    out = '"' + "".join(_escape(c) for c in s) + '"'
    if ast.literal_eval(out) != s:  # pragma: no cover - the escaping above is complete
        raise CodegenError(f"cannot write {s!r} as a literal")
    return out


def attr_path(fqn: str) -> str:
    """``layer1.0.conv1`` → ``self.layer1[0].conv1`` (the stage holds adopted objects under their FQNs)."""
    if not FQN_RE.match(fqn):
        raise CodegenError(f"{fqn!r} is not a dotted module name; refusing to write it into code")
    first, *rest = fqn.split(".")
    if is_simple_name(first):
        out = f"self.{first}"
    elif first.isdigit() and str(int(first)) == first:
        out = f"self[{first}]"  # an nn.Sequential model: the stage class gets a __getitem__
    else:
        out = f"getattr(self, {string_literal(first)})"
    for part in rest:
        if is_simple_name(part):
            out += f".{part}"
        elif part.isdigit() and str(int(part)) == part:
            out += f"[{part}]"
        else:
            out += f"[{string_literal(part)}]"
    return out


class _Imports:
    """Modules the stage file must import besides torch (kept sorted: deterministic output)."""

    def __init__(self) -> None:
        self.modules: set[str] = set()

    def use(self, module: str) -> str:
        if module != "torch" and not module.startswith("torch."):
            self.modules.add(module)
        return module

    def roots(self) -> set[str]:
        return {m.split(".")[0] for m in self.modules} | {"torch"}


def _resolve(module: str, qualname: str) -> Any:
    obj: Any = sys.modules.get(module)
    for part in qualname.split("."):
        if obj is None:
            return None
        obj = getattr(obj, part, None)
    return obj


def _op_expr(op: Any, where: str) -> str:
    """``torch.ops.aten.add.Tensor`` for an ATen operator overload (or packet)."""
    if isinstance(op, torch._ops.OpOverload):
        parts = [op.namespace, op.overloadpacket.__name__, op._overloadname]
    else:
        parts = [op._qualified_op_name.partition("::")[0], op.__name__]
    if all(is_simple_name(p) for p in parts):
        obj: Any = torch.ops
        for p in parts:
            obj = getattr(obj, p, None)
        if obj is op:
            return "torch.ops." + ".".join(parts)
    raise CodegenError(f"{where} calls the operator {comment_text(str(op), 80)!r}, which cannot be named as torch.ops.NS.OP")


def callable_expr(fn: Any, imports: _Imports, where: str) -> str:
    """How the stage file names ``fn``: a public torch path if there is one, else its import path.

    The name must lead back to the same object, and only modules the model already imported are
    used, so codegen never imports anything new.
    """
    if isinstance(fn, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):  # graphs from the torch.export fallback
        return _op_expr(fn, where)
    name = getattr(fn, "__name__", None)
    if isinstance(name, str) and is_simple_name(name):
        for ns in _PUBLIC_NAMESPACES:
            if _resolve(ns, name) is fn:
                return f"{ns}.{name}"
        if getattr(builtins, name, None) is fn:
            return name
        for mod in (operator, math):
            if getattr(mod, name, None) is fn:
                return f"{imports.use(mod.__name__)}.{name}"
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if (
        isinstance(module, str) and isinstance(qualname, str) and module != "__main__"
        and MODULE_RE.match(module) and all(is_simple_name(p) for p in qualname.split("."))
        and _resolve(module, qualname) is fn
    ):
        return f"{imports.use(module)}.{qualname}"
    raise CodegenError(
        f"{where} calls {fn!r}, which generated code cannot name by import (a lambda, a local function or "
        "__main__); define it at module level, or mark the module that calls it as a leaf (--leaf FQN)"
    )


def mutated_input(n: torch.fx.Node, modules: dict[str, nn.Module]) -> torch.fx.Node | None:
    """The fx node whose tensor ``n`` changes in place (``relu_``, ``ReLU(inplace=True)``, ``+=``)."""
    first = n.args[0] if n.args else None
    hit = False
    if n.op == "call_module":
        hit = getattr(modules.get(str(n.target)), "inplace", False) is True
    elif n.op == "call_method":
        name = str(n.target)
        hit = name.endswith("_") and not name.startswith("_")
    elif n.op == "call_function":
        fn = n.target
        name = getattr(fn, "__name__", "")
        if fn in _INPLACE_OPERATORS or (name.endswith("_") and not name.startswith("_")) or n.kwargs.get("inplace") is True:
            hit = True
        else:
            try:
                bound = inspect.signature(fn).bind(*n.args, **n.kwargs)  # type: ignore[arg-type]
                hit = bound.arguments.get("inplace") is True
            except (TypeError, ValueError):
                hit = False
    return first if hit and isinstance(first, torch.fx.Node) else None


_MODE_FLAGS = ("training", "train")


def training_flag(fn: Any) -> tuple[int, str] | None:
    """Where ``fn`` takes a training-mode flag (``F.dropout(x, p, training)``, ``aten.dropout(x, p,
    train)``): its position and keyword. Tracing records the flag's value at trace time — dropout
    on in a training trace — so generated code reads it from the stage instead."""
    if isinstance(fn, torch._ops.OpOverload):
        names = [a.name for a in fn._schema.arguments]
    else:
        try:
            names = list(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            return None
    for flag in _MODE_FLAGS:
        if flag in names:
            return names.index(flag), flag
    return None


def literal(v: Any, where: str, name_of: Callable[[torch.fx.Node], str] | None = None) -> str:
    """Python source for a constant argument (``name_of`` names the fx nodes among them)."""
    if isinstance(v, torch.fx.Node):
        if name_of is None:
            raise CodegenError(f"{where}: a graph value where a constant was expected")
        return name_of(v)
    if v is None or isinstance(v, bool):
        return repr(v)
    if isinstance(v, int):
        return repr(int(v))
    if isinstance(v, float):
        if math.isnan(v):
            return 'float("nan")'
        if math.isinf(v):
            return 'float("inf")' if v > 0 else 'float("-inf")'
        return repr(float(v))
    if isinstance(v, complex):
        return f"complex({literal(v.real, where, name_of)}, {literal(v.imag, where, name_of)})"
    if isinstance(v, str):
        return string_literal(v)
    if v is Ellipsis:
        return "..."
    if isinstance(v, slice):
        return f"slice({literal(v.start, where, name_of)}, {literal(v.stop, where, name_of)}, {literal(v.step, where, name_of)})"
    if isinstance(v, (torch.dtype, torch.layout, torch.memory_format)):
        text = str(v)
        short = text.split(".")[-1]
        if text == f"torch.{short}" and is_simple_name(short) and getattr(torch, short, None) == v:
            return text
    if isinstance(v, torch.device):
        return f"torch.device({string_literal(str(v))})"
    if isinstance(v, torch.Size):
        return f"torch.Size([{', '.join(literal(int(x), where, name_of) for x in v)}])"
    if isinstance(v, tuple) and type(v) is tuple:
        items = [literal(x, where, name_of) for x in v]
        return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"
    if isinstance(v, list):
        return f"[{', '.join(literal(x, where, name_of) for x in v)}]"
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return "{" + ", ".join(f"{string_literal(k)}: {literal(x, where, name_of)}" for k, x in v.items()) + "}"
    raise CodegenError(f"{where}: cannot write the constant {type(v).__name__} {comment_text(repr(v), 60)!r} into code")


# -- one stage ---------------------------------------------------------------------------
class _StageWriter:
    def __init__(self, layout: Layout, stage: StageLayout, preset_roots: set[str] | None = None):
        self.preset_roots = preset_roots or set()  # module names a first pass found the file imports
        self.layout = layout
        self.stage = stage
        self.gm = layout.captured.gm
        self.modules = dict(self.gm.named_modules())
        self.imports = _Imports()
        self.var: dict[str, str] = {}  # fx node name -> variable
        self.taken: set[str] = set()
        by_id = layout.captured.by_id()
        for t in stage.inputs:
            self.var[by_id[t.node_id].fx_name] = t.var
        for g in stage.groups:
            self.var[g.fx_name] = layout.var_of[g.node_id]
        self.taken |= set(self.var.values())
        for t in stage.inputs + stage.outputs:
            self.taken |= set(t.wire)

    # names ------------------------------------------------------------------------------
    def _helper_name(self, fx_name: str) -> str:
        base = fx_name if is_simple_name(fx_name) else re.sub(r"[^A-Za-z0-9_]", "_", fx_name).strip("_") or "value"
        if base[0].isdigit():
            base = f"v_{base}"
        reserved = self.imports.roots() | self.preset_roots | {"self", "adopt"}
        candidate, i = base, 0
        while (
            candidate in self.taken or candidate in reserved or hasattr(builtins, candidate)
            or candidate in _AMBIGUOUS or WIRE_RE.match(candidate) or keyword.iskeyword(candidate)
        ):
            i += 1
            candidate = f"{base}_{i}"
        self.taken.add(candidate)
        return candidate

    def name(self, n: torch.fx.Node) -> str:
        if n.name not in self.var:
            raise CodegenError(f"stage {self.stage.index}: fx node {n.name} is used before it is computed")
        return self.var[n.name]

    # values -----------------------------------------------------------------------------
    def literal(self, v: Any, where: str) -> str:
        return literal(v, where, self.name)

    def operand(self, v: Any, where: str) -> str:
        text = self.literal(v, where)
        return f"({text})" if text.startswith("-") else text

    def index(self, v: Any, where: str) -> str:
        if isinstance(v, slice):
            parts = ["" if x is None else self.literal(x, where) for x in (v.start, v.stop, v.step)]
            return f"{parts[0]}:{parts[1]}" + (f":{parts[2]}" if v.step is not None else "")
        if isinstance(v, tuple) and type(v) is tuple:
            if not v:
                return "()"
            items = [self.index(x, where) for x in v]
            return items[0] + "," if len(items) == 1 else ", ".join(items)
        return self.literal(v, where)

    def call_args(self, n: torch.fx.Node, args: tuple[Any, ...], where: str, mode_flag: tuple[int, str] | None = None) -> str:
        """The argument list; ``mode_flag`` (position, keyword) of a traced training flag, written
        as ``self.training`` so the stage's mode decides, not the mode it was traced in."""
        position, keyword = mode_flag if mode_flag is not None else (-1, "")
        parts = ["self.training" if i == position and isinstance(a, bool) else self.literal(a, where)
                 for i, a in enumerate(args)]
        for k, v in n.kwargs.items():
            if not is_simple_name(k):
                raise CodegenError(f"{where}: keyword {k!r} is not an identifier")
            parts.append(f"{k}=self.training" if k == keyword and isinstance(v, bool) else f"{k}={self.literal(v, where)}")
        return ", ".join(parts)

    # statements -------------------------------------------------------------------------
    def expression(self, n: torch.fx.Node) -> str:
        where = f"stage {self.stage.index}, fx node {n.name}"
        if n.op == "call_module":
            return f"{attr_path(str(n.target))}({self.call_args(n, tuple(n.args), where)})"
        if n.op == "get_attr":
            return attr_path(str(n.target))
        if n.op == "call_method":
            method = str(n.target)
            if not is_simple_name(method) or not n.args:
                raise CodegenError(f"{where}: method {method!r} is not an identifier")
            receiver = self.operand(n.args[0], where)
            return f"{receiver}.{method}({self.call_args(n, tuple(n.args[1:]), where)})"
        if n.op == "call_function":
            fn, args = n.target, tuple(n.args)
            if not n.kwargs and len(args) == 2:
                if fn is operator.getitem:
                    return f"{self.operand(args[0], where)}[{self.index(args[1], where)}]"
                if fn is builtins.getattr and isinstance(args[1], str) and is_simple_name(args[1]):
                    return f"{self.operand(args[0], where)}.{args[1]}"
                singleton = any(a is None or isinstance(a, bool) for a in args)
                if fn in _BINARY and not (fn in _COMPARISONS and singleton):
                    return f"{self.operand(args[0], where)} {_BINARY[fn]} {self.operand(args[1], where)}"
            if not n.kwargs and len(args) == 1 and fn in _UNARY:
                return f"{_UNARY[fn]}{self.operand(args[0], where)}"
            return f"{callable_expr(fn, self.imports, where)}({self.call_args(n, args, where, training_flag(fn))})"
        raise CodegenError(f"{where}: unexpected fx op {n.op!r}")

    def forward_body(self) -> list[str]:
        st = self.stage
        lines: list[str] = []
        for t in st.inputs:
            if t.structure is not None:
                partial = len(t.wire) < leaf_count(t.structure)
                lines.append(f"{t.var} = {pack(t)}" + ("  # None: elements this stage does not read" if partial else ""))
        mutated = {m.name for n in st.fx_nodes if (m := mutated_input(n, self.modules)) is not None}
        by_id = self.layout.captured.by_id()
        for t in st.inputs:
            if t.structure is None and by_id[t.node_id].fx_name in mutated:
                lines.append(f"{t.var} = {t.var}.clone()  # changed in place below; the sender's tensor stays intact")
        used = {a.name for n in st.fx_nodes for a in n.all_input_nodes}
        returned = {t.node_id for t in st.outputs}
        by_fx = {g.fx_name: g for g in st.groups}
        for n in st.fx_nodes:
            expr = self.expression(n)
            group = by_fx.get(n.name)
            if n.name not in self.var:
                self.var[n.name] = self._helper_name(n.name)
            if n.name in used or (group is not None and group.node_id in returned):
                lines.append(f"{self.var[n.name]} = {expr}")
            elif n.op in ("call_module", "call_method", "call_function") and not expr.endswith("]"):
                lines.append(expr)  # nobody reads the value, but the call still runs (RNG, in-place effects)
        for t in st.outputs:
            if t.structure is not None:
                lines.append(f"{unpack(t)} = {t.var}")
        names = st.output_names
        lines.append(f"return ({names[0]},)" if len(names) == 1 else f"return ({', '.join(names)})")
        return lines


def _leaf_names(t: Flow) -> Iterator[str | None]:
    sent = set(t.wire)
    for i in range(leaf_count(t.structure)):
        name = f"{t.node_id}_{i}"
        yield name if name in sent else None


def pack(t: Flow) -> str:
    """The expression that rebuilds a tuple value from the elements received, e.g.
    ``(node7_0, (node7_1, node7_2))``; elements this stage never reads were not sent: ``None``."""

    def build(structure: Structure, leaves: Iterator[str | None]) -> tuple[str, bool]:
        if structure is None:
            name = next(leaves)
            return (name or "None", name is not None)
        if structure == NONE:
            return ("None", False)
        kind, children = structure
        parts = [build(c, leaves) for c in children]
        if not any(present for _, present in parts):
            return ("None", False)
        items = [text for text, _ in parts]
        if kind == "list":
            return (f"[{', '.join(items)}]", True)
        body = f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"
        if kind == "tuple":
            return (body, True)
        if not MODULE_RE.match(kind) or not kind.startswith("torch.return_types."):
            raise CodegenError(f"cannot rebuild a {kind!r} value")
        return (f"{kind}({body})", True)

    return build(t.structure, _leaf_names(t))[0]


def unpack(t: Flow) -> str:
    """Assignment target that takes a tuple value apart: ``node7_0, (_, node7_2)`` (``_``: not sent)."""

    def target(structure: Structure, leaves: Iterator[str | None]) -> str:
        if structure is None:
            return next(leaves) or "_"
        if structure == NONE:
            return "_"
        items = [target(c, leaves) for c in structure[1]]
        return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"

    return target(t.structure, _leaf_names(t))


def _wire_list(names: list[str]) -> str:
    for n in names:
        if not WIRE_RE.match(n):
            raise CodegenError(f"{n!r} is not a tensor name")
    return ", ".join(names)


def _describe_fqn(gm: torch.fx.GraphModule, model: nn.Module, fqn: str) -> str:
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target == fqn:
            return comment_text(describe(gm, n))
    try:
        obj: Any = model.get_submodule(fqn)
        return comment_text(type(obj).__name__ + " (not run by forward; kept so the state_dict is complete)")
    except AttributeError:
        pass
    parent, _, name = fqn.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    obj = getattr(owner, name, None)
    kind = "parameter" if isinstance(obj, nn.Parameter) else "buffer" if name in owner._buffers else "tensor"
    shape = list(obj.shape) if torch.is_tensor(obj) else []
    return comment_text(f"{kind} {shape}")


def _flow_lines(label: str, tensors: list[Flow], peer: str) -> list[str]:
    if not tensors:
        return []
    parts = []
    for t in tensors:
        names = "/".join(t.wire) if len(t.wire) <= 3 else f"{t.wire[0]}..{t.wire[-1]}"
        if peer == "from":
            src = "the data loader" if t.producer is None else f"stage {t.producer}"
            parts.append(f"{names} ({src})")
        else:
            dst = ", ".join("loss" if c == -1 else str(c) for c in t.consumers)
            parts.append(f"{names} (to {dst})")
    return textwrap.wrap(f"{label}: " + ", ".join(parts), width=96, subsequent_indent="    ")


MAX_CONSTANT_ELEMENTS = 4096
_LITERAL_DTYPES = {
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128,
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool,
}


def tensor_literal(t: torch.Tensor, writer: _StageWriter, where: str) -> str:
    """``torch.tensor([...], dtype=...)`` with exactly ``t``'s values (a float's repr round-trips)."""
    if t.dtype not in _LITERAL_DTYPES or t.numel() > MAX_CONSTANT_ELEMENTS or t.is_sparse:
        raise CodegenError(
            f"{where}: forward builds a {t.dtype} tensor constant of shape {list(t.shape)}, too big to write into "
            "the stage file; register it as a buffer in the model's __init__ so stages can adopt it"
        )
    values = writer.literal(t.detach().cpu().tolist(), where)
    return f"torch.tensor({values}, dtype={writer.literal(t.dtype, where)})"


def render_stage(layout: Layout, stage: StageLayout, model: nn.Module, title: str) -> str:
    """The source of ``stage{K}.py``."""
    # Two passes: the first finds which modules the file imports, so that no helper variable
    # of the second can shadow one of them.
    first = _StageWriter(layout, stage)
    first.forward_body()
    writer = _StageWriter(layout, stage, first.imports.roots())
    body = writer.forward_body()
    n_stages = len(layout.stages)
    k = stage.index
    ids = [g.node_id for g in stage.groups]
    inputs = _wire_list(stage.input_names)
    _wire_list(stage.output_names)
    outgoing = [
        Flow(t.node_id, t.var, t.structure, t.wire, t.producer,
               [-1 if c == n_stages else c for c in t.consumers if c > k])
        for t in stage.outputs
    ]
    doc = [
        f"Stage {k} of {n_stages} of {comment_text(title, 200)}: {len(ids)} graph nodes, {ids[0]} .. {ids[-1]}.",
        "",
        "Generated by `pipeshift codegen` from plan.json; change the plan and regenerate rather than edit.",
        "Parameters keep the original model's names, so this stage's state_dict is a slice of the model's.",
        "",
        *_flow_lines("Receives", stage.inputs, "from"),
        *_flow_lines("Sends", outgoing, "to"),
    ]
    out: list[str] = ['"""' + doc[0], *doc[1:], '"""', ""]
    header_imports = sorted(writer.imports.modules)
    for mod in header_imports:
        if not MODULE_RE.match(mod):
            raise CodegenError(f"{mod!r} is not a module name")
        out.append(f"import {mod}")
    if header_imports:
        out.append("")
    out.append("import torch")
    adopted = stage.adopt + stage.keep
    if adopted:
        out += ["", "from pipeshift.codegen.support import adopt"]
    out += ["", "", f"class Stage{k}(torch.nn.Module):"]
    out.append(f'    """Stage {k}: ``Stage{k}(model)`` takes the parts it runs from the original ``model``."""')
    out += ["", "    def __init__(self, model: torch.nn.Module) -> None:", "        super().__init__()"]
    if adopted:
        out.append("        adopt(self, model, [")
        for fqn in adopted:
            if not FQN_RE.match(fqn):
                raise CodegenError(f"{fqn!r} is not a dotted module name; refusing to write it into code")
            note = _describe_fqn(layout.captured.gm, model, fqn)
            out.append(f"            {string_literal(fqn)},  # {note}" if note else f"            {string_literal(fqn)},")
        out.append("        ])")
    for name in stage.constants:
        value = tensor_literal(getattr(layout.captured.gm, name), writer, f"stage {k}, {name}")
        out.append(f"        self.register_buffer({string_literal(name)}, {value}, persistent=False)  # a constant in forward")
    if not adopted:
        out.append("        del model  # this stage has no parameters or modules of its own")
    roots = {str(n.target).split(".")[0] for n in stage.fx_nodes if n.op in ("call_module", "get_attr")}
    if any(r.isdigit() and str(int(r)) == r for r in roots):
        out += [
            "",
            "    def __getitem__(self, index: int) -> torch.nn.Module:",
            '        """``self[0]``: the original model is an ``nn.Sequential``; its layers keep their indices."""',
            "        return self._modules[str(index)]",
        ]
    sig = ", ".join(f"{name}: torch.Tensor" for name in stage.input_names)
    out += ["", f"    def forward(self{', ' if inputs else ''}{sig}) -> tuple[torch.Tensor, ...]:"]
    out += [f"        {line}" for line in body]
    return "\n".join(out) + "\n"
