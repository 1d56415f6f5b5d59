"""The hostile-input probe: inputs from outside, tried as an attacker and as a careless user would.

Each :class:`Probe` builds one hostile input in a scratch directory, runs one pipeshift command on
it and classifies what happened:

* ``clean error`` — a non-zero exit with one line on stderr naming the problem (or, for the
  probes whose right answer is to go on — a damaged newest checkpoint on resume — going on
  with the promised message);
* ``traceback`` — an exception escaped, or an "internal error" line;
* ``hang`` — the command did not finish within the probe's limit (subprocess mode only);
* ``silent acceptance`` — exit 0 although the input is wrong;
* ``code executed`` — an injection ran: every injected callable, package or module writes the
  marker file, which must never appear.

``tests/test_probes.py`` runs the table in-process and asserts every probe ends in a clean error
without running anything; ``benchmarks/probe_counts.py`` runs it in subprocesses (so hangs and
crashes count) against any checkout and prints the counts per category.

Run one probe: ``python tests/probes.py PROBE_ID WORKDIR`` (prints a JSON outcome line).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import socket
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

OUTCOMES = ("clean error", "traceback", "hang", "silent acceptance", "code executed")
MLP = ["pipeshift.models:mlp", "--model-arg", "in_features=8", "--model-arg", "width=12", "--model-arg", "depth=3",
       "--model-arg", "num_classes=4"]
EVIL_MODULE = "evil_probe_mod"


@dataclasses.dataclass
class Outcome:
    outcome: str
    code: int | None
    message: str  # the last line of stderr, or what went wrong

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Probe:
    id: str
    category: str
    what: str
    run: Callable[[Scratch], Outcome]
    expect: str = ""  # text the one-line error must contain


class Scratch:
    """A probe's working directory, the marker file, and the shared base artifacts (built once)."""

    def __init__(self, root: Path, base: Path):
        self.root = root
        self.base = base
        self.marker = root / "MARKER"
        root.mkdir(parents=True, exist_ok=True)
        evil = (f"import pathlib\npathlib.Path({str(self.marker)!r}).write_text('ran')\n\n"
                "def build(**kw):\n    pathlib.Path(%r).write_text('ran')\n\n"
                "def inputs(batch_size):\n    pathlib.Path(%r).write_text('ran')\n" % (str(self.marker), str(self.marker)))
        (root / f"{EVIL_MODULE}.py").write_text(evil)
        pkg = root / "evilpkg"
        pkg.mkdir(exist_ok=True)
        (pkg / "__init__.py").write_text(evil)
        (pkg / "conf.json").write_text('{"module_to_stage_map": [0, 0], "stage_to_rank_map": {"0": [0]}}')
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        sys.modules.pop(EVIL_MODULE, None)

    def copy(self, name: str) -> Path:
        dst = self.root / name
        shutil.copytree(self.base / name, dst)
        return dst

    def evil_os_system(self) -> dict[str, Any]:
        return {"callable": "os:system", "kwargs": {"command": f"touch {self.marker}"}}


# -- running one command in-process -------------------------------------------------------
def run_cli(argv: list[str], scratch: Scratch, accept_with: str = "") -> Outcome:
    """``pipeshift ARGV`` in this process; stderr classified (see the module docstring)."""
    from pipeshift import cli

    err, out = io.StringIO(), io.StringIO()
    code: int | None
    real_exit = os._exit
    os._exit = _raise_exit  # train leaves with os._exit once its process group exists
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), _cwd(scratch.root):
            code = cli.main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except _Exited as e:
        code = e.code
    except Exception as e:  # noqa: BLE001 - this is what the probe looks for
        if scratch.marker.exists():
            return Outcome("code executed", None, f"{type(e).__name__}: {e}"[:300])
        return Outcome("traceback", None, "".join(traceback.format_exception_only(type(e), e)).strip()[:300])
    finally:
        os._exit = real_exit
        _destroy_group()
    return classify(code, err.getvalue(), scratch, accept_with, out.getvalue())


class _Exited(BaseException):
    def __init__(self, code: int):
        self.code = code


def _raise_exit(code: int) -> None:
    raise _Exited(code)


