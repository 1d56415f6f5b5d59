"""The control plane: framing, authentication, the master with fake workers, and `pipeshift ctl`."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
import time

import numpy as np
import pytest

from helpers import REPO, wait_until
from pipeshift.cli import main
from pipeshift.errors import PipeshiftError
from pipeshift.launch import protocol
from pipeshift.launch.client import CtlClient, MasterClient, MasterUnavailable, RequestRefused, connect
from pipeshift.launch.master import Master, PolicyDriver
from pipeshift.launch.protocol import AuthError, ProtocolError
from pipeshift.plan import parse_plan
from pipeshift.runtime.control import parse_command
from pipeshift.runtime.policy import Chain, PolicyConfig

pytestmark = pytest.mark.timeout(90)
TOKEN = "s3cret-token"
PLAN = {"version": 1, "stages": [{"stage_id": 0, "nodes": ["node0", "node1"], "ranks": [0]},
                                 {"stage_id": 1, "nodes": ["node2", "node3"], "ranks": [1]}]}


@pytest.fixture
def master():
    m = Master(TOKEN, port=0, heartbeat_timeout_s=30.0, max_message_bytes=64 * 1024, handshake_timeout_s=5.0)
    m.start_in_thread()
    yield m
    m.stop()


TOKEN_FILE = Path(tempfile.mkdtemp(prefix="pipeshift-token-")) / "token"
TOKEN_FILE.write_text(TOKEN + "\n")


def ctl(m: Master, *args: str) -> list[str]:
    host, port = m.address
    return ["ctl", "--master", f"{host}:{port}", "--token-file", str(TOKEN_FILE), "--timeout", "10", *args]


def status_of(m: Master) -> dict:
    with CtlClient(m.address, TOKEN) as c:
        return c.status()


def login(s: socket.socket, nonce: str, role: str = "ctl") -> protocol.Session:
    """Say a correct hello on a raw socket; the session for the frames that follow."""
    mine = protocol.new_nonce()
    protocol.send_message(s, {"type": "hello", "role": role, "nonce": mine,
                              "auth": protocol.sign(TOKEN, nonce, mine, role)})
    return protocol.Session(TOKEN, nonce, mine, is_master=False)


def raw_connect(m: Master) -> tuple[socket.socket, str]:
    """A socket past the master's challenge, and the challenge's nonce."""
    s = socket.create_connection(m.address, timeout=10)
    challenge = protocol.recv_message(s)
    assert challenge["type"] == "challenge"
    return s, challenge["nonce"]


# -- framing -------------------------------------------------------------------------------
def test_frame_round_trip_over_a_socket():
    a, b = socket.socketpair()
    with a, b:
        messages = [{"type": "report", "step": 3, "stage_times": {"0": {"compute_s": 0.25}}},
                    {"type": "x", "text": "héllo ✓", "nested": [1, 2.5, None, True]}]
        for m in messages:
            protocol.send_message(a, m)
        assert [protocol.recv_message(b) for _ in messages] == messages
        frame = protocol.encode(messages[0])
        assert struct.unpack(">I", frame[:4])[0] == len(frame) - 4
        assert json.loads(frame[4:].decode()) == messages[0]


def test_oversized_frames_are_refused_both_ways():
    with pytest.raises(ProtocolError, match="exceeds"):
        protocol.encode({"type": "x", "pad": "y" * 100}, max_bytes=50)
    a, b = socket.socketpair()
    with a, b:
        a.sendall(struct.pack(">I", 10**9))  # no body: the receiver must refuse before reading it
        with pytest.raises(ProtocolError, match="exceeds"):
            protocol.recv_message(b, max_bytes=1024)


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'{"no_type": 1}', b'{"type": 5}', b"\xff\xfe{}",
                                  b'{"type": "x", "v": NaN}', b'{"type": "x", "v": -Infinity}', b"[" * 100_000])
def test_malformed_bodies_are_refused(body):
    with pytest.raises(ProtocolError):
        protocol.decode_body(body)


def test_nan_is_not_sent():
    with pytest.raises(ValueError):
        protocol.encode({"type": "x", "v": float("nan")})


def test_hmac_challenge_response():
    nonce = protocol.new_nonce()
    assert protocol.verify("tok", nonce, protocol.sign("tok", nonce))
    assert not protocol.verify("tok", nonce, protocol.sign("other", nonce))
    assert not protocol.verify("tok", protocol.new_nonce(), protocol.sign("tok", nonce))
    assert not protocol.verify("tok", nonce, None) and not protocol.verify("tok", nonce, "ünïcode")


@pytest.mark.parametrize("text, expected", [("h:12", ("h", 12)), ("h", ("h", protocol.DEFAULT_PORT)),
                                            (":7", ("127.0.0.1", 7)), ("[::1]:9", ("::1", 9))])
def test_parse_address(text, expected):
    assert protocol.parse_address(text) == expected


@pytest.mark.parametrize("text", ["h:x", "h:70000", "[::1"])
def test_parse_address_rejects(text):
    with pytest.raises(PipeshiftError):
        protocol.parse_address(text)


# -- hostile peers: the master refuses them and keeps serving ---------------------------
def test_bad_token_is_rejected_and_master_keeps_serving(master):
    with pytest.raises(AuthError, match="rejected the token"):
        MasterClient.connect(master.address, "wrong", rank=0, stage=0)
    with pytest.raises(AuthError):
        CtlClient(master.address, "")
    assert status_of(master)["workers"] == []


def test_oversized_and_malformed_frames_do_not_stop_the_master(master):
    s, _ = raw_connect(master)
    s.sendall(struct.pack(">I", 10**9))
    reply = protocol.recv_message(s)
    assert reply["type"] == "error" and "exceeds" in reply["error"]
    assert s.recv(1) == b""  # the offending connection is closed
    s.close()

    s, _ = raw_connect(master)
    s.sendall(struct.pack(">I", 5) + b"{oops")
    assert protocol.recv_message(s)["type"] == "error"
    s.close()

    s, _ = raw_connect(master)  # a well-formed hello without the right answer
    protocol.send_message(s, {"type": "hello", "role": "worker", "rank": 0, "stage": 0, "auth": "00"})
    assert "authentication" in protocol.recv_message(s)["error"]
    s.close()

    s, nonce = raw_connect(master)  # authenticated, then garbage after a valid request
    session = login(s, nonce)
    assert protocol.recv_message(s, session=session)["type"] == "welcome"
    protocol.send_message(s, {"type": "status"}, session=session)
    assert protocol.recv_message(s, session=session)["type"] == "ok"
    s.sendall(b"\x00\x00")  # half a header, then hang up
    s.close()

    s, nonce = raw_connect(master)  # NaN smuggled into a plan is refused before it is queued
    session = login(s, nonce)
    protocol.recv_message(s, session=session)
    body = b'{"type": "repartition", "plan": {"stages": [{"nodes": ["a"], "predicted": {"time_s": NaN}}]}}'
    mac = session._mac(session.outgoing, session.sent, body)
    session.sent += 1
    s.sendall(struct.pack(">I", len(body) + protocol.MAC_BYTES) + mac + body)
    assert "not JSON" in protocol.recv_message(s, session=session)["error"]
    s.close()

    s, _ = raw_connect(master)  # a peer that never says hello does not block others
    with connect(master.address, TOKEN, rank=3, stage=1) as w:
        assert w.poll() is None
    s.close()
    status = status_of(master)
    assert [w["rank"] for w in status["workers"]] == [3] and status["commands"] == []


def test_bad_requests_are_answered_and_the_connection_survives(master):
    with MasterClient.connect(master.address, TOKEN, rank=0, stage=0) as w:
        with pytest.raises(RequestRefused, match="non-negative"):
            w.report(1, {0: {"compute_s": -1.0}})
        with pytest.raises(RequestRefused, match="compute_s"):
            w.report(1, {0: {"wait_s": 1.0}})
        with pytest.raises(RequestRefused, match="no command"):
            w.ack(99)
        assert w.report(2, {0: {"compute_s": 0.5}}) == 0
    with CtlClient(master.address, TOKEN) as c:
        with pytest.raises(RequestRefused, match="invalid plan"):
            c.request({"type": "repartition", "plan": {"stages": [{"nodes": ["a"]}, {"nodes": ["a"]}]}})
        with pytest.raises(RequestRefused, match="unknown ctl request"):
            c.request({"type": "report"})
        assert c.status()["commands"] == []


def test_unreachable_master_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connection refused
        with pytest.raises(MasterUnavailable, match="cannot reach the master"):
            MasterClient.connect(("127.0.0.1", port), TOKEN, rank=0, stage=0, timeout_s=2)


# -- workers, status, commands ---------------------------------------------------------------
def test_two_workers_report_and_ctl_status_shows_them(master, capsys):
    w0 = MasterClient.connect(master.address, TOKEN, rank=0, stage=0, host="hostA")
    w1 = MasterClient.connect(master.address, TOKEN, rank=1, stage=1, host="hostB")
    w0.report(10, {0: {"compute_s": 0.125, "wait_s": 0.5, "comm_s": 0.0625}}, window_steps=10, total_steps=100)
    w1.report(10, {1: {"compute_s": 0.25, "wait_s": 0.0, "comm_s": 0.03125}}, window_steps=10)
    assert main(ctl(master, "status")) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line[:1].isdigit()}
    assert rows["0"][:5] == ["0", "0", "hostA", str(os.getpid()), "alive"]
    assert rows["0"][-3:] == [f"{125:.2f}", f"{500:.2f}", f"{62.5:.2f}"]
    assert rows["1"][2] == "hostB" and rows["1"][-3:] == [f"{250:.2f}", f"{0:.2f}", f"{31.25:.2f}"]
    assert "policy: on, inactive" in out

    assert main(ctl(master, "status", "--json")) == 0
    status = json.loads(capsys.readouterr().out)
    assert [w["last_report"]["stage_times"] for w in status["workers"]] == [
        {"0": {"compute_s": 0.125, "wait_s": 0.5, "comm_s": 0.0625}},
        {"1": {"compute_s": 0.25, "wait_s": 0.0, "comm_s": 0.03125}},
    ]
    w0.close()
    w1.close()
    assert {w["state"] for w in status_of(master)["workers"]} == {"left"}


def test_missed_heartbeats_mark_a_worker_dead():
    m = Master(TOKEN, port=0, heartbeat_timeout_s=0.6)
    m.start_in_thread()
    try:
        beating = MasterClient.connect(m.address, TOKEN, rank=0, stage=0)
        silent = MasterClient.connect(m.address, TOKEN, rank=1, stage=1)
        assert beating.heartbeat_interval_s == pytest.approx(0.2)
        beating.start_heartbeat_thread()

        def states():
            return {w["rank"]: (w["state"], w["reason"]) for w in status_of(m)["workers"]}

        dead = wait_until(lambda: (s := states()) and s[1][0] == "dead" and s)
        assert dead[0][0] == "alive" and "no heartbeat" in dead[1][1]
        silent.heartbeat(force=True)  # it comes back
        assert states()[1][0] == "alive"
        beating.close()
        silent._conn.sock.close()  # the process dies: connection drops without a goodbye
        wait_until(lambda: states()[1] == ("dead", "connection closed"))
        assert states()[0][0] == "left"
    finally:
        m.stop()


def test_ctl_repartition_delivers_the_plan_to_every_worker(master, tmp_path, capsys):
    workers = [MasterClient.connect(master.address, TOKEN, rank=r, stage=r) for r in range(2)]
    workers[0].report(41, {0: {"compute_s": 0.1}})
    workers[1].heartbeat(step=40, force=True)
    assert [w.poll() for w in workers] == [None, None]
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(PLAN))
    assert main(ctl(master, "repartition", "--plan", str(plan_file))) == 0
    # rank 0 polled at step 41: it takes the command at 42 and switches after step 43
    assert "the ranks switch after step 43" in capsys.readouterr().out
    assert workers[1].heartbeat(force=True) == 1  # heartbeats say a command is waiting
    commands = [w.poll() for w in workers]
    for command in commands:
        assert command.type == "repartition" and command.plan.to_json() == PLAN and command.at_step == 43
        assert command.source == "operator" and command.error is None
    assert [w.poll() for w in workers] == [None, None]  # delivered once
    workers[0].ack(commands[0].id, "applied")
    # A later plan with an explicit step; a worker that registers now only sees later commands.
    assert main(ctl(master, "repartition", "--plan", str(plan_file), "--at-step", "100")) == 0
    late = MasterClient.connect(master.address, TOKEN, rank=2, stage=1)
    assert late.poll() is None
    assert workers[0].poll().at_step == 100
    status = status_of(master)
    assert [(c["id"], c["delivered_to"], c["acks"]) for c in status["commands"]] == [
        (1, [0, 1], {"0": "applied"}), (2, [0], {})]
    for w in [*workers, late]:
        w.close()


@pytest.mark.parametrize("content, message", [
    ("{", "plan.json:1: invalid JSON"),
    ('{"stages": []}', "no 'stages'"),
    ('{"stages": [{"nodes": ["a"]}, {"nodes": ["a"]}]}', "stage 0 and stage 1"),
])
def test_ctl_repartition_rejects_bad_plan_files(master, tmp_path, capsys, content, message):
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(content)
    assert main(ctl(master, "repartition", "--plan", str(plan_file))) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert status_of(master)["commands"] == []


def test_ctl_errors_are_one_line(master, capsys, monkeypatch):
    monkeypatch.delenv(protocol.TOKEN_ENV, raising=False)
    host, port = master.address
    assert main(["ctl", "--master", f"{host}:{port}", "status"]) == 1
    assert "no token" in capsys.readouterr().err
    wrong = TOKEN_FILE.with_name("wrong")
    wrong.write_text("nope\n")
    assert main(["ctl", "--master", f"{host}:{port}", "--token-file", str(wrong), "status"]) == 1
    err = capsys.readouterr().err
    assert "rejected the token" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setenv(protocol.TOKEN_ENV, TOKEN)
    monkeypatch.setenv(protocol.MASTER_ENV, f"{host}:{port}")
    assert main(["ctl", "status"]) == 0


def test_ctl_policy_switch(master, capsys):
    assert main(ctl(master, "policy", "off")) == 0
    assert status_of(master)["policy"]["enabled"] is False
    assert main(ctl(master, "policy", "on")) == 0
    assert status_of(master)["policy"]["enabled"] is True
    assert "inactive" in capsys.readouterr().out


def test_client_survives_the_master_going_away(caplog):
    m = Master(TOKEN, port=0)
    m.start_in_thread()
    w = MasterClient.connect(m.address, TOKEN, rank=0, stage=0, reconnect_interval_s=3600)
    m.stop()
    with caplog.at_level(logging.WARNING, logger="pipeshift.master"):
        for step in range(5):  # training goes on: calls become no-ops
            assert w.report(step, {0: {"compute_s": 0.1}}) is None
            assert w.poll() is None
            assert w.heartbeat(step, force=True) is None
    assert len([r for r in caplog.records if "continues without" in r.getMessage()]) == 1
    w.close()


def test_client_reconnects_when_the_master_returns():
    m = Master(TOKEN, port=0)
    host, port = m.start_in_thread()
    w = MasterClient.connect((host, port), TOKEN, rank=0, stage=0, reconnect_interval_s=0.0)
    m.stop()
    assert w.poll() is None and not w.connected
    m2 = Master(TOKEN, host=host, port=port)
    m2.start_in_thread()
    try:
        assert w.report(7, {0: {"compute_s": 0.1}}) == 0
        assert [x["rank"] for x in status_of(m2)["workers"]] == [0]
    finally:
        w.close()
        m2.stop()


# -- the automatic policy inside the master -------------------------------------------------
def test_master_policy_repartitions_on_persistent_slowdown_and_logs_decisions(tmp_path):
    chain = Chain(node_ids=[f"node{i}" for i in range(4)], node_times_s=np.ones(4), activation_bytes=np.zeros(4),
                  state_bytes=np.full(4, 1e3), edges=np.array([(0, 1), (1, 2), (2, 3)]), fqns=[f"l{i}" for i in range(4)])
    config = PolicyConfig(persist_windows=2, cooldown_windows=1, fixed_pause_s=0.1)
    driver = PolicyDriver(parse_plan(PLAN), chain, config, total_steps=1000)
    log_path = tmp_path / "decisions.jsonl"
    with open(log_path, "w") as log:
        m = Master(TOKEN, port=0, log=log, policy=driver)
        m.start_in_thread()
        try:
            w0 = MasterClient.connect(m.address, TOKEN, rank=0, stage=0)
            w1 = MasterClient.connect(m.address, TOKEN, rank=1, stage=1)
            for window in range(4):  # warm-up, calibration, then stage 0's worker 3x slower than the rest
                step = 10 * (window + 1)
                w0.report(step, {0: {"compute_s": 6.0 if window >= 2 else 2.0, "wait_s": 0.0, "comm_s": 0.0}})
                assert w0.poll() is None
                w1.report(step, {1: {"compute_s": 2.0, "wait_s": 4.0, "comm_s": 0.0}})
            command = w0.poll()
            assert command.source == "policy" and command.at_step == 42  # taken at 41, switched after 42
            assert command.plan.node_lists == [["node0"], ["node1", "node2", "node3"]]
            assert [list(s.fqns) for s in command.plan.stages] == [["l0"], ["l1", "l2", "l3"]]
            assert command.plan.stage_ranks == [[0], [1]]
            assert w1.poll().id == command.id
            assert status_of(m)["policy"]["last_decision"]["repartition"] is True
            w0.close()
            w1.close()
        finally:
            m.stop()
    events = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [e["event"] for e in events if e["event"].startswith("policy_")][:2] == ["policy_warmup", "policy_calibrated"]
    decisions = [e for e in events if e["event"] == "policy_decision"]
    assert [d["repartition"] for d in decisions] == [False, True]
    assert decisions[1]["speed_factors"] == [3.0, 1.0] and decisions[1]["migration_bytes"] == 1e3
    assert any(e["event"] == "repartition_queued" and e["source"] == "policy" for e in events)
    assert TOKEN not in log_path.read_text()


@pytest.mark.parametrize("announced_pause_s", [None, 0.05, 1e4])
def test_master_policy_charges_the_pause_the_ranks_measured(announced_pause_s):
    """A switch's measured pause, announced with the plan, is what the master's next decision must repay."""
    chain = Chain(node_ids=[f"node{i}" for i in range(4)], node_times_s=np.ones(4), activation_bytes=np.zeros(4),
                  state_bytes=np.full(4, 1e3), edges=np.array([(0, 1), (1, 2), (2, 3)]), fqns=[f"l{i}" for i in range(4)])
    driver = PolicyDriver(parse_plan(PLAN), chain,
                          PolicyConfig(persist_windows=2, cooldown_windows=1, fixed_pause_s=0.1), total_steps=1000)
    m = Master(TOKEN, port=0, policy=driver)
    m.start_in_thread()
    try:
        w0 = MasterClient.connect(m.address, TOKEN, rank=0, stage=0)
        w1 = MasterClient.connect(m.address, TOKEN, rank=1, stage=1)
        w0.announce_plan(parse_plan(PLAN), step=0, pause_s=announced_pause_s)
        for window in range(4):  # as above: warm-up, calibration, then stage 0 three times slower
            step = 10 * (window + 1)
            w0.report(step, {0: {"compute_s": 6.0 if window >= 2 else 2.0, "wait_s": 0.0, "comm_s": 0.0}})
            w1.report(step, {1: {"compute_s": 2.0, "wait_s": 4.0, "comm_s": 0.0}})
        decision = driver.last_decision
        command = w0.poll()
        w0.close()
        w1.close()
    finally:
        m.stop()
    if announced_pause_s == 1e4:  # ~2 s/step gained over 960 steps cannot repay 10^4 s
        assert command is None and decision is not None and decision.repartition is False
        assert "does not pay for the migration" in decision.reason and decision.migration_cost_s == 1e4
    else:
        assert command is not None and command.source == "policy" and decision is not None
        assert decision.migration_cost_s == pytest.approx(max(0.1 + 1e3 / PolicyConfig().bandwidth_bytes_per_s,
                                                                 announced_pause_s or 0.0))


@pytest.mark.parametrize("message, error", [
    ({"type": "repartition", "id": 3, "at_step": 5, "plan": {"stages": []}}, "no 'stages'"),
    ({"type": "repartition", "id": 3, "at_step": 5, "plan": "plan.json"}, "JSON object"),
    ({"type": "repartition", "id": 3, "at_step": -1, "plan": PLAN}, "at_step"),
    ({"type": "resize", "id": 4, "world_size": 0}, "world_size"),
    ({"type": "resize", "id": 4, "world_size": True}, "world_size"),
    ({"type": "reboot", "id": 5}, "unknown command type"),
])
def test_a_malformed_command_arrives_with_what_is_wrong(message, error):
    command = parse_command(message)
    assert command.error is not None and error in command.error
    assert command.id == message["id"] and command.plan is None


def test_a_command_arrives_checked():
    command = parse_command({"type": "repartition", "id": 7, "at_step": 12, "plan": PLAN, "source": "policy"})
    assert command.error is None and (command.id, command.at_step, command.source) == (7, 12, "policy")
    assert command.plan.node_lists == [["node0", "node1"], ["node2", "node3"]] and command.plan.stage_ranks == [[0], [1]]
    assert parse_command({"type": "resize", "id": 8, "world_size": 3}).world_size == 3


@pytest.mark.parametrize("pause", [-1.0, 1e9, "1", True])
def test_master_refuses_an_announced_pause_that_is_not_a_duration(master, pause):
    with MasterClient.connect(master.address, TOKEN, rank=0, stage=0) as w:
        with pytest.raises(PipeshiftError, match="pause_s"):
            w._request({"type": "plan", "plan": json.loads(json.dumps(PLAN)), "pause_s": pause})


def test_policy_off_makes_no_decisions():
    chain = Chain(node_ids=[f"node{i}" for i in range(4)], node_times_s=np.ones(4), activation_bytes=np.zeros(4),
                  state_bytes=np.zeros(4), edges=np.zeros((0, 2), dtype=int), fqns=[None] * 4)
    driver = PolicyDriver(parse_plan(PLAN), chain, PolicyConfig(persist_windows=1))
    m = Master(TOKEN, port=0, policy=driver, policy_enabled=False)
    m.start_in_thread()
    try:
        with MasterClient.connect(m.address, TOKEN, rank=0, stage=0) as w:
            for step in range(3):
                w.report(step, {0: {"compute_s": 9.0}, 1: {"compute_s": 2.0}})  # one rank reporting all stages
            assert w.poll() is None
            assert status_of(m)["policy"]["window"] == 0
        with CtlClient(m.address, TOKEN) as c:
            with pytest.raises(RequestRefused, match="does not match"):
                c.repartition(parse_plan({"stages": [{"nodes": ["node0"]}, {"nodes": ["x"]}]}))
    finally:
        m.stop()


# -- the seed-compatible entry and the CLI in a real process ----------------------------------
def _start_master_process(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, str, list[str]]:
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.strip())
        if "listening on" in line:
            return proc, line.split("listening on")[1].strip(), lines
    proc.kill()
    raise AssertionError(f"master did not start: {lines} {proc.stderr.read()}")


def test_test_socket_py_starts_the_master(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(protocol.TOKEN_ENV, None)
    log = tmp_path / "log.jsonl"
    token_file = tmp_path / "token"
    proc, where, _ = _start_master_process(
        [sys.executable, "test_socket.py", "--port", "0", "--log", str(log), "--token-file", str(token_file)], env)
    try:
        token_line = proc.stdout.readline()
        assert str(token_file) in token_line
        token = token_file.read_text().strip()
        assert token not in token_line and oct(token_file.stat().st_mode & 0o777) == "0o600"
        with MasterClient.connect(where, token, rank=0, stage=0) as w:
            w.report(1, {0: {"compute_s": 0.1}})
        with CtlClient(where, token) as c:
            assert c.status()["workers"][0]["state"] == "left"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert token not in log.read_text()
        assert {json.loads(x)["event"] for x in log.read_text().splitlines()} >= {
            "master_started", "worker_registered", "report", "worker_left", "master_stopped"}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_master_cli_with_plan_and_graph_runs_the_policy(tmp_path):
    linear = "forward_compute_time=1.0, backward_compute_time=1.0, activation_size=8.0, parameter_size=64.0"
    (tmp_path / "graph.txt").write_text(
        "node1 -- Input0 -- forward_compute_time=0.0, backward_compute_time=0.0, activation_size=8.0, parameter_size=0.0\n"
        + "".join(f"node{i} -- Linear -- {linear}\n" for i in range(2, 6))
        + "".join(f"\tnode{i} -- node{i + 1}\n" for i in range(1, 5)))
    plan = {"graph": "graph.txt", "stages": [{"nodes": ["node1", "node2", "node3"], "ranks": [0]},
                                              {"nodes": ["node4", "node5"], "ranks": [1]}]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    env = {**os.environ, "PYTHONPATH": str(REPO), protocol.TOKEN_ENV: TOKEN}
    proc, where, lines = _start_master_process(
        [sys.executable, "-m", "pipeshift", "master", "--port", "0", "--plan", str(tmp_path / "plan.json"),
         "--persist-windows", "1", "--cooldown-windows", "0", "--total-steps", "10000"], env)
    try:
        assert proc.stdout.readline().strip() == f"pipeshift master: workers and ctl use PIPESHIFT_MASTER={where}"
        assert proc.stdout.readline().strip() == "pipeshift master: policy on"
        with MasterClient.connect(where, TOKEN, rank=0, stage=0) as w:
            # Stage 0 (4 ms profiled) takes 8 ms: its worker is 2x slower. The best split for that
            # is node1,node2 | node3..node5 (max(2*2, 6) = 6 ms, against 8 ms now). The first
            # window is a warm-up and the second calibrates, as in-process.
            for step in (5, 10, 15):
                assert w.poll() is None
                w.report(step, {0: {"compute_s": 0.008}, 1: {"compute_s": 0.004}})
            command = w.poll()
        assert command.plan.node_lists == [["node1", "node2"], ["node3", "node4", "node5"]]
        assert command.plan.predicted["time_per_minibatch_s"] == pytest.approx(0.006)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_master_cli_rejects_a_plan_that_does_not_match_the_graph(tmp_path, capsys):
    (tmp_path / "graph.txt").write_text(
        "node1 -- Linear -- forward_compute_time=1.0, backward_compute_time=1.0, activation_size=8.0, parameter_size=0.0\n")
    (tmp_path / "plan.json").write_text(json.dumps({"graph": "graph.txt", "stages": [{"nodes": ["node9"]}]}))
    assert main(["master", "--port", "0", "--token-file", str(TOKEN_FILE), "--plan", str(tmp_path / "plan.json")]) == 1
    err = capsys.readouterr().err
    assert "plan.json" in err and "does not match" in err and len(err.strip().splitlines()) == 1


def test_a_replayed_or_altered_frame_ends_the_session(master):
    s, nonce = raw_connect(master)
    session = login(s, nonce)
    assert protocol.recv_message(s, session=session)["type"] == "welcome"
    frame = session.seal({"type": "status"})
    s.sendall(frame)
    assert protocol.recv_message(s, session=session)["type"] == "ok"
    s.sendall(frame)  # the same bytes again: its sequence number is spent
    assert s.recv(1) == b""
    s.close()

    s, nonce = raw_connect(master)
    session = login(s, nonce)
    protocol.recv_message(s, session=session)
    frame = bytearray(session.seal({"type": "resize", "world_size": 2}))
    frame[-3] ^= 1  # one bit of the body changed in flight
    s.sendall(bytes(frame))
    assert s.recv(1) == b""
    s.close()
    assert status_of(master)["commands"] == []


def test_a_rejection_reason_from_the_ranks_shows_in_ctl_status(master):
    from pipeshift.launch.ctl_cli import format_status

    worker = MasterClient.connect(master.address, TOKEN, rank=0, stage=0)
    with CtlClient(master.address, TOKEN) as c:
        queued = c.repartition(parse_plan(PLAN))
    assert worker.poll().id == queued["id"]
    worker.ack(queued["id"], "rejected: the run ends at the next step")
    text = format_status(status_of(master))
    assert f"  #{queued['id']} rejected by rank 0: the run ends at the next step" in text
    worker.close()


def test_a_plan_that_changes_the_running_job_is_refused_before_it_is_queued(master):
    running = {**PLAN, "model": {"callable": "pipeshift.models:mlp", "kwargs": {}, "seed": 0}, "batch_size": 8,
               "memory": {"limit_bytes": 1e9}}
    with MasterClient.connect(master.address, TOKEN, rank=0, stage=0) as w:
        w.announce_plan(parse_plan(running), step=3)
    changed = {"batch_size": 10 ** 12, "model": {**running["model"], "seed": 1},
               "memory_per_worker_bytes": [5e9, 1e8]}
    with CtlClient(master.address, TOKEN) as c:
        for key, value in changed.items():
            with pytest.raises(RequestRefused, match="batch_size|model spec|memory limit"):
                c.request({"type": "repartition", "plan": {**running, key: value}})
        with pytest.raises(RequestRefused, match="ranks"):
            c.request({"type": "repartition", "plan": {**running, "stages": [{**running["stages"][0], "ranks": [0]},
                                                                            {**running["stages"][1], "ranks": [2]}]}})
        assert c.repartition(parse_plan({**running, "stages": [
            {**st, "nodes": n} for st, n in zip(running["stages"], (["node0"], ["node1", "node2", "node3"]))]}))
        assert len(c.status()["commands"]) == 1
