"""Serving: outputs equal the unsplit model, back-pressure, a dead rank, repartitioning under load, metrics.

Two servers of a tiny GPT: ``--local 4 --frontend-rank 3`` (three stages and a front end on a
rank of its own, the last stage's rank slowed so that a burst overflows the queue, a bearer
token; its last test kills a rank) and ``--local 2`` (two stages,
switching to another cut under load). Every expected output is the unsplit model's forward on
the same inputs, computed here.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import json
import os
import signal
import time

import httpx
import pytest
import torch

from pipeshift.serve import wire
from serve_helpers import GPT, Server, assert_close, assert_concurrent_predictions_equal, graph_nodes, graph_txt, package, plan_doc, reference

pytestmark = pytest.mark.timeout(400)
MAX_BATCH = 4


@pytest.fixture(scope="module")
def nodes() -> list[str]:
    return graph_nodes(GPT)


@pytest.fixture(scope="module")
def model():
    return reference(GPT)


@pytest.fixture(scope="module")
def three(tmp_path_factory, nodes):
    d = tmp_path_factory.mktemp("serve3")
    n = len(nodes)
    pkg = package(d, GPT, [n // 3, 2 * n // 3], [[0], [1], [2]], nodes)
    # the front end on a rank of its own (rank 3, no stage); the two-stage server keeps it on rank 0
    server = Server(d, pkg, 4, ["--frontend-rank", "3", "--max-batch", str(MAX_BATCH), "--max-body-bytes", "100000",
                                "--queue", "16", "--inflight", "2", "--timeout", "20", "--slowdown", "2:60"],
                    token="s3cret")
    yield server
    server.close()


@pytest.fixture(scope="module")
def two(tmp_path_factory, nodes):
    d = tmp_path_factory.mktemp("serve2")
    n = len(nodes)
    pkg = package(d, GPT, [n // 2], [[0], [1]], nodes)
    (d / "plan_b.json").write_text(json.dumps(plan_doc(GPT, nodes, [n // 4], [[0], [1]])))
    graph_txt(d, GPT)
    # rank 1 is slowed, and the forced switch at batch 12 gives it more layers: the policy takes some back
    server = Server(d, pkg, 2, ["--max-batch", str(MAX_BATCH), "--repartition-at", f"12:{d / 'plan_b.json'}",
                                "--slowdown", "1:20", "--policy", "auto", "--report-every", "4", "--policy-arg",
                                "persist_windows=2", "--policy-arg", "cooldown_windows=1", "--policy-arg",
                                "fixed_pause_s=0.0", "--policy-log", str(d / "policy.jsonl")])
    yield server
    server.close()


def tokens(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 50, (n, length), generator=torch.Generator().manual_seed(seed))


def check_outputs(server: Server, model) -> None:
    for length in (5, 9):
        for n in range(1, MAX_BATCH + 1):
            x = tokens(n, length, seed=10 * n + length)
            r = server.predict(x)
            assert r.status_code == 200, r.text
            with torch.no_grad():
                assert_close(r.json()["outputs"][0], model(x))


def test_wire_round_trip():
    tensors = [torch.randn(3, 5), torch.arange(24).view(2, 3, 4), torch.tensor([True, False]),
               torch.zeros(0, 7, dtype=torch.float16), torch.tensor(2.5, dtype=torch.float64)]
    header, payload = wire.encode(wire.Message(wire.DATA, 17, tensors, text="why"))
    msg = wire.decode(header, payload)
    assert (msg.kind, msg.batch, msg.text) == (wire.DATA, 17, "why")
    for got, want in zip(msg.tensors, tensors):
        assert got.dtype == want.dtype and torch.equal(got, want)
    with pytest.raises(wire.PeerError):
        wire.payload_bytes(torch.zeros(wire.HEADER_LEN, dtype=torch.int64))


def _engine(config, double) -> tuple:
    """The engine alone (one rank, no processes) on a one-module stage ``double`` and its dispatcher thread, started."""
    import threading

    from torch import nn

    from pipeshift.serve.frontend import Frontend
    from pipeshift.serve.worker import StageWorker

    entries = [(double, ["input0"], ["node1"]), (nn.Identity(), ["node1", "target"], ["loss"])]
    mailbox = wire.Mailbox()
    worker = StageWorker(0, entries, [0, 0], {0: [0]}, frontend=0, link=wire.Link(0, mailbox, 10.0, str),
                         device=torch.device("cpu"), timeout_s=10.0)
    engine = Frontend(0, 1, worker, mailbox, config)
    engine.start()
    dispatcher = threading.Thread(target=engine.run, daemon=True)
    dispatcher.start()
    return engine, dispatcher


def _stop(engine, dispatcher) -> None:
    engine.stop()
    dispatcher.join(timeout=10)
    engine.shutdown_ranks()


class _Slow(torch.nn.Module):
    """Doubles its input after 0.3 s, noting each batch's size."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def forward(self, x):
        self.sizes.append(int(x.shape[0]))
        time.sleep(0.3)
        return 2 * x


