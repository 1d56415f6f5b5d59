"""Shared by the serving tests and benchmarks: packages of tiny models, a server process, requests.

Plans are cut by hand over the model's captured graph (contiguous runs of its topological
order, which are always valid stages), so no profiler run is needed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from helpers import REPO
from pipeshift.codegen import generate_package
from pipeshift.graph.capture import capture, to_graph
from pipeshift.graph.graphtxt import write_graph_txt
from pipeshift.spec import ModelSpec

PY = sys.executable
GPT = ModelSpec("pipeshift.models:gpt", {"vocab_size": 50, "width": 16, "depth": 2, "heads": 2, "block_size": 32},
                seed=3)


def graph_nodes(spec: ModelSpec) -> list[str]:
    bundle = spec.build()
    return to_graph(capture(bundle.model, bundle.example_inputs(2))).topological_order()


def graph_txt(out: Path, spec: ModelSpec) -> Path:
    """The model's graph.txt with every operation at 1 ms forward + 1 ms backward (for the policy)."""
    bundle = spec.build()
    graph = to_graph(capture(bundle.model, bundle.example_inputs(2)))
    for node in graph.nodes.values():
        if not node.is_input:
            node.forward_ms = node.backward_ms = 1.0
    write_graph_txt(graph, out / "graph.txt")
    return out / "graph.txt"


def plan_doc(spec: ModelSpec, nodes: list[str], cuts: list[int], ranks: list[list[int]]) -> dict:
    """A plan.json cutting ``nodes`` at positions ``cuts`` (0 and len implied)."""
    bounds = [0, *cuts, len(nodes)]
    stages = [{"stage_id": k, "nodes": nodes[a:b], "replicas": len(r), "ranks": r}
              for k, (a, b, r) in enumerate(zip(bounds, bounds[1:], ranks))]
    return {"version": 1, "graph": "graph.txt", "model": spec.to_json(), "leaf_policy": None, "batch_size": 2,
            "num_workers": sum(len(r) for r in ranks), "stages": stages}


def package(out: Path, spec: ModelSpec, cuts: list[int], ranks: list[list[int]], nodes: list[str] | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_doc(spec, nodes or graph_nodes(spec), cuts, ranks)
    (out / "plan.json").write_text(json.dumps(plan, indent=1))
    return generate_package(plan, out / "stages")


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e["OMP_NUM_THREADS"] = "1"
    e.pop("PIPESHIFT_SERVE_TOKEN", None)
    e.update(extra)
    return e


class Server:
    """``pipeshift serve PKG --local N`` in its own session, on a free port; ``close()`` kills it all."""

    def __init__(self, workdir: Path, pkg: Path | None, ranks: int, args: list[str] = (), *, token: str | None = None,
                 start_timeout: float = 180.0):
        self.workdir = workdir
        self.port_file = workdir / "port.txt"
        self.port_file.unlink(missing_ok=True)
        self.log_path = workdir / "serve.log"
        self.token = token
        extra = {"PIPESHIFT_SERVE_TOKEN": token} if token else {}
        cmd = [PY, "-m", "pipeshift", "serve", *([str(pkg)] if pkg else []), "--local", str(ranks), "--port", "0",
               "--port-file", str(self.port_file), "--threads", "1", *args]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=workdir, env=env(**extra), stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + start_timeout
        while not self.port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise AssertionError(f"the server did not start:\n{self.log()[-4000:]}")
            time.sleep(0.2)
        self.base = f"http://127.0.0.1:{int(self.port_file.read_text())}"
        self.client = httpx.Client(base_url=self.base, timeout=120.0, headers=self.headers())
        while self.client.get("/ready").status_code != 200:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise AssertionError(f"the server never became ready:\n{self.log()[-4000:]}")
            time.sleep(0.2)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def predict(self, *inputs: torch.Tensor) -> httpx.Response:
        return self.client.post("/v1/predict", json={"inputs": [t.tolist() for t in inputs]})

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.close()
            raise AssertionError(f"the server did not exit within {timeout} s:\n{self.log()[-4000:]}") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        if hasattr(self, "client"):
            self.client.close()
        self._log.close()


def reference(spec: ModelSpec):
    model = spec.build().model
    model.eval()
    return model


def assert_close(got, want: torch.Tensor, tol: float = 1e-6) -> None:
    got = torch.tensor(got, dtype=want.dtype)
    assert got.shape == want.shape, (got.shape, want.shape)
    err = float((got - want).abs().max()) if want.numel() else 0.0
    assert err <= tol, f"max abs error {err:.3g} > {tol:g}"


def assert_concurrent_predictions_equal(server: Server, model, inputs_of, cases, tol: float = 1e-6,
                                        clients: int = 4) -> None:
    """``cases`` sent by ``clients`` threads at once: every answer 200 and equal to ``model`` on its input."""
    import concurrent.futures as cf

    with cf.ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(lambda c: server.predict(inputs_of(*c)), cases))
    for case, r in zip(cases, answers):
        assert r.status_code == 200, r.text
        with torch.no_grad():
            assert_close(r.json()["outputs"][0], model(inputs_of(*case)), tol=tol)
