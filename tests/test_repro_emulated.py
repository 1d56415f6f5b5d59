"""The emulated two-machine run's pure helpers (the run itself needs root and minutes: not in make test)."""

from __future__ import annotations

from pathlib import Path

import pytest


from pipeshift.errors import PipeshiftError  # noqa: E402
from repro.emulated_cluster import (  # noqa: E402
    data_parallel_plan,
    median_and_range,
    on_link,
    read_metrics,
    render,
    simulated_rate,
    throughput,
)
from repro.netns import LoopbackLink, link_names, open_link, subnet_addresses, tbf_command  # noqa: E402


def _two_stage_plan() -> dict:
    return {
        "version": 1, "batch_size": 16, "model": {"callable": "m:f"},
        "topology": {"levels": [{"workers": 2, "bandwidth_bytes_per_s": 25e6, "latency_s": 1e-4}]},
        "stages": [
            {"stage_id": 0, "nodes": ["node1", "node2"], "fqns": ["a", "b"], "replicas": 1, "ranks": [0], "workers": [0],
             "costs": {"forward_s": 0.01, "backward_s": 0.02, "parameter_bytes": 1e6, "stash_bytes_per_microbatch": 5.0,
                       "output_bytes": 4096.0, "output_link": {"bandwidth_bytes_per_s": 25e6}, "allreduce_s": 0.0}},
            {"stage_id": 1, "nodes": ["node3", "node4"], "fqns": ["b", "c"], "replicas": 1, "ranks": [1], "workers": [1],
             "costs": {"forward_s": 0.03, "backward_s": 0.04, "parameter_bytes": 9e6, "stash_bytes_per_microbatch": 7.0,
                       "output_bytes": 0.0, "output_link": None, "allreduce_s": 0.0}},
        ],
        "predicted": {"time_per_minibatch_s": 0.01, "data_parallel_time_s": 0.2, "speedup_over_data_parallel": 20.0},
        "memory_per_worker_bytes": [1.0, 2.0],
        "notes": [],
    }


def test_data_parallel_plan_merges_stages_in_order() -> None:
    plan = _two_stage_plan()
    dp = data_parallel_plan(plan, 2)
    [stage] = dp["stages"]
    assert stage["nodes"] == ["node1", "node2", "node3", "node4"]
    assert stage["fqns"] == ["a", "b", "c"]  # shared module listed once
    assert (stage["replicas"], stage["ranks"]) == (2, [0, 1])
    # the prediction is the planner's data-parallel estimate, not the pipeline's
    assert dp["predicted"]["time_per_minibatch_s"] == plan["predicted"]["data_parallel_time_s"]
    assert dp["predicted"]["throughput_samples_per_s"] == pytest.approx(16 / 0.2)
    assert "memory_per_worker_bytes" not in dp
    c = stage["costs"]
    assert (c["forward_s"], c["backward_s"]) == pytest.approx((0.04, 0.06))
    assert (c["parameter_bytes"], c["stash_bytes_per_microbatch"], c["output_bytes"]) == (10e6, 12.0, 0.0)
    # ring all-reduce of 10 MB between 2 ranks: each sends 2·(r-1)/r of the bytes, 2·(r-1) messages
    assert c["allreduce_s"] == pytest.approx(10e6 / 25e6 + 2 * 1e-4)
    assert len(plan["stages"]) == 2  # the input is left alone
    with pytest.raises(PipeshiftError):
        data_parallel_plan({"stages": []}, 2)


def test_simulated_rates_replay_both_plans() -> None:
    plan = _two_stage_plan()
    # one microbatch, one step: the pipeline is forward then backward through both stages
    # plus one 4 KB transfer each way at 25 MB/s
    one = 0.01 + 0.03 + 0.04 + 0.02 + 2 * 4096 / 25e6
    assert simulated_rate(plan, microbatches=1, batch_size=16, steps=1) == pytest.approx(16 / one)
    # data parallel, 2 microbatches on 2 replicas: each replica computes one, then the all-reduce
    dp = data_parallel_plan(plan, 2)
    step = 0.04 + 0.06 + dp["stages"][0]["costs"]["allreduce_s"]
    assert simulated_rate(dp, microbatches=2, batch_size=16, steps=1) == pytest.approx(16 * 2 / step)