def _destroy_group() -> None:
    if "torch" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def classify(code: int | None, stderr: str, scratch: Scratch, accept_with: str = "", stdout: str = "") -> Outcome:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    if scratch.marker.exists():
        return Outcome("code executed", code, last[:300])
    if "Traceback (most recent call last)" in stderr or "internal error" in stderr:
        return Outcome("traceback", code, last[:300])
    if code == 0:
        said = [ln for ln in (stderr + "\n" + stdout).splitlines() if accept_with and accept_with in ln]
        if said:
            return Outcome("clean error", code, said[0][:300])
        return Outcome("silent acceptance", code, last[:300])
    return Outcome("clean error", code, last[:300])


@contextlib.contextmanager
def _cwd(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


# -- base artifacts ------------------------------------------------------------------------
def build_base(base: Path) -> None:
    """A profiled tiny MLP, one- and two-stage plans, a one-stage package, a trained checkpoint."""
    if (base / "ready").exists():
        return
    base.mkdir(parents=True, exist_ok=True)
    from pipeshift import cli

    def must(argv: list[str]) -> None:
        with contextlib.redirect_stdout(io.StringIO()), _cwd(base):
            code = cli.main(argv)
        if code != 0:
            raise RuntimeError(f"building the probe's base artifacts: pipeshift {' '.join(argv)} -> {code}")

    must(["profile", *MLP, "-b", "4", "-o", "prof", "--iterations", "2", "--warmup", "1", "--quiet"])
    must(["plan", "prof/graph.txt", "-n", "1", "-o", "plan1", "-q"])
    must(["plan", "prof/graph.txt", "-n", "2", "--straight-pipeline", "-o", "plan2", "-q"])
    must(["codegen", "plan1", "-o", "pkg"])
    must(["codegen", "plan2", "-o", "pkg2"])
    must(["train", "pkg", "--steps", "2", "--checkpoint-dir", "ck", "--checkpoint-every", "1", "--no-progress",
          "--output-dir", "run", "--trace-steps", "0"])
    (base / "ready").write_text("ok")


def _edit_json(path: Path, fn: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _rehash(step: Path) -> None:
    """What an attacker who can write the checkpoint does too: record the new files' digests."""
    import hashlib

    meta_path = step / "meta.json"
    meta = json.loads(meta_path.read_text())
    if isinstance(meta.get("files"), dict):
        meta["files"] = {name: hashlib.sha256((step / name).read_bytes()).hexdigest() for name in meta["files"]
                         if (step / name).is_file()}
        meta_path.write_text(json.dumps(meta))


def _edit_stage(step: Path, fn: Callable[[dict[str, Any]], None], rehash: bool = True) -> None:
    import torch

    data = torch.load(step / "stage0.pt", weights_only=True)
    fn(data["model"])
    torch.save(data, step / "stage0.pt")
    if rehash:
        _rehash(step)


def _latest(ck: Path) -> Path:
    return ck / (ck / "latest").read_text().strip()


TRAIN = ["--no-progress", "--trace-steps", "0", "--output-dir", "run"]


# -- probes: code named in data files -----------------------------------------------------
def p_export_package(s: Scratch) -> Outcome:
    ck = s.copy("ck")
    _edit_json(_latest(ck) / "meta.json", lambda m: m.update(package=str(s.root / "evilpkg")))
    _rehash(_latest(ck))
    return run_cli(["export", "ck", "-o", "model.pt"], s, accept_with="not checked against a model")


def _codegen_with(s: Scratch, edit: Callable[[dict[str, Any]], None], *extra: str) -> Outcome:
    plan = s.copy("plan1")
    _edit_json(plan / "plan.json", edit)
    return run_cli(["codegen", "plan1", "-o", "out", *extra], s)


def p_codegen_os_system(s: Scratch) -> Outcome:
    return _codegen_with(s, lambda p: p.update(model={**p["model"], **s.evil_os_system()}))


def p_codegen_user_module(s: Scratch) -> Outcome:
    return _codegen_with(s, lambda p: p.update(model={**p["model"], "callable": f"{EVIL_MODULE}:build"}))


def p_codegen_inputs(s: Scratch) -> Outcome:
    return _codegen_with(s, lambda p: p.update(model={**p["model"], "inputs": f"{EVIL_MODULE}:inputs"}))


def p_resume_plan_spec(s: Scratch) -> Outcome:
    s.copy("pkg")
    ck = s.copy("ck")
    step = _latest(ck)
    plan = json.loads((s.base / "pkg" / "plan.json").read_text())
    plan["model"] = {**plan["model"], **s.evil_os_system()}
    (step / "plan.json").write_text(json.dumps(plan))
    _edit_json(step / "meta.json", lambda m: m.get("files", {}).update({"plan.json": ""}))
    _rehash(step)
    return run_cli(["train", "pkg", "--steps", "3", "--checkpoint-dir", "ck", "--resume", *TRAIN], s)


def p_package_seed(s: Scratch) -> Outcome:
    pkg = s.copy("pkg")
    _edit_json(pkg / "plan.json", lambda p: p["model"].update(seed=p["model"].get("seed", 0) + 1))
    return run_cli(["train", "pkg", "--steps", "1", *TRAIN], s)


# -- probes: checkpoints ----------------------------------------------------------------------
def _flip(path: Path, n: int = 64) -> None:
    """Flip ``n`` bytes in the middle of the largest tensor record (the archive itself stays valid)."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2 - n // 2
    for i in range(n):
        data[start + i] ^= 0xFF
    path.write_bytes(bytes(data))


def p_flipped_export(s: Scratch) -> Outcome:
    ck = s.copy("ck")
    _flip(_latest(ck) / "stage0.pt")
    return run_cli(["export", "ck", "-o", "model.pt"], s)


def p_flipped_resume(s: Scratch) -> Outcome:
    s.copy("pkg")
    ck = s.copy("ck")
    _flip(_latest(ck) / "stage0.pt")
    return run_cli(["train", "pkg", "--steps", "3", "--checkpoint-dir", "ck", "--resume", *TRAIN], s,
                   accept_with="previous intact checkpoint")


def p_meta_step(s: Scratch) -> Outcome:
    ck = s.copy("ck")
    _edit_json(_latest(ck) / "meta.json", lambda m: m.update(step=1 if m["step"] != 1 else 7))
    return run_cli(["export", "ck", "-o", "model.pt"], s)


def p_shape_export(s: Scratch) -> Outcome:
    import torch

    s.copy("pkg")
    ck = s.copy("ck")
    _edit_stage(_latest(ck), lambda m: m.update({k: torch.zeros(3, 3) for k in list(m)[:1]}))
    return run_cli(["export", "ck", "-o", "model.pt", "--package", "pkg"], s)


def p_shape_resume(s: Scratch) -> Outcome:
    import torch

    s.copy("pkg")
    ck = s.copy("ck")
    _edit_stage(_latest(ck), lambda m: m.update({k: torch.zeros(3, 3) for k in list(m)[:1]}))
    return run_cli(["train", "pkg", "--steps", "3", "--checkpoint-dir", "ck", "--resume", *TRAIN], s)


def p_extra_key_resume(s: Scratch) -> Outcome:
    import torch

    s.copy("pkg")
    ck = s.copy("ck")
    _edit_stage(_latest(ck), lambda m: m.update({"not.a.weight": torch.zeros(2)}))
    return run_cli(["train", "pkg", "--steps", "3", "--checkpoint-dir", "ck", "--resume", *TRAIN], s)


def p_nan_weights(s: Scratch) -> Outcome:
    s.copy("pkg")
    ck = s.copy("ck")
    _edit_stage(_latest(ck), lambda m: [t.fill_(float("nan")) for t in m.values() if t.is_floating_point()])
    return run_cli(["train", "pkg", "--steps", "3", "--checkpoint-dir", "ck", "--resume", *TRAIN], s)


def p_lr_nan(s: Scratch) -> Outcome:
    s.copy("pkg")
    return run_cli(["train", "pkg", "--steps", "1", "--lr", "nan", *TRAIN], s)


def p_loss_diverges(s: Scratch) -> Outcome:
    s.copy("pkg")
    return run_cli(["train", "pkg", "--steps", "6", "--lr", "1e30", *TRAIN], s)


# -- probes: files that used to give tracebacks or be accepted silently ----------------------
def p_show_empty_graph(s: Scratch) -> Outcome:
    (s.root / "graph.txt").write_text("")
    return run_cli(["show", "graph.txt"], s)


def _nested_profile(s: Scratch) -> None:
    prof = s.copy("prof")
    (prof / "profile.json").write_text('{"nodes": ' + "[" * 100000 + "]" * 100000 + "}")


def p_nested_plan(s: Scratch) -> Outcome:
    _nested_profile(s)
    return run_cli(["plan", "prof/graph.txt", "-n", "1", "-o", "p", "-q"], s)


def p_nested_show(s: Scratch) -> Outcome:
    _nested_profile(s)
    return run_cli(["show", "prof/graph.txt"], s)


def p_codegen_seed(s: Scratch) -> Outcome:
    return _codegen_with(s, lambda p: p["model"].update(seed=2 ** 70))


def p_codegen_batch(s: Scratch) -> Outcome:
    return _codegen_with(s, lambda p: p.update(batch_size=10 ** 12))


def p_codegen_kwarg(s: Scratch) -> Outcome:
    return _codegen_with(s, lambda p: p["model"]["kwargs"].update(width=10 ** 7))


def p_codegen_replicas(s: Scratch) -> Outcome:
    return _codegen_with(s, lambda p: p["stages"][0].update(replicas=10 ** 9, ranks=None))


def p_codegen_ranks(s: Scratch) -> Outcome:
    plan = s.copy("plan2")

    def edit(p: dict[str, Any]) -> None:
        p["stages"][1]["ranks"] = [5]

    _edit_json(plan / "plan.json", edit)
    return run_cli(["codegen", "plan2", "-o", "out"], s)


def p_conf_skips(s: Scratch) -> Outcome:
    pkg = s.copy("pkg")
    (pkg / "conf.json").write_text(json.dumps({"module_to_stage_map": [1, 1], "stage_to_rank_map": {"1": [0]}}))
    return run_cli(["train", "pkg", "--steps", "1", *TRAIN], s)


def p_graph_huge_times(s: Scratch) -> Outcome:
    prof = s.copy("prof")
    text = (prof / "graph.txt").read_text()
    import re

    (prof / "graph.txt").write_text(re.sub(r"forward_compute_time=[0-9.e+-]+", "forward_compute_time=1e308", text))
    return run_cli(["plan", "prof/graph.txt", "-n", "2", "-o", "p", "-q"], s)


def p_graph_truncated(s: Scratch) -> Outcome:
    prof = s.copy("prof")
    lines = (prof / "graph.txt").read_text().splitlines()
    (prof / "graph.txt").write_text("\n".join(ln for ln in lines if not ln.startswith("\t")) + "\n")
    return run_cli(["plan", "prof/graph.txt", "-n", "2", "-o", "p", "-q"], s)


def _simulate_with(s: Scratch, edit: Callable[[dict[str, Any]], None]) -> Outcome:
    plan = s.copy("plan2")
    _edit_json(plan / "plan.json", edit)
    return run_cli(["simulate", "plan2", "-o", "trace.json"], s)


def p_sim_negative_time(s: Scratch) -> Outcome:
    return _simulate_with(s, lambda p: p["stages"][0].setdefault("costs", {}).update(forward_s=-5.0))


def p_sim_zero_replicas(s: Scratch) -> Outcome:
    return _simulate_with(s, lambda p: p["stages"][0].update(replicas=0))


def p_sim_nan_time(s: Scratch) -> Outcome:
    return _simulate_with(s, lambda p: p["stages"][1]["predicted"].update(time_s="NaN"))


def p_sim_rank_outside(s: Scratch) -> Outcome:
    return _simulate_with(s, lambda p: p["stages"][1].update(ranks=[7]))


def p_sim_empty_stage(s: Scratch) -> Outcome:
    return _simulate_with(s, lambda p: p["stages"][1].update(nodes=[]))


# -- probes: huge counts ----------------------------------------------------------------------
def p_plan_workers(s: Scratch) -> Outcome:
    s.copy("prof")
    return run_cli(["plan", "prof/graph.txt", "-n", "100000", "-o", "p", "-q"], s)


def p_sim_steps(s: Scratch) -> Outcome:
    s.copy("plan2")
    return run_cli(["simulate", "plan2", "--steps", "1000000000", "-o", "trace.json"], s)


def p_sim_microbatches(s: Scratch) -> Outcome:
    s.copy("plan2")
    return run_cli(["simulate", "plan2", "--microbatches", "100000000", "-o", "trace.json"], s)


# -- probes: the control plane ---------------------------------------------------------------
TOKEN = "probe-token-123"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _master(**kwargs: Any):
    from pipeshift.launch.master import Master

    m = Master(TOKEN, port=0, **kwargs)
    m.start_in_thread()
    try:
        yield m
    finally:
        m.stop()


def _frame(sock: socket.socket) -> dict[str, Any]:
    (n,) = struct.unpack(">I", _exactly(sock, 4))
    return json.loads(_exactly(sock, n))


def _exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def _send(sock: socket.socket, obj: dict[str, Any]) -> None:
    body = json.dumps(obj).encode()
    sock.sendall(struct.pack(">I", len(body)) + body)


def _worker(m, rank: int = 0):
    from pipeshift.launch.client import MasterClient

    return MasterClient.connect(m.address, TOKEN, rank=rank, stage=0, timeout_s=5)


def _ctl(m):
    from pipeshift.launch.client import CtlClient

    return CtlClient(m.address, TOKEN, timeout_s=5)


def _refused(fn: Callable[[], Any], accepted: Callable[[], bool]) -> Outcome:
    """Run an attack; it must raise a pipeshift error or leave no effect (``accepted`` false)."""
    from pipeshift.errors import PipeshiftError

    try:
        fn()
    except (PipeshiftError, ConnectionError, OSError) as e:
        if accepted():
            return Outcome("silent acceptance", None, f"raised {e} but the effect took place")
        return Outcome("clean error", 1, str(e).splitlines()[0][:300] if str(e) else type(e).__name__)
    except Exception as e:  # noqa: BLE001
        return Outcome("traceback", None, f"{type(e).__name__}: {e}"[:300])
    if accepted():
        return Outcome("silent acceptance", 0, "accepted")
    return Outcome("clean error", 0, "no effect")


def _must_raise(fn: Callable[[], Any]) -> Outcome:
    """A check that must refuse: returning normally is a silent acceptance."""
    from pipeshift.errors import PipeshiftError

    try:
        fn()
    except PipeshiftError as e:
        return Outcome("clean error", 1, str(e).splitlines()[0][:300])
    except Exception as e:  # noqa: BLE001
        return Outcome("traceback", None, f"{type(e).__name__}: {e}"[:300])
    return Outcome("silent acceptance", 0, "accepted")


def p_relay(s: Scratch) -> Outcome:
    """A fake master relays the real master's handshake to ctl, then injects its own command."""
    with _master() as m:
        fake = socket.socket()
        fake.bind(("127.0.0.1", 0))
        fake.listen(1)
        result: dict[str, Any] = {}

        def relay() -> None:
            try:
                victim, _ = fake.accept()
                victim.settimeout(5)
                real = socket.create_connection(m.address, timeout=5)
                # forward frames both ways until the master welcomes the victim, then take over
                for _ in range(4):
                    msg = _frame(real)
                    _send(victim, msg)
                    if msg.get("type") in ("welcome", "error"):
                        break
                    reply = _frame(victim)
                    _send(real, reply)
                _send(real, {"type": "resize", "world_size": 999, "at_step": 5})
                result["reply"] = _frame(real)
                victim.close()
                real.close()
            except Exception as e:  # noqa: BLE001
                result["error"] = repr(e)

        t = threading.Thread(target=relay, daemon=True)
        t.start()

        def attack() -> None:
            from pipeshift.launch.client import CtlClient

            CtlClient(fake.getsockname(), TOKEN, timeout_s=5).close()

        with contextlib.suppress(Exception):
            attack()
        t.join(10)
        fake.close()
        return _refused(lambda: None, lambda: any(c.get("world_size") == 999 for c in m.commands))


def p_fake_master(s: Scratch) -> Outcome:
    """A listener without the token says welcome to anything: ctl must not believe it."""
    fake = socket.socket()
    fake.bind(("127.0.0.1", 0))
    fake.listen(1)
    told: dict[str, Any] = {}

    def serve() -> None:
        with contextlib.suppress(Exception):
            conn, _ = fake.accept()
            conn.settimeout(5)
            _send(conn, {"type": "challenge", "version": 1, "nonce": "00" * 16})
            told["hello"] = _frame(conn)
            _send(conn, {"type": "welcome", "version": 1, "heartbeat_interval_s": 1, "heartbeat_timeout_s": 3,
                         "proof": "00" * 32, "nonce": "11" * 16})
            told["request"] = _frame(conn)
            _send(conn, {"type": "ok", "id": 1, "at_step": 0})
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()

    def attack() -> None:
        from pipeshift.launch.client import CtlClient

        with CtlClient(fake.getsockname(), TOKEN, timeout_s=5) as c:
            c.resize(2)

    out = _refused(attack, lambda: "request" in told)
    fake.close()
    return out


def p_big_hello(s: Scratch) -> Outcome:
    """An unauthenticated 8 MiB hello must be refused after its header, not read."""
    with _master() as m:
        sock = socket.create_connection(m.address, timeout=5)
        _frame(sock)  # challenge
        size = 8 << 20
        sock.sendall(struct.pack(">I", size))
        sent = 0
        try:
            chunk = b" " * (1 << 16)
            while sent < size:
                sock.sendall(chunk)
                sent += len(chunk)
            reply = _frame(sock)
        except (OSError, ConnectionError):
            return Outcome("clean error", 1, f"closed after {sent} of {size} bytes")
        finally:
            sock.close()
        if "too large" in str(reply) or "exceeds" in str(reply):
            return Outcome("clean error", 1, str(reply)[:300])
        return Outcome("silent acceptance", 0, f"read the whole 8 MiB pre-auth hello; answered {reply}"[:300])


def p_many_connections(s: Scratch) -> Outcome:
    """300 idle connections from one peer must not all be held open."""
    with _master(handshake_timeout_s=30.0) as m:
        socks, served = [], 0
        try:
            for _ in range(300):
                sock = socket.create_connection(m.address, timeout=5)
                socks.append(sock)
            for sock in socks:
                sock.settimeout(2)
                try:
                    if _frame(sock).get("type") == "challenge":
                        served += 1
                except (OSError, ConnectionError, ValueError):
                    pass
        finally:
            for sock in socks:
                sock.close()
        if served >= 300:
            return Outcome("silent acceptance", 0, "all 300 unauthenticated connections were served")
        return Outcome("clean error", 1, f"served {served} of 300")


def p_auth_timeout(s: Scratch) -> Outcome:
    """A connection that never authenticates is closed after the handshake timeout."""
    with _master(handshake_timeout_s=1.0) as m:
        sock = socket.create_connection(m.address, timeout=10)
        try:
            _frame(sock)
            t0 = time.monotonic()
            sock.settimeout(6)
            try:
                data = sock.recv(1 << 16)
                while data:
                    data = sock.recv(1 << 16)
            except socket.timeout:
                return Outcome("hang", None, "still open 6 s after the challenge")
            except OSError:
                pass
            return Outcome("clean error", 1, f"closed after {time.monotonic() - t0:.1f} s")
        finally:
            sock.close()


def p_report_flood(s: Scratch) -> Outcome:
    with _master() as m:
        w = _worker(m)
        times = {str(k): {"compute_s": 0.1, "wait_s": 0.0, "comm_s": 0.0} for k in range(60000)}

        def attack() -> None:
            from pipeshift.launch.client import RequestRefused

            try:
                w._conn.request({"type": "report", "step": 1, "stage_times": times})
            except RequestRefused:
                raise
        out = _refused(attack, lambda: any(len((r.last_report or {}).get("stage_times", {})) > 1000
                                           for r in m.workers.values()) or _status_broken(m))
        w.close()
        return out


def _status_broken(m) -> bool:
    try:
        with _ctl(m) as c:
            c.status()
    except Exception:  # noqa: BLE001
        return True
    return False


def p_heartbeat_step(s: Scratch) -> Outcome:
    with _master() as m:
        w = _worker(m)

        def attack() -> None:
            w._conn.request({"type": "heartbeat", "step": 10 ** 30})

        out = _refused(attack, lambda: m._next_step() > 10 ** 9)
        w.close()
        return out


def _resize(m, **fields: Any) -> Outcome:
    def attack() -> None:
        with _ctl(m) as c:
            c._conn.request({"type": "resize", **fields})

    return _refused(attack, lambda: bool(m.commands))


def p_resize_huge(s: Scratch) -> Outcome:
    with _master() as m:
        return _resize(m, world_size=1000000)


def p_resize_step(s: Scratch) -> Outcome:
    with _master() as m:
        return _resize(m, world_size=2, at_step=-1)


def p_resize_bignum(s: Scratch) -> Outcome:
    with _master() as m:
        return _resize(m, world_size=10 ** 4000)


def p_repartition_batch(s: Scratch) -> Outcome:
    """A plan identical to the running one but for its batch size is refused before anyone switches."""
    base = json.loads((s.base / "plan2" / "plan.json").read_text())
    bad = {**base, "batch_size": 2 * int(base.get("batch_size") or 8) + 1}
    return _must_raise(lambda: _check_against(bad, base))


def _check_against(bad: dict[str, Any], base: dict[str, Any]) -> None:
    """The check every rank makes before a switch: ``bad`` proposed while ``base`` runs."""
    from pipeshift.plan import parse_plan
    from pipeshift.runtime.repartition import check_plan

    check_plan(parse_plan(bad, "ctl repartition"), 2, 4, running=parse_plan(base, "the running plan"))


def p_repartition_seed(s: Scratch) -> Outcome:
    base = json.loads((s.base / "plan2" / "plan.json").read_text())
    bad = json.loads(json.dumps(base))
    bad["model"]["seed"] = 99
    return _must_raise(lambda: _check_against(bad, base))


def p_ctl_token_printed(s: Scratch) -> Outcome:
    """`launch --hosts` must not print the master's token."""
    (s.root / "hosts.txt").write_text("hostA 1\nhostB 1\n")
    s.copy("pkg")
    err, out = io.StringIO(), io.StringIO()
    from pipeshift import cli

    env_before = os.environ.get("PIPESHIFT_TOKEN")
    os.environ["PIPESHIFT_TOKEN"] = TOKEN
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), _cwd(s.root):
            code = cli.main(["launch", "--hosts", "hosts.txt", "pkg", "--master", "hostA:29600", "--steps", "1"])
    finally:
        if env_before is None:
            os.environ.pop("PIPESHIFT_TOKEN", None)
        else:
            os.environ["PIPESHIFT_TOKEN"] = env_before
    text = out.getvalue()
    if TOKEN in text:
        return Outcome("silent acceptance", code, "the printed commands carry the token")
    import shlex

    from torch.distributed.run import parse_args

    for line in text.splitlines():
        if "torch.distributed.run" not in line:
            continue
        cmd = shlex.split(line.split("&&", 1)[1])
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                parsed = parse_args(cmd[3:])
        except SystemExit:
            return Outcome("silent acceptance", code, "torchrun cannot parse the printed command (--master)")
        if "--master" not in parsed.training_script_args:
            return Outcome("silent acceptance", code, "--master does not reach pipeshift train")
    return Outcome("clean error", code, "no token in the printed commands; torchrun parses them")


PROBES: list[Probe] = [
    Probe("export-checkpoint-package", "code from data files", "export imports the package meta.json names",
          p_export_package),
    Probe("codegen-os-system", "code from data files", "plan.json model spec os:system", p_codegen_os_system,
          "--trust-spec"),
    Probe("codegen-user-module", "code from data files", "plan.json names a module that runs on import",
          p_codegen_user_module, "--trust-spec"),
    Probe("codegen-inputs", "code from data files", "plan.json model.inputs is a foreign callable", p_codegen_inputs,
          "evil_probe_mod:inputs"),
    Probe("resume-plan-spec", "code from data files", "the checkpoint's plan.json names os:system",
          p_resume_plan_spec, "refusing"),
    Probe("flipped-bytes-export", "checkpoints", "64 flipped bytes in stage0.pt, export", p_flipped_export, "SHA-256"),
    Probe("flipped-bytes-resume", "checkpoints", "64 flipped bytes in stage0.pt, resume", p_flipped_resume,
          "previous intact checkpoint"),
    Probe("meta-step", "checkpoints", "meta.json step disagrees with the directory", p_meta_step, "step"),
    Probe("shape-export", "checkpoints", "a wrong-shape tensor, export", p_shape_export, "shape"),
    Probe("shape-resume", "checkpoints", "a wrong-shape tensor, resume", p_shape_resume, "shape"),
    Probe("extra-key-resume", "checkpoints", "an extra tensor, resume", p_extra_key_resume, "not.a.weight"),
    Probe("nan-weights-resume", "checkpoints", "NaN weights, resume", p_nan_weights, "NaN"),
    Probe("lr-nan", "checkpoints", "--lr nan", p_lr_nan, "--lr"),
    Probe("loss-diverges", "checkpoints", "--lr 1e30: the loss becomes inf/NaN", p_loss_diverges, "loss"),
    Probe("show-empty-graph", "tracebacks and silent acceptance", "show an empty graph.txt", p_show_empty_graph,
          "graph.txt"),
    Probe("nested-profile-plan", "tracebacks and silent acceptance", "deeply nested profile.json, plan",
          p_nested_plan, "profile.json"),
    Probe("nested-profile-show", "tracebacks and silent acceptance", "deeply nested profile.json, show",
          p_nested_show, "profile.json"),
    Probe("codegen-seed", "tracebacks and silent acceptance", "seed 2**70", p_codegen_seed, "seed"),
    Probe("codegen-batch", "tracebacks and silent acceptance", "batch_size 10**12", p_codegen_batch, "batch_size"),
    Probe("codegen-kwarg", "tracebacks and silent acceptance", "model kwarg width=10**7", p_codegen_kwarg, "mlp"),
    Probe("codegen-ranks", "tracebacks and silent acceptance", "ranks [0],[5] for two ranks", p_codegen_ranks,
          "ranks"),
    Probe("conf-skips-stage", "tracebacks and silent acceptance", "conf.json stage ids 0, 2", p_conf_skips,
          "conf.json"),
    Probe("package-seed", "tracebacks and silent acceptance", "package plan.json seed differs from MODEL_SPEC",
          p_package_seed, "MODEL_SPEC"),
    Probe("graph-1e308", "tracebacks and silent acceptance", "graph.txt times of 1e308", p_graph_huge_times,
          "graph.txt"),
    Probe("graph-truncated", "tracebacks and silent acceptance", "graph.txt without its edge lines",
          p_graph_truncated, "graph.txt"),
    Probe("simulate-negative-time", "tracebacks and silent acceptance", "simulate: negative stage time",
          p_sim_negative_time, "plan.json"),
    Probe("simulate-zero-replicas", "tracebacks and silent acceptance", "simulate: replicas 0",
          p_sim_zero_replicas, "plan.json"),
    Probe("simulate-nan-time", "tracebacks and silent acceptance", "simulate: time \"NaN\"", p_sim_nan_time,
          "plan.json"),
    Probe("simulate-rank-outside", "tracebacks and silent acceptance", "simulate: rank 7 of 2",
          p_sim_rank_outside, "plan.json"),
    Probe("simulate-empty-stage", "tracebacks and silent acceptance", "simulate: a stage with no nodes",
          p_sim_empty_stage, "plan.json"),
    Probe("plan-100000-workers", "bounded commands", "plan -n 100000", p_plan_workers, "-n"),
    Probe("simulate-1e9-steps", "bounded commands", "simulate --steps 1e9", p_sim_steps, "--steps"),
    Probe("simulate-1e8-microbatches", "bounded commands", "simulate --microbatches 1e8", p_sim_microbatches,
          "--microbatches"),
    Probe("codegen-replicas", "bounded commands", "replicas 10**9", p_codegen_replicas, "replicas"),
    Probe("resize-1e6", "bounded commands", "ctl resize --workers 1000000", p_resize_huge, "world_size"),
    Probe("resize-step-minus-1", "bounded commands", "ctl resize --at-step -1", p_resize_step, "at_step"),
    Probe("resize-10e4000", "bounded commands", "resize to 10**4000 ranks", p_resize_bignum, "world_size"),
    Probe("repartition-batch", "bounded commands", "a running job's plan with batch_size 10**12",
          p_repartition_batch, "batch"),
    Probe("repartition-seed", "bounded commands", "a running job's plan with another seed", p_repartition_seed,
          "seed"),
    Probe("relay", "control plane", "a fake master relays the handshake and injects a command", p_relay),
    Probe("fake-master", "control plane", "ctl talks to a master without the token", p_fake_master),
    Probe("big-hello", "control plane", "an 8 MiB unauthenticated hello", p_big_hello),
    Probe("300-connections", "control plane", "300 unauthenticated connections from one peer",
          p_many_connections),
    Probe("auth-timeout", "control plane", "a connection that never authenticates", p_auth_timeout),
    Probe("report-60000-stages", "control plane", "a report with 60,000 stage entries", p_report_flood),
    Probe("heartbeat-1e30", "control plane", "a heartbeat at step 10**30", p_heartbeat_step),
    Probe("hosts-token", "control plane", "launch --hosts prints the token / a --master torchrun parses",
          p_ctl_token_printed),
]
BY_ID = {p.id: p for p in PROBES}


def run_probe(probe_id: str, workdir: Path, base: Path) -> Outcome:
    build_base(base)
    scratch = Scratch(workdir, base)
    out = BY_ID[probe_id].run(scratch)
    if scratch.marker.exists():
        return Outcome("code executed", out.code, out.message)
    return out


if __name__ == "__main__":
    out = run_probe(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
    print("PROBE-OUTCOME " + json.dumps(out.to_json()), flush=True)
    os._exit(0)