def test_one_answer_per_request_in_process():
    """The engine alone (one rank, no processes): 200s, a full queue's 503s, a deadline's 504s — once each."""
    from pipeshift.serve.frontend import Config, Request

    engine, dispatcher = _engine(Config(max_batch=2, max_delay_s=0.0, queue_size=4, inflight=1, timeout_s=10.0,
                                        ping_interval_s=0.05), _Slow())
    answers: dict[int, list] = {i: [] for i in range(10)}
    requests = [Request([torch.full((1, 3), float(i))], 10.0 if i == 0 else 0.15,
                        lambda outcome, i=i: answers[i].append(outcome)) for i in range(10)]
    try:
        for r in requests:
            engine.submit(r)
        deadline = time.monotonic() + 30
        while any(not a for a in answers.values()) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)  # a late second answer would show up here
    finally:
        _stop(engine, dispatcher)
    assert all(len(a) == 1 for a in answers.values()), answers
    statuses = {i: a[0].status for i, a in answers.items()}
    assert statuses[0] == 200 and {503, 504} <= set(statuses.values()) <= {200, 503, 504}, statuses
    for i, a in answers.items():
        if a[0].status == 200:
            assert torch.equal(a[0].outputs[0], torch.full((1, 3), 2.0 * i))
        else:
            assert a[0].reason


def _batch_sizes(config, arrivals: list[float]) -> list[int]:
    """Run the engine alone on a stage that takes 0.3 s a batch; the batch sizes it was given."""
    from pipeshift.serve.frontend import Request

    slow = _Slow()
    engine, dispatcher = _engine(config, slow)
    answers: list = []
    try:
        t0 = time.monotonic()
        for i, at in enumerate(arrivals):
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            engine.submit(Request([torch.full((1, 3), float(i))], 10.0, answers.append))
        deadline = time.monotonic() + 20
        while len(answers) < len(arrivals) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        _stop(engine, dispatcher)
    assert [a.status for a in answers] == [200] * len(arrivals)
    return slow.sizes


def test_a_batch_fills_up_while_every_stage_is_busy():
    """With a batch in flight on the only stage, later requests wait to fill one batch, not queue small ones."""
    from pipeshift.serve.frontend import Config

    arrivals = [0.0, 0.05, 0.08, 0.11, 0.14]
    common = dict(max_batch=4, max_delay_s=0.0, queue_size=16, inflight=2, timeout_s=10.0, ping_interval_s=0.05)
    # the rule: a short batch goes out only while fewer than one batch is in flight
    assert _batch_sizes(Config(**common, partial_below=1), arrivals) == [1, 4]
    # without it the spare slot sends request 1 alone the moment it arrives
    assert _batch_sizes(Config(**common, partial_below=0), arrivals) == [1, 1, 3]
    # a batch that cannot fill goes out when the stage comes back, not later
    assert _batch_sizes(Config(**common, partial_below=1), arrivals[:3]) == [1, 2]


def test_json_bodies_parse_and_answer_as_the_standard_library_does():
    """orjson (when installed) is a fast path only: same values, same refusals, non-finite outputs unchanged."""
    import json

    from pipeshift.serve import http

    for body in [b'{"inputs": [[[1.5, -2e-7, 3]]]}', b'{"inputs": [[NaN, Infinity]]}',
                 b'{"inputs": [[123456789012345678901234567890]]}', "{\"t\": \"\u00e9\"}".encode()]:
        assert repr(http.loads(body)) == repr(json.loads(body))
    for bad in [b"{not json", b"\xff\xfe"]:
        with pytest.raises((ValueError, UnicodeDecodeError)):
            http.loads(bad)
    outputs = {"outputs": [torch.tensor([[0.1, -2.5e-8, 3.0]]).tolist()]}
    assert json.loads(http.json_response(outputs).body) == outputs
    with pytest.raises(ValueError):  # Starlette refuses a non-finite float; orjson must not turn it into null
        http.json_response({"outputs": [[float("nan")]]})