def test_on_link_changes_only_the_links() -> None:
    plan = _two_stage_plan()
    fast = on_link(plan, 1e9, 5e-5)
    assert fast["stages"][0]["costs"]["output_link"] == {"bandwidth_bytes_per_s": 1e9, "latency_s": 5e-5}
    assert fast["topology"]["levels"][0]["bandwidth_bytes_per_s"] == 1e9
    assert [st["nodes"] for st in fast["stages"]] == [st["nodes"] for st in plan["stages"]]
    assert plan["stages"][0]["costs"]["output_link"] == {"bandwidth_bytes_per_s": 25e6}  # input untouched
    # a faster link makes the data-parallel all-reduce cheaper, and the simulated rate higher
    assert data_parallel_plan(fast, 2)["stages"][0]["costs"]["allreduce_s"] < data_parallel_plan(plan, 2)["stages"][0]["costs"]["allreduce_s"]


def _rows(times: list[float]) -> list[dict[str, str]]:
    return [{"step": str(i + 1), "split": "train", "time_s": str(t)} for i, t in enumerate(times)]


def test_throughput_counts_the_span_after_warmup() -> None:
    rows = _rows([1.0, 2.0, 2.5, 3.0])
    assert throughput(rows, samples_per_step=64, warmup=2) == pytest.approx(2 * 64 / (3.0 - 2.0))
    assert throughput(rows, samples_per_step=64, warmup=0) == pytest.approx(4 * 64 / 3.0)
    with pytest.raises(PipeshiftError):
        throughput(rows, samples_per_step=64, warmup=4)


def test_read_metrics_keeps_training_rows(tmp_path: Path) -> None:
    f = tmp_path / "metrics.csv"
    f.write_text("step,split,time_s\n1,train,0.5\n1,val,0.6\n2,train,1.0\n")
    assert [r["time_s"] for r in read_metrics(f)] == ["0.5", "1.0"]


def test_median_and_range() -> None:
    assert median_and_range([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0)
    with pytest.raises(ValueError):
        median_and_range([])


def test_tbf_command() -> None:
    cmd = tbf_command("ns0", 200)
    assert cmd[:4] == ["ip", "netns", "exec", "ns0"]
    assert cmd[cmd.index("rate") + 1] == "200mbit"
    assert int(cmd[cmd.index("burst") + 1]) == 200e6 / 8 / 250  # a 4 ms bucket at 25 MB/s
    assert int(tbf_command("ns0", 1)[cmd.index("burst") + 1]) == 32 * 1024  # never below 32 KiB
    with pytest.raises(ValueError):
        tbf_command("ns0", 0)


def test_link_names_fit_interface_limits() -> None:
    for tag in (0, 7, 99999, 4194304):
        names = link_names(tag)
        assert len({*names.values()}) == 4
        assert all(len(names[k]) <= 15 for k in ("veth0", "veth1"))  # IFNAMSIZ - 1
        a, b = subnet_addresses(tag)
        assert a.startswith("10.231.") and b.startswith("10.231.") and a != b
        assert a.rsplit(".", 1)[0] == b.rsplit(".", 1)[0]


def test_loopback_when_namespaces_are_off() -> None:
    with open_link(200, use_namespaces=False) as link:
        assert isinstance(link, LoopbackLink)
        assert link.hosts() == ["127.0.0.1", "127.0.0.1"]
        assert "GLOO_SOCKET_IFNAME=lo" in link.prefix(0)
        assert "no shaping" in link.describe()


def _result(shaped: bool) -> dict:
    return {
        "link": "x", "shaped": shaped, "rate_mbit": 200.0 if shaped else None,
        "netcheck": {"bandwidth_bytes_per_s": 24e6, "latency_s": 1e-4},
        "model": "m:f", "model_args": {}, "pipeline_forced": False,
        "planner": {"measured link (netcheck)": {"configuration": "straight", "stages": 2,
                                                 "speedup_over_data_parallel": 10.0}},
        "configurations": {"data parallel": "2", "pipeline": "straight"},
        "predicted_samples_per_s": {"data parallel": 80.0, "pipeline": 1000.0},
        "measured_samples_per_s": {"data parallel": [70.0, 60.0, 65.0], "pipeline": [300.0, 360.0, 350.0]},
        "control_unshaped_samples_per_s": None,
        "settings": {"steps": 12, "warmup_steps": 2, "repeats": 3, "microbatches": 4, "batch_size": 16},
        "command": "python -m repro.emulated_cluster",
    }


def test_render_reports_medians_and_says_when_nothing_was_shaped() -> None:
    text = render(_result(shaped=True))
    assert "| 200 Mbit/s | data parallel | 2 | 65.0 | 60.0–70.0 | 3 | 80 |" in text
    assert "| 200 Mbit/s | pipeline | straight | 350.0 | 300.0–360.0 | 3 | 1000 |" in text
    assert f"{350.0 / 65.0:.2f}×" in text
    assert "No shaping" not in text
    assert "No shaping was possible" in render(_result(shaped=False))
