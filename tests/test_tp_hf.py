"""A Hugging Face Llama through the whole TP path, with the model's own TP plan.

``pipeshift profile`` on a tiny ``LlamaForCausalLM`` (built from a config saved with
``save_pretrained``) records the model's own plan (``LlamaConfig.base_model_tp_plan`` for the
layers, ``LlamaForCausalLM._tp_plan`` for the head); ``plan --tp 2`` on 4 workers gives every
stage TP degree 2; ``codegen`` writes the plan into conf.json; ``train`` on 4 ranks (flush)
shards the generated stages and ends with the weights of single-process training on the same
real text, computed here. One 4-rank launch, a hard timeout.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from pipeshift.plan import read_plan  # noqa: E402
from pipeshift.runtime import checkpoint as ckpt  # noqa: E402
from test_hf import model_dir, reference, relative_error, run_cli, spec_of, text_data  # noqa: E402
from test_runtime import finish, start_ranks  # noqa: E402

pytestmark = pytest.mark.timeout(1200)


def test_hf_llama_profile_plan_tp_codegen_train(tmp_path: Path) -> None:
    spec = spec_of(model_dir(tmp_path, "llama-untied"), "llama-untied")
    flags = [*text_data(tmp_path), "--loss", "pipeshift.losses:causal_lm"]
    run_cli("profile", spec.callable, *[f"--model-arg={k}={v}" for k, v in spec.kwargs.items()], "--seed", "3",
            *flags, "-b", "4", "-o", str(tmp_path / "prof"), "--quiet", "--iterations", "1", "--warmup", "0",
            "--threads", "1", "--no-malloc-tuning")
    recorded = json.loads((tmp_path / "prof" / "profile.json").read_text())["tp_plan"]
    assert "LlamaConfig.base_model_tp_plan" in recorded["source"], recorded["source"]
    from transformers import LlamaConfig

    own = {f"model.{p.replace('*', str(i))}": s for p, s in LlamaConfig.base_model_tp_plan.items() for i in (0, 1)}
    assert recorded["modules"] == {**own, "lm_head": "colwise_gather_output"}

    run_cli("plan", str(tmp_path / "prof" / "graph.txt"), "-n", "4", "--tp", "2", "-o", str(tmp_path / "plan"))
    plan = read_plan(tmp_path / "plan")
    assert [st.tp for st in plan.stages] == [2] * len(plan.stages) and plan.world_size == 4
    run_cli("codegen", str(tmp_path / "plan"), "-o", str(tmp_path / "stages"))
    conf = json.loads((tmp_path / "stages" / "conf.json").read_text())
    assert conf["stage_to_tp_degree"] == {str(s): 2 for s in range(len(plan.stages))}
    # the capture keeps each decoder layer as one node; its projections are sharded all the same
    assert conf["tp_plan"] == recorded["modules"]

    args = ["--schedule", "flush", "--microbatches", "2", "--steps", "2", "--batch-size", "4", "--lr", "0.1",
            "--momentum", "0.9", *flags, "--checkpoint-dir", str(tmp_path / "ck")]
    results = finish(start_ranks(tmp_path, tmp_path / "stages", 4, args, timeout_s=90), 900)
    failed = [f"rank {r} exited {rc}:\n{e[-2000:]}" for r, (rc, _o, e) in enumerate(results) if rc]
    assert not failed, "\n".join(failed)
    assert "runs on TP group [0, 1] (degree 2): sharded" in results[0][2], results[0][2][-2000:]

    want = reference(spec, flags, steps=2, m=2, b=4, lr=0.1, momentum=0.9)
    where = ckpt.resolve(tmp_path / "ck")
    got = ckpt.assemble_state_dict(ckpt.stage_files(where, ckpt.read_meta(where)))
    assert set(got) == set(want.state_dict())
    for key, value in want.state_dict().items():
        assert relative_error(got[key], value) <= 1e-5, key