def test_three_stages_equal_the_unsplit_model(three, model):
    check_outputs(three, model)
    # concurrent requests of mixed sizes and lengths, batched together where they match
    cases = [(1 + i % MAX_BATCH, (5, 9)[i % 2], 100 + i) for i in range(16)]
    with cf.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda c: three.predict(tokens(*c)), cases))
    for (n, length, seed), r in zip(cases, answers):
        assert r.status_code == 200, r.text
        with torch.no_grad():
            assert_close(r.json()["outputs"][0], model(tokens(n, length, seed)))


def test_safetensors_body(three, model):
    from safetensors.torch import load, save

    x = tokens(3, 7, seed=5)
    r = three.client.post("/v1/predict", content=save({"input0": x}),
                          headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    with torch.no_grad():
        want = model(x)
    assert torch.allclose(load(r.content)["output0"], want, atol=1e-6, rtol=0)


def test_bad_requests_get_one_line_reasons(three):
    c = three.client
    cases = [
        (c.post("/v1/predict", content=b"{not json"), 400),
        (c.post("/v1/predict", json={"inputs": []}), 400),
        (c.post("/v1/predict", json={"inputs": [[1, 2, 3]]}), 400),  # no batch dimension
        (c.post("/v1/predict", json={"inputs": [[[1.5, 2]]]}), 400),  # floats for token ids
        (c.post("/v1/predict", json={"inputs": [[[1, 2], [3]]]}), 400),  # ragged
        (c.post("/v1/predict", json={"inputs": [tokens(MAX_BATCH + 1, 4, 0).tolist()]}), 413),
        (c.post("/v1/predict", content=b"[" * 200_000), 413),
        (c.post("/v1/predict", json={"inputs": [[[1, 2, 99]]]}), 400),  # token id outside the vocabulary
        (c.post("/v1/predict", content=b"\x00\x01", headers={"Content-Type": "application/octet-stream"}), 400),
        (httpx.post(three.base + "/v1/predict", json={"inputs": [[[1, 2]]]}), 401),
    ]
    for r, status in cases:
        assert r.status_code == status, r.text
        reason = r.json()["error"]
        assert reason and "\n" not in reason
    assert c.get("/health").status_code == 200
    assert three.predict(tokens(1, 3, 0)).status_code == 200  # a rejected batch leaves the pipeline in step


def test_completions_match_greedy_decoding(three, model):
    prompt = [3, 14, 15, 9]
    r = three.client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 6})
    assert r.status_code == 200, r.text
    assert r.headers["x-pipeshift-generation"] == "recompute"
    got = r.json()["choices"][0]["token_ids"]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert got == ids[len(prompt):]
    with three.client.stream("POST", "/v1/completions", json={"prompt": prompt, "max_tokens": 6, "stream": True}) as s:
        events = [line.removeprefix("data: ") for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert [json.loads(e)["choices"][0]["token_ids"][0] for e in events[:-1]] == got
    r = three.client.post("/v1/completions", json={"prompt": "text", "max_tokens": 2})
    assert r.status_code == 400 and "tokenizer" in r.json()["error"]


def test_metrics_parse(three):
    from prometheus_client.parser import text_string_to_metric_families

    r = three.client.get("/metrics")
    assert r.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    predict_ok = sum(s.value for s in families["pipeshift_serve_requests"].samples
                     if s.name.endswith("_total") and s.labels == {"endpoint": "predict", "status": "200"})
    assert predict_ok >= 2 * MAX_BATCH + 16
    batches = [s for s in families["pipeshift_serve_batch_size"].samples if s.name.endswith("_count")]
    assert batches and batches[0].value >= 1
    ranks = {s.labels["rank"] for s in families["pipeshift_serve_stage_compute_seconds"].samples}
    assert ranks == {"0", "1", "2"}  # the stage ranks; the front end's own rank runs none
    assert "pipeshift_serve_queue_depth" in families and "pipeshift_serve_request_latency_seconds" in families


def test_two_stages_and_switches_under_load(two, model, nodes):
    check_outputs(two, model)  # 8 batches: the switch comes at batch 12, during the load below
    assert_concurrent_predictions_equal(two, model, tokens, [(1 + i % 3, (5, 9)[i % 2], 200 + i) for i in range(60)])
    from prometheus_client.parser import text_string_to_metric_families

    def switches() -> float:
        families = {f.name: f for f in text_string_to_metric_families(two.client.get("/metrics").text)}
        return sum(s.value for s in families["pipeshift_serve_repartitions"].samples if s.name.endswith("_total"))

    assert switches() >= 1 and "repartitioned (--repartition-at 12:" in two.log()
    # keep a bounded load on until the policy has moved layers off the slowed rank
    deadline, seed = time.monotonic() + 120, 1000
    while "repartitioned (policy)" not in two.log() and time.monotonic() < deadline:
        assert_concurrent_predictions_equal(two, model, tokens, [(1 + i % 2, 6, seed + i) for i in range(8)])
        seed += 8
    assert "repartitioned (policy)" in two.log(), two.log()[-3000:]
    decisions = [json.loads(line) for line in (two.workdir / "policy.jsonl").read_text().splitlines()]
    moved = [d for d in decisions if d.get("repartition")]
    assert moved and len(moved[-1]["new_stages"][1]) < len(nodes) - len(nodes) // 4  # rank 1 holds less than plan_b gave it
    assert switches() >= 2
    check_outputs(two, model)  # and on the new split


def test_loadtest_counts_every_request(three, tmp_path, capsys):
    from pipeshift.cli import main

    token = tmp_path / "token"
    token.write_text("s3cret\n")
    rows = tmp_path / "load.csv"
    assert main(["loadtest", three.base, "--concurrency", "4", "--requests", "12", "--csv", str(rows),
                 "--token-file", str(token), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["requests"] == 12 and summary["statuses"] == {"200": 12}
    with open(rows) as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["200"] * 12
    assert main(["loadtest", "http://10.1.2.3:8000", "--rate", "1", "--duration", "1"]) == 1
    assert "not a loopback address" in capsys.readouterr().err


def test_full_queue_and_a_killed_rank(three, model):
    server = three
    # a bounded burst: every request gets exactly one answer, 200 (correct) or 503 (at once)
    burst = [(1 + i % 2, 6, 300 + i) for i in range(60)]

    def send(case):
        t0 = time.monotonic()
        r = server.predict(tokens(*case))
        return r, time.monotonic() - t0

    with cf.ThreadPoolExecutor(60) as pool:
        answers = list(pool.map(send, burst))
    statuses = [r.status_code for r, _ in answers]
    assert len(statuses) == 60 and set(statuses) <= {200, 503}, statuses
    assert 503 in statuses and 200 in statuses
    assert all(r.headers.get("retry-after") for r, _ in answers if r.status_code == 503)
    slowest_503 = max(t for r, t in answers if r.status_code == 503)
    slowest_200 = max(t for r, t in answers if r.status_code == 200)
    assert slowest_503 < slowest_200  # turned away without waiting for the pipeline
    for case, (r, _) in zip(burst, answers):
        if r.status_code == 200:
            with torch.no_grad():
                assert_close(r.json()["outputs"][0], model(tokens(*case)))

    # kill a stage's rank with requests waiting: /ready flips, each waiting request gets 503
    pid = server.client.get("/ready").json()["ranks"]["1"]["pid"]
    with cf.ThreadPoolExecutor(20) as pool:
        waiting = [pool.submit(server.predict, tokens(1, 6, 400 + i)) for i in range(20)]
        time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        ready = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and 503 not in ready:
            try:
                ready.append(server.client.get("/ready").status_code)
            except httpx.HTTPError:
                break
            time.sleep(0.02)
        results = [f.result(timeout=60) for f in waiting]
    assert 503 in ready
    assert all(r.status_code in (200, 503) for r in results)
    assert any(r.status_code == 503 for r in results)
    assert server.wait(60) != 0
    assert "pipeshift serve: error:" in server.log()
